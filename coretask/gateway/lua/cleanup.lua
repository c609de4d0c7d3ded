-- cleanup.lua: delete batches that ended more than `retention` ago, with all their keys.
-- Bounded per call; the caller repeats while the reply says more are due. A canceled batch
-- leaves a tombstone (state only) for one more retention period, so a task of it still waiting
-- in the delayed set is recognised and dropped instead of running.
-- KEYS[1]  P:bend
-- ARGV[1]  P   ARGV[2] retention ms   ARGV[3] max batches this call
-- Reply: number of batches deleted.
local P = ARGV[1]
local cutoff = now_ms() - tonumber(ARGV[2])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff, 'LIMIT', 0, tonumber(ARGV[3]))
for _, b in ipairs(ids) do
  local bkey = P .. ':b:' .. b
  local f = redis.call('HMGET', bkey, 'tn', 'state')
  local tenant = f[1]
  if tenant and f[2] then count_batch_state(P, tenant, f[2], nil) end
  for _, cid in ipairs(redis.call('LRANGE', bkey .. ':cont', 0, -1)) do
    redis.call('DEL', P .. ':t:' .. cid)
  end
  redis.call('DEL', bkey, bkey .. ':cont', bkey .. ':k', bkey .. ':r', bkey .. ':ids')
  if f[2] == 'canceled' then
    redis.call('HSET', bkey, 'state', 'canceled')
    redis.call('PEXPIRE', bkey, tonumber(ARGV[2]))
  end
  if tenant then redis.call('ZREM', P .. ':batches:' .. tenant, b) end
  redis.call('ZREM', KEYS[1], b)
end
-- P:bended is drained only by processes that have an on_batch_end hook: drop, oldest first,
-- the entries whose batch is gone, so the list stays bounded when no process has the hook
for _ = 1, tonumber(ARGV[3]) do
  local b = redis.call('LINDEX', P .. ':bended', 0)
  if not b or redis.call('HEXISTS', P .. ':b:' .. b, 'tn') == 1 then break end
  redis.call('LPOP', P .. ':bended')
end
return #ids
