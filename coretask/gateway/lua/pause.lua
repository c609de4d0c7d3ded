-- pause.lua: pause or resume everything, one queue, one tenant, or one worker (a host or manager). The flag is state that the
-- fetch script reads; the PUBLISH only tells idle workers to re-read it, so a forged or lost
-- message changes nothing by itself.
-- KEYS[1]  P:paused   KEYS[2] P:pausedq   KEYS[3] P:pausedt   KEYS[4] P:queues
-- KEYS[5]  P:pausedw
-- ARGV[1]  P   ARGV[2] scope ("all" | "queue" | "tenant" | "worker")   ARGV[3] "1" pause, "0" resume
-- ARGV[4]  queue or tenant name, or a worker's host ("web-1") or manager ("web-1:4242")
-- ARGV[5]  "1" = scope all, pause: also hand running tasks back (pause(requeue_running=True))
-- Reply: 1 when the state changed, 0 when it already was so.
--
-- A pause with requeue stores "requeue:<ms>" as the flag's value and publishes "pr"; a worker
-- aborts its running tasks on "pr" only when it reads that value (and the manager ends a process
-- whose tasks ignore it past cancel_grace, overdue.lua), so a forged "pr" during a plain pause
-- (value "1") or while running changes nothing. Running tasks are all aborted by the first "pr";
-- no task can start while paused, so the value left in place needs no reset until resume.
local P, scope, on, name, requeue = ARGV[1], ARGV[2], ARGV[3] == '1', ARGV[4], ARGV[5] == '1'
local changed
local event = on and 'p' or 'r'
if scope == 'all' then
  if on and requeue then
    local was = redis.call('GET', KEYS[1])
    changed = (was and string.sub(was, 1, 8) == 'requeue:') and 0 or 1
    if changed == 1 then redis.call('SET', KEYS[1], 'requeue:' .. now_ms()) end
    event = 'pr'
  elseif on then changed = redis.call('SET', KEYS[1], '1', 'NX') and 1 or 0
  else changed = redis.call('DEL', KEYS[1]) end
elseif scope == 'queue' then
  if on then changed = redis.call('SADD', KEYS[2], name) else changed = redis.call('SREM', KEYS[2], name) end
elseif scope == 'worker' then
  if on then changed = redis.call('SADD', KEYS[5], name) else changed = redis.call('SREM', KEYS[5], name) end
else
  if on then changed = redis.call('SADD', KEYS[3], name)
  else
    changed = redis.call('SREM', KEYS[3], name)
    -- the tenant left every ring while paused: re-admit it where it has ready work
    for _, q in ipairs(redis.call('SMEMBERS', KEYS[4])) do
      if redis.call('LLEN', P .. ':q:' .. q .. ':' .. name) > 0
         and redis.call('SADD', P .. ':ringset:' .. q, name) == 1 then
        redis.call('RPUSH', P .. ':ring:' .. q, name)
      end
    end
  end
end
redis.call('PUBLISH', P .. ':ev', event)
return changed
