-- complete.lua: acknowledge finished tasks of one worker (many per call): succeeded or canceled.
-- An acknowledgement counts only if it presents the task's current lease token while the task
-- is running, so an answer from a worker whose lease expired changes nothing.
-- KEYS[1]  P:leases
-- ARGV[1]  P         ARGV[2] worker id
-- ARGV[3..] groups of four: id, token (attempt), outcome ("ok" | "canceled"), duration ms
-- Reply: array of codes, one per task: 1 = counted, 0 = stale token or unknown task (ignored).
local P, worker = ARGV[1], ARGV[2]
local now = now_ms()
local codes = {}
for i = 3, #ARGV, 4 do
  local id, token, outcome, dur = ARGV[i], ARGV[i+1], ARGV[i+2], tonumber(ARGV[i+3])
  local tkey = P .. ':t:' .. id
  local f = redis.call('HMGET', tkey, 'a', 'st', 'q', 'tn', 'b', 'w')
  if f[1] == token and f[2] == 'running' then
    drop_lease(P, id, f[6], f[3], f[4], f[5])
    redis.call('DEL', tkey)
    if outcome == 'ok' then settle_batch(P, f[5], 'done', dur, now)
    else settle_batch(P, f[5], 'canceled', dur, now) end
    codes[#codes+1] = 1
  else
    codes[#codes+1] = 0
  end
end
return codes
