-- dead_retry.lua: move dead-lettered tasks of one queue back to work, oldest first, with a
-- fresh retry budget and crash budget (field cr). A task of a batch re-opens the batch
-- (failed -1, remaining +1), so a success continuation that has not run yet runs once the batch then succeeds. Tasks of a
-- canceled batch are discarded instead. A task whose batch was deleted meanwhile (retention)
-- goes back to work as a task of no batch. A keyed task takes back its idempotency key when that
-- key is free or still names it (_lib.lua reclaim_key).
-- A damaged dead letter (_lib.lua read_task: its q is not this queue, no usable tn) cannot go
-- back to work: it stays in the list, at the head, with et = CorruptTask and the reason in em;
-- a key that is missing or not a hash leaves the list for P:quarantine.
-- KEYS[1]  P:dead:<queue>
-- ARGV[1]  P   ARGV[2] retries to grant   ARGV[3] max tasks to move (0 = all)
-- Reply: number of tasks moved back to work.
local P = ARGV[1]
local max = tonumber(ARGV[3])
local queue = string.sub(KEYS[1], #P + 7)     -- KEYS[1] is P .. ':dead:' .. queue
local now = now_ms()
local n = 0
local kept = {}
while max == 0 or n < max do
  local id = redis.call('LPOP', KEYS[1])
  if not id then break end
  local tkey = P .. ':t:' .. id
  local f, bad, kind = read_task(P, id, {'q', 'tn', 'b'}, {q = queue, tn = true})
  if bad then
    if kind == 'hash' then
      kept[#kept+1] = id
      redis.call('HSET', tkey, 'et', 'CorruptTask', 'em', bad)
    else
      set_aside(P, id, bad, nil, nil, now)
    end
    f = {}
  end
  if f[1] then
    redis.call('HINCRBY', P .. ':ts:' .. f[2], 'dead', -1)
    if batch_canceled(P, f[3]) then
      redis.call('DEL', tkey)
    else
      if f[3] and f[3] ~= '' then
        local bkey = P .. ':b:' .. f[3]
        if redis.call('EXISTS', bkey) == 1 then
          redis.call('HINCRBY', bkey, 'failed', -1)
          redis.call('HINCRBY', bkey, 'remaining', 1)
          local state = redis.call('HGET', bkey, 'state')
          if state ~= 'running' then
            count_batch_state(P, f[2], state, 'running')
            redis.call('HSET', bkey, 'state', 'running')
            redis.call('HDEL', bkey, 'ended')
            redis.call('ZREM', P .. ':bend', f[3])
          end
        else
          redis.call('HDEL', tkey, 'b')    -- fetch refuses a task naming a batch that does not exist
        end
      end
      redis.call('HINCRBY', P .. ':ts:' .. f[2], 'failed', -1)
      redis.call('HSET', tkey, 'r', ARGV[2])
      forget_attempt(tkey, 'et', 'em', 'etb', 'da', 'cr')
      reclaim_key(P, id)
      push_ready(P, f[1], f[2], id, false)
      n = n + 1
    end
  end
end
for j = #kept, 1, -1 do redis.call('LPUSH', KEYS[1], kept[j]) end
return n
