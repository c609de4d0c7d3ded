-- schedule_upsert.lua: create or replace a cron schedule. The next tick is computed by the
-- client (coretask/cron.py) from the server time and passed in; replacing a schedule bumps its
-- version, so a worker that read the old cron and is about to claim a tick loses its
-- compare-and-set even if the new next tick happens to equal the old one.
-- KEYS[1]  P:s:<id>          the schedule's hash
-- KEYS[2]  P:sdue            zset of schedule ids by next due ms
-- KEYS[3]  P:sched:<tenant>  zset of the tenant's schedule ids (score 0: ordered by id)
-- ARGV[1]  P   ARGV[2] id   ARGV[3] tenant   ARGV[4] queue   ARGV[5] scope ('' = none)
-- ARGV[6]  cron expression   ARGV[7] IANA timezone   ARGV[8] seconds field ("1" | "0")
-- ARGV[9]  unique ("1" | "0")   ARGV[10] expire ms (0 = never)
-- ARGV[11] payload   ARGV[12] serializer   ARGV[13] target   ARGV[14] retries
-- ARGV[15] next due ms
-- ARGV[16] signature of the schedule (field sg, copied to every run; "" or absent = unsigned)
-- ARGV[17..19] controls of every run: time limit, keep-result, retention ms (fields to, kr, kt)
-- Reply: {code, now_ms}; code 1 = created, 2 = replaced, -1 = the id belongs to another tenant
--   (nothing written).
local P, id, tenant = ARGV[1], ARGV[2], ARGV[3]
local now = now_ms()
local owner = redis.call('HGET', KEYS[1], 'tn')
if owner and owner ~= tenant then return {-1, now} end
local code = 1
if owner then code = 2 end
redis.call('HINCRBY', KEYS[1], 'v', 1)
redis.call('HSET', KEYS[1], 'tn', tenant, 'q', ARGV[4], 'sc', ARGV[5], 'cr', ARGV[6], 'tz', ARGV[7],
           'sec', ARGV[8], 'u', ARGV[9], 'x', ARGV[10], 'p', ARGV[11], 's', ARGV[12], 'tg', ARGV[13],
           'r', ARGV[14], 'up', now)
if code == 1 then redis.call('HSET', KEYS[1], 'cd', now) end
if ARGV[16] and ARGV[16] ~= '' then redis.call('HSET', KEYS[1], 'sg', ARGV[16])
else redis.call('HDEL', KEYS[1], 'sg') end
redis.call('HDEL', KEYS[1], 'to', 'kr', 'kt')
set_controls(KEYS[1], ARGV[17], ARGV[18], ARGV[19])
redis.call('ZADD', KEYS[2], tonumber(ARGV[15]), id)
redis.call('ZADD', KEYS[3], 0, id)
redis.call('ZADD', P .. ':tenants', 'NX', 0, tenant)   -- listed by get_tenants like any tenant with work
redis.call('PUBLISH', P .. ':ev', 's')
return {code, now}
