-- cancel_batch.lua: cancel a batch at once. Tasks that are not running (queued, delayed,
-- retrying, not yet published) are counted canceled right here and dropped wherever a script
-- meets them later; running tasks are counted when their worker acknowledges the abort.
-- Continuations never run.
-- KEYS[1]  P:b:<batch>   KEYS[2] P:bend
-- ARGV[1]  P   ARGV[2] batch id   ARGV[3] tenant the caller claims ("" = any)
-- Reply: 1 = canceled now, 0 = unknown, other tenant's, or already finished/canceled.
-- Publishes "c:<batch>:<cancel key>" (field ck, known to the workers that run the batch's
-- tasks), so they abort without reading the batch back (worker/control.py).
local P, batch = ARGV[1], ARGV[2]
local f = redis.call('HMGET', KEYS[1], 'tn', 'state', 'remaining', 'run', 'ck')
if not f[1] or (ARGV[3] ~= '' and f[1] ~= ARGV[3]) or f[2] ~= 'running' then return 0 end
local now = now_ms()
local running = math.max(tonumber(f[4] or '0'), 0)
local dropped = tonumber(f[3]) - running
redis.call('HINCRBY', KEYS[1], 'canceled', dropped)
redis.call('HINCRBY', P .. ':ts:' .. f[1], 'canceled', dropped)
count_batch_state(P, f[1], 'running', 'canceled')
redis.call('HSET', KEYS[1], 'remaining', running, 'state', 'canceled', 'ended', now)
redis.call('ZADD', KEYS[2], now, batch)
redis.call('RPUSH', P .. ':bended', batch)
for _, cid in ipairs(redis.call('LRANGE', P .. ':b:' .. batch .. ':cont', 0, -1)) do
  redis.call('DEL', P .. ':t:' .. cid)
end
redis.call('DEL', P .. ':b:' .. batch .. ':cont')
redis.call('PUBLISH', P .. ':ev', 'c:' .. batch .. ':' .. (f[5] or ''))
return 1
