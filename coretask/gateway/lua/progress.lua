-- progress.lua: ctx.set_progress(): store a running task's progress (fields pg, pt, pm).
-- KEYS[1]  P:t:<id>
-- ARGV[1]  token (attempt)   ARGV[2] done   ARGV[3] total ("" = unknown)   ARGV[4] message ("" = none)
-- Reply: 1 stored, 0 when the token is stale or the task no longer runs (or the record cannot be
-- read): a late write never recreates a finished task's hash.
local f = redis.pcall('HMGET', KEYS[1], 'a', 'st')
if f.err or f[1] ~= ARGV[1] or f[2] ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'pg', ARGV[2], 'pt', ARGV[3], 'pm', ARGV[4])
return 1
