-- tenant_limit.lua: set or clear one tenant's concurrency limit. A tenant that left rings while
-- at its old limit is re-admitted at once (release_tenant with n = 0 does exactly that).
-- KEYS[1]  P:tlim
-- ARGV[1]  P   ARGV[2] tenant   ARGV[3] limit (0 = back to the default)
-- Reply: 1
local P, tenant, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
if limit > 0 then redis.call('HSET', KEYS[1], tenant, limit) else redis.call('HDEL', KEYS[1], tenant) end
release_tenant(P, tenant, 0)
return 1
