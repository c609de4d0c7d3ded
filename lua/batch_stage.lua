-- batch_stage.lua: write one chunk of a batch being built (or appended to). Staged tasks are
-- invisible to workers and expire on their own, so a producer that crashes or meets a Redis
-- error before batch_commit leaves nothing behind (batch_abort removes them at once when the
-- producer is still alive to do it).
-- KEYS[1]  P:b:<batch>:s:<stage>   staged task ids      KEYS[2] P:b:<batch>:c:<stage> staged
--          continuation ids        KEYS[3] P:queues (not written here: a staged batch that is
--          aborted must leave nothing behind; publish and commit register the queues)
-- ARGV[1]  P   ARGV[2] ttl ms of the staged data   ARGV[3] batch id
-- ARGV[4..] groups of 10: id, queue, tenant, payload, serializer, target, retries,
--           due ms (0 = ready at once), continuation condition ("" for a task of the batch,
--           else "success" | "complete"), signature (field sg, "" = unsigned)
-- Reply: number of entries staged.
local P, ttl, batch = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local now = now_ms()
local n = 0
for i = 4, #ARGV, 10 do
  local tkey = P .. ':t:' .. ARGV[i]
  redis.call('HSET', tkey, 'q', ARGV[i+1], 'tn', ARGV[i+2], 'p', ARGV[i+3], 's', ARGV[i+4],
             'tg', ARGV[i+5], 'r', ARGV[i+6], 'a', 0, 'd', ARGV[i+7], 'e', now, 'st', 'staged')
  if ARGV[i+8] == '' then
    redis.call('HSET', tkey, 'b', batch)
    redis.call('RPUSH', KEYS[1], ARGV[i])
  else
    redis.call('HSET', tkey, 'on', ARGV[i+8], 'cb', batch)
    redis.call('RPUSH', KEYS[2], ARGV[i])
  end
  if ARGV[i+9] ~= '' then redis.call('HSET', tkey, 'sg', ARGV[i+9]) end
  redis.call('PEXPIRE', tkey, ttl)
  n = n + 1
end
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return n
