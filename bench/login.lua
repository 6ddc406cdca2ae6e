-- wrk script: every request posts a fresh wx.login()-shaped code (32 alphanumerics) to /auth/login.
-- WeChat is answered by a stand-in that accepts any code (the mock with --any-code, or nginx) and
-- names the person by the code's first two characters, so each code is a new, valid, single-use
-- login of one of 3,844 people. A code is a random person, a random per-thread stem and a counter:
-- unique within the run, and cheap to make, so the load generator (which shares the cores with
-- wxgate) spends little on it. bench/versus.py appends bench/stats.lua for its statistics line.
local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
local people = {}
local stem
local counter = 0

local function random_chars(n)
  local chars = {}
  for i = 1, n do
    local k = math.random(1, #alphabet)
    chars[i] = alphabet:sub(k, k)
  end
  return table.concat(chars)
end

function init(args)
  math.randomseed(os.time() + math.floor(os.clock() * 1000000) + tonumber(tostring({}):sub(8), 16) % 100000)
  for i = 1, #alphabet do
    for j = 1, #alphabet do
      people[#people + 1] = alphabet:sub(i, i) .. alphabet:sub(j, j)
    end
  end
  stem = random_chars(20)
end

function request()
  counter = counter + 1
  local code = people[math.random(1, #people)] .. stem .. string.format("%010d", counter)
  return wrk.format("POST", "/auth/login", { ["Content-Type"] = "application/json" },
    '{"code":"' .. code .. '"}')
end
