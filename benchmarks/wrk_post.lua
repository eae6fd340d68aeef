-- wrk script: POST /v1/reports with a distinct resource id per request, JSON summary at the end.
local counter = 0
local threads = {}
local prefix = "w"

function setup(thread)
  thread:set("prefix", "w" .. #threads .. "-")
  table.insert(threads, thread)
end

function init(args)
  if args[1] then prefix = args[1] .. prefix end
end

local headers = { ["Content-Type"] = "application/json" }

request = function()
  counter = counter + 1
  local body = '{"resource_id":"' .. prefix .. counter .. '","kind":"scan","payload":{"os":"linux","n":' .. counter .. '}}'
  return wrk.format("POST", "/v1/reports", headers, body)
end

done = function(summary, latency, requests)
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
