-- POST a different file on each request, cycling through a list of files:
--   wrk ... -s bench/wrk_post_files.lua URL -- LIST_FILE CONTENT_TYPE
-- (the batch benchmark's service rows: the same files `isomax score` reads, bench/batch_bench.py)
local bodies = {}
local i = 0

function init(args)
  for line in io.lines(args[1]) do
    local f = assert(io.open(line, "rb"))
    bodies[#bodies + 1] = f:read("*a")
    f:close()
  end
  wrk.method = "POST"
  wrk.headers["Content-Type"] = args[2]
end

function request()
  i = i % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[i])
end
