-- wrk script for `make bench`: REST PUT /api/v1/partner/ingest/disposition-status through Envoy.
--
--   wrk ... URL -- API_KEY API_SECRET TENANT SUB_TENANT CUSTOMERS RUN_TAG ID_DIGITS THREADS
--
-- Each thread updates customers of its own (c00000..c<CUSTOMERS-1>, ID_DIGITS digits, default 5,
-- those whose index modulo the thread count is the thread's), picked at random, and moves each
-- through ten statuses in turn ("w<run>-0" .. "w<run>-9", as a tenant's catalog would have), so
-- every 200 is a real change that writes one history row.
-- response() counts non-2xx replies per thread (wrk's own errors.status counts only >= 400);
-- done() prints one line "BENCH_JSON {...}" with counts and latency percentiles (microseconds).

local threads = {}
local next_thread = 0

function setup(thread)
  next_thread = next_thread + 1
  thread:set("thread_tag", next_thread)
  table.insert(threads, thread)
end

non_2xx = 0 -- global, so that done() can read it with thread:get()
local customers
local run_tag
local id_format
local headers
local threads_total
local moves = {} -- this thread's customers: how many updates each has had in this run

function init(args)
  headers = {
    ["Content-Type"] = "application/json",
    ["x-api-key"] = args[1],
    ["x-api-secret"] = args[2],
    ["x-tenant-id"] = args[3],
    ["x-sub-tenant-id"] = args[4],
  }
  customers = tonumber(args[5])
  run_tag = args[6]
  id_format = "c%0" .. (args[7] or "5") .. "d"
  threads_total = tonumber(args[8] or "1")
  math.randomseed(os.time() * 1000 + thread_tag)
end

function request()
  local mine = math.floor((customers - thread_tag) / threads_total) + 1
  local customer = math.random(0, mine - 1) * threads_total + (thread_tag - 1)
  local n = (moves[customer] or 0) + 1
  moves[customer] = n
  local body = string.format(
    '{"customer_id":"%s","disposition_status":"w%s-%d"}',
    string.format(id_format, customer), run_tag, n % 10
  )
  return wrk.format("PUT", nil, headers, body)
end

function response(status, _headers, _body)
  if status < 200 or status > 299 then
    non_2xx = non_2xx + 1
  end
end

function done(summary, latency, _requests)
  local e = summary.errors
  local non_2xx_total = 0
  for _, thread in ipairs(threads) do
    non_2xx_total = non_2xx_total + thread:get("non_2xx")
  end
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,'
      .. '"non_2xx":%d,"connect":%d,"read":%d,"write":%d,"timeout":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    non_2xx_total, e.connect, e.read, e.write, e.timeout
  ))
end
