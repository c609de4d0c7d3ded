-- renew.lua: extend the leases of every task leased to one live worker process, and record the
-- worker's heartbeat. Called by the manager for each child it sees alive, so a task that holds
-- the GIL in C code cannot lose its lease. A lease is never shortened (ZADD GT), so a longer
-- ctx.extend_lock() survives renewals.
-- KEYS[1]  P:leases   KEYS[2] P:wl:<worker>   KEYS[3] P:workers (hash worker -> heartbeat ms)
-- ARGV[1]  lease ms   ARGV[2] worker id
-- Reply: number of leases renewed.
local now = now_ms()
redis.call('HSET', KEYS[3], ARGV[2], now)
local ids = redis.call('HKEYS', KEYS[2])
local deadline = now + tonumber(ARGV[1])
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], 'XX', 'GT', deadline, id)
end
return #ids
