-- wrk script: every request posts a fresh random wx.login()-shaped code to /auth/login. WeChat is
-- answered by a stand-in that accepts any code (the mock with --any-code, or nginx) and names the
-- person by the code's first two characters, so each code is a new, valid, single-use login.
-- bench/versus.py appends bench/stats.lua to this script for its statistics line.
local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

function init(args)
  math.randomseed(os.time() + math.floor(os.clock() * 1000000) + tonumber(tostring({}):sub(8), 16) % 100000)
end

function request()
  local code = {}
  for i = 1, 32 do
    local n = math.random(1, #alphabet)
    code[i] = alphabet:sub(n, n)
  end
  return wrk.format("POST", "/auth/login", { ["Content-Type"] = "application/json" },
    '{"code":"' .. table.concat(code) .. '"}')
end
