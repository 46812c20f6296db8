-- POST the same body on every request:
--   wrk ... -s bench/wrk_post.lua URL -- BODY_FILE CONTENT_TYPE ["Header: value" ...]
-- (wrk calls this init from its own, then builds the request from wrk.method/headers/body.)
function init(args)
  local f = assert(io.open(args[1], "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = args[2]
  for i = 3, #args do
    local name, value = args[i]:match("^([^:]+):%s*(.*)$")
    wrk.headers[name] = value
  end
end
