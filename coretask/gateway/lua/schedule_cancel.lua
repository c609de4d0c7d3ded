-- schedule_cancel.lua: delete a schedule of one tenant. Runs it already enqueued stay queued.
-- KEYS[1]  P:s:<id>   KEYS[2] P:sdue
-- ARGV[1]  P   ARGV[2] id   ARGV[3] tenant
-- Reply: 1 = deleted, 0 = unknown id or another tenant's schedule (nothing changed).
local P, id, tenant = ARGV[1], ARGV[2], ARGV[3]
if redis.call('HGET', KEYS[1], 'tn') ~= tenant then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], id)
redis.call('ZREM', P .. ':sched:' .. tenant, id)
return 1
