-- cancel_task.lua: cancel one task. A task waiting to run (queued, delayed or retrying, isolated
-- after a crash, a continuation waiting for its batch) is removed and counted canceled at once;
-- a running task is marked (field cx = now ms) and its worker told, and is counted canceled when
-- it ends (complete, fail, release, recover and crashed count a marked task canceled, whatever
-- it ended with, unless it returned first: then it is done). The manager ends the process of a
-- marked task still running after cancel_grace (overdue.lua), as for a canceled batch.
-- A task of a batch counts as canceled in the batch (remaining -1, canceled +1; the batch may
-- finish, as when the task had ended any other way; the tenant is counted by settle_batch);
-- a task of no batch is counted in P:ts:<tenant> canceled.
-- KEYS[1]  P:t:<id>
-- ARGV[1]  P   ARGV[2] task id   ARGV[3] tenant the caller claims ("" = any)
-- Reply: 1 = canceled now (or, running, told to stop), 0 = unknown, another tenant's, finished
--        (done tasks are deleted), dead, already told to stop, of a canceled batch, or staged
--        (a batch's task not yet published: its batch is still being written).
-- Publishes "x:<id>": a worker running the task aborts it once it has read the mark back
-- (the message carries no authority; worker/control.py).
local P, id = ARGV[1], ARGV[2]
local f = redis.call('HMGET', KEYS[1], 'st', 'q', 'tn', 'b', 'cb', 'cx')
local st, queue, tenant, batch = f[1], f[2], f[3], f[4]
if not st or (ARGV[3] ~= '' and tenant ~= ARGV[3]) or batch_canceled(P, batch) then return 0 end
local now = now_ms()
if st == 'running' then
  if f[6] then return 0 end
  redis.call('HSET', KEYS[1], 'cx', now)
  redis.call('PUBLISH', P .. ':ev', 'x:' .. id)
  return 1
end
if not unqueue(P, id, st, queue, tenant, f[5]) then return 0 end   -- dead, running or staged: no
end_canceled(P, id, tenant, batch, 0, now)
return 1
