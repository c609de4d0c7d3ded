-- crashed.lua: the tasks of a worker process that died without handing them back (a segfault,
-- os._exit, the kernel's OOM killer, a MemoryError in one of its tasks). Only the culprit pays.
-- KEYS[1]  P:leases   KEYS[2] P:wl:<worker>
-- ARGV[1]  P   ARGV[2] worker id   ARGV[3] reason (names the process and its exit code)
-- ARGV[4]  crashes that bury a task (Options.max_crashes)   ARGV[5] deadletter ("1" | "0")
-- ARGV[6]  deadletter_schedules ("1" | "0")   ARGV[7] "0": never name a culprit (the process ran tasks
--          of other shards too: coretask/gateway/shards.py), absent or "1": as below
-- Reply: {isolated, buried (a damaged record taken out counts here), canceled, culprit id ("" when
--        none could be named)}
--
-- With one task running, that task is the culprit: its crash count (field cr) goes up, and at
-- max crashes it is buried as WorkerLost with the reason, else it is isolated again. With
-- several running, none can be blamed: each goes, without consuming a retry, to its queue's
-- isolation list P:iso:<queue> (state "isolated", counted as ready), from which the manager's
-- isolation worker runs them one at a time, each alone in its process (fetch_isolated.lua), so
-- a second crash names its culprit. Tasks told to stop (batch canceled, cancel_task) are
-- counted canceled.
local P, worker, reason, max_crashes = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local now = now_ms()
local res = {0, 0, 0, ''}
local running = {}
-- a dead process waits for nothing (its inbox's hand-offs are leased to it: taken back below)
idle_unregister(P, worker)
redis.call('DEL', P .. ':inbox:' .. worker)
for _, id in ipairs(redis.call('HKEYS', KEYS[2])) do
  -- a damaged record in the worker's lease set (only a lease adds to it) is taken out as leased
  -- to this worker, before anything is written for it (_lib.lua read_task / take_out)
  local f, bad, kind = read_task(P, id, {'st', 'q', 'tn', 'b', 'w'}, {st = true, q = QUEUES, tn = true})
  if bad and kind ~= 'none' then
    take_out(P, id, bad, {worker = worker, counted = true, etb = reason}, now)
    res[2] = res[2] + 1
  elseif not bad and f[1] == 'running' and f[5] == worker then
    running[#running+1] = {id, f}
  else
    redis.call('ZREM', KEYS[1], id)       -- a stale entry: the task moved on
  end
end
redis.call('DEL', KEYS[2], P .. ':w:' .. worker)   -- and the lease set of releases before the hash
for _, entry in ipairs(running) do
  local id, f = entry[1], entry[2]
  local tkey = P .. ':t:' .. id
  drop_lease(P, id, worker, f[2], f[3], f[4])
  forget_attempt(tkey)
  if told_to_stop(P, id, f[4]) then
    end_canceled(P, id, f[3], f[4], 0, now)   -- its batch canceled, or cancel_task
    res[3] = res[3] + 1
  else
    local isolate = true
    if #running == 1 and ARGV[7] ~= '0' then
      res[4] = id
      if redis.call('HINCRBY', tkey, 'cr', 1) >= max_crashes then
        bury(P, id, f[2], f[4], ARGV[5], 'WorkerLost', reason, '', now, ARGV[6])
        res[2] = res[2] + 1
        isolate = false
      end
    end
    if isolate then
      redis.call('HSET', tkey, 'st', 'isolated')
      redis.call('RPUSH', P .. ':iso:' .. f[2], id)
      redis.call('HINCRBY', P .. ':qs:' .. f[2], 'ready', 1)
      res[1] = res[1] + 1
    end
  end
end
return res
