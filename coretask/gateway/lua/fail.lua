-- fail.lua: record a failed attempt: retry (at once or after a delay) or bury in the dead
-- letter list once retries are exhausted. A task told to stop (its batch canceled, or marked by
-- cancel_task) is counted canceled and never retried or buried. The minute's history
-- (P:h:<minute>) counts the attempt as ended, and as failed unless it was told to stop.
-- KEYS[1]  P:t:<id>
-- ARGV[1]  P           ARGV[2] worker id    ARGV[3] task id     ARGV[4] token (attempt)
-- ARGV[5]  delay ms before the retry (0 = at once)
-- ARGV[6]  deadletter ("1" keeps exhausted tasks in P:dead:<queue>, "0" deletes them)
-- ARGV[7]  exception type   ARGV[8] message   ARGV[9] traceback   ARGV[10] duration ms
-- ARGV[11] "1" = no retry, bury now (the failure can never succeed, e.g. unloadable payload)
-- ARGV[12] deadletter_schedules ("1" keeps exhausted runs of a schedule, "0"/absent deletes them)
-- ARGV[13] queue, ARGV[14] tenant: what the fetch reply named, where fetch counted the task
--          ("" or absent = unknown: the record's q and tn are used)
-- Reply: 1 = requeued for retry, 2 = buried (dead letter or deleted; or, for this worker's lease
--        on a damaged record, taken out: _lib.lua take_out), 3 = counted canceled,
--        0 = stale token (ignored).
local P, worker, id, token = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local queue, tenant = named(ARGV[13]), named(ARGV[14])
local now = now_ms()
-- the retry goes to the record's q and tn, so those are checked whatever the worker says
local f, bad = read_task(P, id, {'a', 'st', 'q', 'tn', 'b', 'w', 'r', 'sch'},
                         {a = true, st = true, q = QUEUES, tn = true, r = true})
bad = check_leased(P, worker, id, f, bad)
if bad then
  if not owns_lease(P, worker, id, token, f) then return 0 end
  take_out(P, id, bad, {worker = worker, queue = queue, tenant = tenant, counted = true,
                        etb = 'the attempt failed with ' .. ARGV[7] .. ': ' .. ARGV[8] .. '\n' .. ARGV[9]}, now)
  return 2
end
if f[1] ~= token or f[2] ~= 'running' then return 0 end
drop_lease(P, id, worker, queue or f[3], tenant or f[4], f[5])
if told_to_stop(P, id, f[5]) then
  end_canceled(P, id, tenant or f[4], f[5], tonumber(ARGV[10]), now)
  history(P, queue or f[3], 1, 0, now)
  return 3
end
history(P, f[3], 1, 1, now)
if f[5] ~= '' and f[5] then redis.call('HINCRBY', P .. ':b:' .. f[5], 'dur', tonumber(ARGV[10])) end
if ARGV[11] == '1' then
  bury(P, id, f[3], f[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], now, ARGV[12], tonumber(ARGV[10]))
  return 2
end
return retry_or_bury(P, id, f[3], f[4], f[5], tonumber(ARGV[5]), ARGV[6], ARGV[7], ARGV[8], ARGV[9], now,
                     ARGV[12], tonumber(ARGV[10]))
