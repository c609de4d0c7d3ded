-- schedule_due.lua: the server clock, the global pause flag, and the schedules whose
-- tick is due, with what a worker needs to compute each one's next tick (coretask/cron.py).
-- KEYS[1]  P:sdue   KEYS[2] P:paused
-- ARGV[1]  P        ARGV[2] max due schedules to return (0 = only the clock and flags)
-- Reply: {now_ms, paused (0|1), next_ms, entry...}: next_ms is the earliest tick after now
--   (-1 = none); each entry is {id, tick ms, cron, timezone, seconds ("1"|"0"), version}.
--   While paused no entries are returned: ticks stay where they are until resume.
-- Writes nothing, except dropping a due entry whose schedule hash is gone (a repair).
local P, limit = ARGV[1], tonumber(ARGV[2])
local now = now_ms()
local out = {now, 0, -1}
local later = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
if later[2] then out[3] = tonumber(later[2]) end
if redis.call('EXISTS', KEYS[2]) == 1 then out[2] = 1; return out end
if limit <= 0 then return out end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
for i = 1, #due, 2 do
  local f = redis.call('HMGET', P .. ':s:' .. due[i], 'cr', 'tz', 'sec', 'v')
  if f[1] then
    out[#out+1] = {due[i], due[i+1], f[1], f[2], f[3] or '0', f[4] or '0'}
  else
    redis.call('ZREM', KEYS[1], due[i])   -- a tick without its schedule: never fires again
  end
end
return out
