-- recover.lua: take back tasks whose worker is gone: every task leased to a dead worker process
-- KEYS[1]  P:leases
-- ARGV[1]  P   ARGV[2] mode ("worker" | "expired")   ARGV[3] worker id (mode worker)
-- ARGV[4]  deadletter ("1" | "0")   ARGV[5] reason text   ARGV[6] max tasks (mode expired)
-- ARGV[7]  consume a retry ("1" | "0")
-- ARGV[8]  deadletter_schedules ("1" keeps exhausted runs of a schedule, "0"/absent deletes them)
-- Reply: {requeued, buried, canceled}
--
-- Covers a dead worker process (mode "worker") and every lease whose deadline has passed (mode "expired": the backstop
-- when the whole manager died). Each recovered task consumes one retry, since the task itself
-- may be what killed its process; with no retry left it is buried with the reason. With
-- ARGV[7] = "0" (a manager ending a child it had to stop at shutdown) tasks are handed back to
-- the head of their queues without consuming a retry.
local P, mode, worker, deadletter, reason = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local now = now_ms()
local ids
if mode == 'worker' then
  ids = redis.call('HKEYS', P .. ':wl:' .. worker)
else
  ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[6]))
end
local res = {0, 0, 0}
for _, id in ipairs(ids) do
  local tkey = P .. ':t:' .. id
  local f, bad = read_task(P, id, {'st', 'q', 'tn', 'b', 'w', 'r'},
                           {st = 'running', q = QUEUES, tn = true, r = true})
  if bad then   -- damaged record (_lib.lua): its lease undone, dead letter or quarantine
    local owner = worker
    if mode ~= 'worker' then owner = f and f[5] or '' end
    take_out(P, id, bad, {worker = owner, counted = true}, now)
    res[2] = res[2] + 1
    f = {}
  end
  if f[1] == 'running' then
    drop_lease(P, id, f[5], f[2], f[3], f[4])
    forget_attempt(tkey)
    if told_to_stop(P, id, f[4]) then
      end_canceled(P, id, f[3], f[4], 0, now)   -- its batch canceled, or cancel_task
      res[3] = res[3] + 1
    elseif ARGV[7] == '0' then
      push_ready(P, f[2], f[3], id, true)
      res[1] = res[1] + 1
    else
      local code = retry_or_bury(P, id, f[2], f[3], f[4], 0, deadletter, 'WorkerLost', reason, '', now,
                                 ARGV[8])
      res[code] = res[code] + 1
    end
  else
    redis.call('ZREM', KEYS[1], id)
    if f[5] then redis.call('HDEL', P .. ':wl:' .. f[5], id) end
  end
end
if mode == 'worker' then
  redis.call('DEL', P .. ':wl:' .. worker, P .. ':w:' .. worker)   -- (':w:': the lease set of releases before the hash)
  -- a dead process waits for nothing (its inbox's hand-offs are leased to it: recovered above)
  idle_unregister(P, worker)
  redis.call('DEL', P .. ':inbox:' .. worker)
end
return res
