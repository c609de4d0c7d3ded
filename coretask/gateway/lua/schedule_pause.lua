-- schedule_pause.lua: pause or resume one cron schedule.
-- KEYS[1]  P:s:<id>
-- ARGV[1]  id   ARGV[2] "1" pause, "0" resume
-- ARGV[3]  the tenant the caller claims ("" = any); another tenant's schedule is treated as
--          unknown and nothing changes
-- Reply: {code, now_ms}; code 1 = the state changed, 0 = it already was so, -2 = no such schedule.
--
-- A paused schedule keeps its definition and its place in P:sdue: its ticks still move on, one
-- by one, but schedule_tick.lua enqueues no run for them (counted in np), so resuming enqueues
-- the next tick's run and never a backlog of the ticks missed. The pause is the field ps (the
-- time it was paused, ms), which schedule_upsert.lua leaves in place: an application that
-- upserts its schedules at every start does not undo an operator's pause. Triggering a paused
-- schedule still enqueues a run (an explicit request).
local on, tenant = ARGV[2] == '1', ARGV[3]
local now = now_ms()
local owner = redis.call('HGET', KEYS[1], 'tn')
if not owner or (tenant ~= '' and owner ~= tenant) then return {-2, now} end
if on then
  return {redis.call('HSETNX', KEYS[1], 'ps', now), now}
end
return {redis.call('HDEL', KEYS[1], 'ps'), now}
