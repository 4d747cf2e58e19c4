-- Offered load: each connection waits WRK_DELAY_MS between requests, so C connections offer about
-- C * 1000 / (WRK_DELAY_MS + latency) requests per second. Body and summary as in wrk_report.lua.
local body_file = os.getenv("WRK_BODY_FILE")
if body_file ~= nil and body_file ~= "" then
  local f = assert(io.open(body_file, "rb"))
  wrk.method = "POST"
  wrk.body = f:read("*a")
  f:close()
end
local pause = tonumber(os.getenv("WRK_DELAY_MS") or "0")

delay = function()
  return pause
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK_JSON {\"requests\":%d,\"duration_us\":%d,\"socket_errors\":%d,\"non_2xx\":%d," ..
    "\"p50_us\":%d,\"p99_us\":%d,\"p999_us\":%d}\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
