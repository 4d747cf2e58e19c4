-- Shared by every wrk run of the benchmarks:
--   WRK_BODY_FILE  POST this file's bytes instead of GET
--   WRK_CLOSE=1    a new connection per request (what curl in clevis does)
--   WRK_DELAY_MS   pace each connection (offered load): C connections offer about C * 1000 / (delay + latency)
--                  requests per second. Left unset, no delay function exists, so wrk runs flat out.
-- and one machine-readable summary line, WRK_JSON {...}.
local body_file = os.getenv("WRK_BODY_FILE")
if body_file ~= nil and body_file ~= "" then
  local f = assert(io.open(body_file, "rb"))
  wrk.method = "POST"
  wrk.body = f:read("*a")
  f:close()
end
if os.getenv("WRK_CLOSE") == "1" then
  wrk.headers["Connection"] = "close"
end
local pause = tonumber(os.getenv("WRK_DELAY_MS") or "")
if pause ~= nil and pause > 0 then
  delay = function()
    return pause
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK_JSON {\"requests\":%d,\"duration_us\":%d,\"socket_errors\":%d,\"non_2xx\":%d," ..
    "\"p50_us\":%d,\"p99_us\":%d,\"p999_us\":%d}\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
