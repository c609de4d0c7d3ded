-- release.lua: hand running tasks back to the head of their queues without consuming a retry
-- (graceful shutdown, pause with requeue, a process ending for a stuck task).
-- KEYS[1]  P:leases
-- ARGV[1]  P    ARGV[2] worker id    ARGV[3..] pairs: id, token
-- Reply: number of tasks handed back (stale tokens are ignored).
local P, worker = ARGV[1], ARGV[2]
local n = 0
for i = 3, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i+1]
  local tkey = P .. ':t:' .. id
  local f = redis.call('HMGET', tkey, 'a', 'st', 'q', 'tn', 'b', 'w')
  if f[1] == token and f[2] == 'running' then
    drop_lease(P, id, f[6], f[3], f[4], f[5])
    if told_to_stop(P, id, f[5]) then
      end_canceled(P, id, f[4], f[5], 0, now_ms())   -- its batch canceled, or cancel_task
    else
      redis.call('HDEL', tkey, 'w', 'ls')
      push_ready(P, f[3], f[4], id, true)
    end
    n = n + 1
  end
end
return n
