-- pause.lua: pause or resume everything, one queue, or one tenant. The flag is state that the
-- fetch script reads; the PUBLISH only tells idle workers to re-read it, so a forged or lost
-- message changes nothing by itself.
-- KEYS[1]  P:paused   KEYS[2] P:pausedq   KEYS[3] P:pausedt   KEYS[4] P:queues
-- ARGV[1]  P   ARGV[2] scope ("all" | "queue" | "tenant")   ARGV[3] "1" pause, "0" resume
-- ARGV[4]  queue or tenant name (scopes queue and tenant)
-- Reply: 1 when the state changed, 0 when it already was so.
local P, scope, on, name = ARGV[1], ARGV[2], ARGV[3] == '1', ARGV[4]
local changed
if scope == 'all' then
  if on then changed = redis.call('SET', KEYS[1], '1', 'NX') and 1 or 0
  else changed = redis.call('DEL', KEYS[1]) end
elseif scope == 'queue' then
  if on then changed = redis.call('SADD', KEYS[2], name) else changed = redis.call('SREM', KEYS[2], name) end
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
redis.call('PUBLISH', P .. ':ev', on and 'p' or 'r')
return changed
