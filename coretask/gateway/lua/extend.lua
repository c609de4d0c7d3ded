-- extend.lua: ctx.extend_lock(): push one running task's lease deadline to now + ARGV[3].
-- KEYS[1]  P:t:<id>   KEYS[2] P:leases
-- ARGV[1]  task id    ARGV[2] token (attempt)   ARGV[3] lease ms from now
-- Reply: the new deadline in ms, or 0 when the token is stale (the lease was lost), or when the
-- record cannot be read (a key of another type: the task's next answer takes it out).
local f = redis.pcall('HMGET', KEYS[1], 'a', 'st')
if f.err or f[1] ~= ARGV[2] or f[2] ~= 'running' then return 0 end
local deadline = now_ms() + tonumber(ARGV[3])
redis.call('ZADD', KEYS[2], 'XX', deadline, ARGV[1])
return deadline
