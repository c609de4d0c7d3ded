-- batch_commit.lua: make a staged batch (or an append to one) real, in one O(continuations) step.
-- KEYS[1]  P:b:<batch>            KEYS[2] P:b:<batch>:s:<stage>   KEYS[3] P:b:<batch>:c:<stage>
-- KEYS[4]  P:b:<batch>:p:<stage>  KEYS[5] P:publishing            KEYS[6] P:batches:<tenant>
-- KEYS[7]  P:b:<batch>:cont       KEYS[8] P:b:<batch>:k (ids of the stages committed)
-- ARGV[1]  P   ARGV[2] batch id   ARGV[3] stage id   ARGV[4] tenant   ARGV[5] queue
-- ARGV[6]  scope   ARGV[7] mode ("create" | "append")   ARGV[8] tasks staged (continuations
--          excluded)   ARGV[9] continuations staged   ARGV[10] cancel key (mode create: a
--          random token that cancel_batch publishes and workers compare, see worker/control.py)
-- Reply: 1 = committed (now, or by an earlier send of this same call whose reply was lost),
--        0 = append refused (unknown batch, other tenant's, or canceled),
--        -1 = staged data incomplete (expired before commit): nothing was committed.
--
-- The staged task list is renamed into a publication list; batch_publish then moves the
-- tasks to their queues in bounded chunks, run by the producer and, should it die, by any
-- worker's maintenance loop (P:publishing). From this script on every staged task is counted
-- in the batch, so total == done + failed + canceled + remaining holds throughout.
local P, batch, stage, tenant, mode = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[7]
local ntasks, nconts = tonumber(ARGV[8]), tonumber(ARGV[9])
if redis.call('SISMEMBER', KEYS[8], stage) == 1 then return 1 end
if redis.call('LLEN', KEYS[2]) ~= ntasks or redis.call('LLEN', KEYS[3]) ~= nconts then return -1 end
local now = now_ms()
if mode == 'append' then
  local f = redis.call('HMGET', KEYS[1], 'tn', 'state')
  if not f[1] or f[1] ~= tenant or f[2] == 'canceled' then return 0 end
  if ntasks > 0 and f[2] ~= 'running' then
    -- re-open a finished batch; continuations that already ran are gone from :cont
    count_batch_state(P, tenant, f[2], 'running')
    redis.call('HSET', KEYS[1], 'state', 'running')
    redis.call('HDEL', KEYS[1], 'ended')
    redis.call('ZREM', P .. ':bend', batch)
  end
else
  redis.call('HSET', KEYS[1], 'tn', tenant, 'q', ARGV[5], 'sc', ARGV[6], 'state', 'running',
             'ck', ARGV[10], 'created', now, 'total', 0, 'done', 0, 'failed', 0, 'canceled', 0,
             'remaining', 0, 'run', 0, 'dur', 0)
  redis.call('ZADD', KEYS[6], now, batch)
  redis.call('ZADD', P .. ':tenants', 'NX', 0, tenant)
  count_batch_state(P, tenant, nil, 'running')
end
redis.call('HINCRBY', KEYS[1], 'total', ntasks)
redis.call('HINCRBY', KEYS[1], 'remaining', ntasks)
for _, cid in ipairs(redis.call('LRANGE', KEYS[3], 0, -1)) do
  local f, bad = read_task(P, cid, {'q', 'tn'}, {q = true, tn = true})
  if bad then
    -- a damaged continuation (_lib.lua) never joins the batch: dead letter or quarantine
    set_aside(P, cid, bad, nil, nil, now)
  else
    redis.call('PERSIST', P .. ':t:' .. cid)
    redis.call('HSET', P .. ':t:' .. cid, 'st', 'waiting')
    redis.call('SADD', P .. ':queues', f[1])
    redis.call('RPUSH', KEYS[7], cid)
  end
end
redis.call('DEL', KEYS[3])
if ntasks > 0 then
  redis.call('RENAME', KEYS[2], KEYS[4])
  redis.call('PERSIST', KEYS[4])
  redis.call('SADD', KEYS[5], batch .. ':' .. stage)
end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'running' then
  close_batch_if_done(P, batch, now)
elseif nconts > 0 then
  -- continuations appended to a batch that already finished run now if their condition holds
  release_continuations(P, batch, tonumber(redis.call('HGET', KEYS[1], 'failed') or '0'))
end
redis.call('SADD', KEYS[8], stage)
return 1
