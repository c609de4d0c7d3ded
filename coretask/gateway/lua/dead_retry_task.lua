-- dead_retry_task.lua: move one dead-lettered task back to work with a fresh retry budget and
-- crash budget (field cr), as dead_retry.lua does for a queue's oldest: a task of a batch
-- re-opens the batch (failed -1, remaining +1) and counts no longer as failed for its tenant.
-- A task of a canceled batch is discarded instead. It takes back the idempotency key it held
-- when that key is free or still names it (_lib.lua reclaim_key).
-- KEYS[1]  P:t:<id>
-- ARGV[1]  P   ARGV[2] task id   ARGV[3] tenant the caller claims ("" = any)
-- ARGV[4]  retries to grant
-- Reply: 1 = moved back to work, 2 = discarded (its batch was canceled), 0 = unknown, another
--        tenant's, or not dead.
local P, id = ARGV[1], ARGV[2]
local f = redis.call('HMGET', KEYS[1], 'st', 'q', 'tn', 'b')
local st, queue, tenant, batch = f[1], f[2], f[3], f[4]
if st ~= 'dead' or (ARGV[3] ~= '' and tenant ~= ARGV[3]) then return 0 end
if redis.call('LREM', P .. ':dead:' .. queue, 1, id) == 0 then return 0 end
redis.call('HINCRBY', P .. ':ts:' .. tenant, 'dead', -1)
if batch_canceled(P, batch) then
  redis.call('DEL', KEYS[1])
  return 2
end
if batch and batch ~= '' then
  local bkey = P .. ':b:' .. batch
  if redis.call('EXISTS', bkey) == 1 then
    redis.call('HINCRBY', bkey, 'failed', -1)
    redis.call('HINCRBY', bkey, 'remaining', 1)
    local state = redis.call('HGET', bkey, 'state')
    if state ~= 'running' then
      count_batch_state(P, tenant, state, 'running')
      redis.call('HSET', bkey, 'state', 'running')
      redis.call('HDEL', bkey, 'ended')
      redis.call('ZREM', P .. ':bend', batch)
    end
  else
    redis.call('HDEL', KEYS[1], 'b')    -- its batch was deleted (retention): fetch refuses a task naming none
  end
end
redis.call('HINCRBY', P .. ':ts:' .. tenant, 'failed', -1)
redis.call('HSET', KEYS[1], 'r', ARGV[4])
forget_attempt(KEYS[1], 'et', 'em', 'etb', 'da', 'cr')
reclaim_key(P, id)
push_ready(P, queue, tenant, id, false)
return 1
