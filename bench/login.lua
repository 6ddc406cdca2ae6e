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

-- Randomness from the kernel: LuaJIT's generator, seeded from the clock, gave two wrk processes
-- started in the same second the same codes, and a replayed code is not a login.
local function urandom(n)
  local f = assert(io.open("/dev/urandom", "rb"))
  local bytes = f:read(n)
  f:close()
  return bytes
end

function init(args)
  local seed = 0
  for _, byte in ipairs({ urandom(6):byte(1, 6) }) do
    seed = seed * 256 + byte
  end
  math.randomseed(seed)
  for i = 1, #alphabet do
    for j = 1, #alphabet do
      people[#people + 1] = alphabet:sub(i, i) .. alphabet:sub(j, j)
    end
  end
  local chars = {}
  for i, byte in ipairs({ urandom(20):byte(1, 20) }) do
    local k = byte % #alphabet + 1
    chars[i] = alphabet:sub(k, k)
  end
  stem = table.concat(chars)
end

function request()
  counter = counter + 1
  local code = people[math.random(1, #people)] .. stem .. string.format("%010d", counter)
  return wrk.format("POST", "/auth/login", { ["Content-Type"] = "application/json" },
    '{"code":"' .. code .. '"}')
end
