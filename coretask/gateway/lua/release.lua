-- release.lua: hand running tasks back to the head of their queues without consuming a retry
-- (graceful shutdown, pause with requeue, a process ending for a stuck task).
-- KEYS[1]  P:leases
-- ARGV[1]  P    ARGV[2] worker id    ARGV[3..] groups of four: id, token, and the queue and
--          tenant the fetch reply named (where fetch counted the task; "" = unknown: the
--          record's q and tn are used)
-- Reply: number of tasks handed back (stale tokens are ignored; this worker's lease on a
-- damaged record is taken out instead: _lib.lua take_out).
local P, worker = ARGV[1], ARGV[2]
local n = 0
for i = 3, #ARGV, 4 do
  local id, token = ARGV[i], ARGV[i+1]
  local queue, tenant = named(ARGV[i+2]), named(ARGV[i+3])
  local tkey = P .. ':t:' .. id
  -- the task goes back to the record's q and tn, so those are checked whatever the worker says
  local f, bad = read_task(P, id, {'a', 'st', 'q', 'tn', 'b', 'w'}, {a = true, st = true, q = QUEUES, tn = true})
  bad = check_leased(P, worker, id, f, bad)
  if bad then
    if owns_lease(P, worker, id, token, f) then
      take_out(P, id, bad, {worker = worker, queue = queue, tenant = tenant, counted = true}, now_ms())
    end
  elseif f[1] == token and f[2] == 'running' then
    drop_lease(P, id, worker, queue or f[3], tenant or f[4], f[5])
    if told_to_stop(P, id, f[5]) then
      end_canceled(P, id, tenant or f[4], f[5], 0, now_ms())   -- its batch canceled, or cancel_task
    else
      forget_attempt(tkey)
      push_ready(P, f[3], f[4], id, true)
    end
    n = n + 1
  end
end
return n
