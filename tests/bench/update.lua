-- wrk script for `make bench`: REST PUT /api/v1/partner/ingest/disposition-status through Envoy.
--
--   wrk ... URL -- API_KEY API_SECRET TENANT SUB_TENANT CUSTOMERS RUN_TAG [ID_DIGITS]
--
-- Each request picks a random customer c00000..c<CUSTOMERS-1> (ID_DIGITS digits, default 5) and a status never sent before
-- ("w<run>-<thread>-<n>"), so every 200 is a real change that writes one history row.
-- response() counts non-2xx replies per thread (wrk's own errors.status counts only >= 400);
-- done() prints one line "BENCH_JSON {...}" with counts and latency percentiles (microseconds).

local threads = {}
local next_thread = 0

function setup(thread)
  next_thread = next_thread + 1
  thread:set("thread_tag", next_thread)
  table.insert(threads, thread)
end

local counter = 0
non_2xx = 0 -- global, so that done() can read it with thread:get()
local customers
local run_tag
local id_format
local headers

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
  math.randomseed(os.time() * 1000 + thread_tag)
end

function request()
  counter = counter + 1
  local body = string.format(
    '{"customer_id":"%s","disposition_status":"w%s-%d-%d"}',
    string.format(id_format, math.random(0, customers - 1)), run_tag, thread_tag, counter
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
