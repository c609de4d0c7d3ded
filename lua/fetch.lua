-- fetch.lua: promote due delayed tasks, then lease up to N ready tasks to one worker.
-- Queues are tried in the order given (first non-empty wins); inside a queue, tenants are
-- served in turn from the queue's ring (O(1) per task). Paused state, paused queues, paused
-- tenants and tenant concurrency limits are all checked here, so no worker anywhere can take a
-- task that a pause or a limit forbids, whatever happened to pub/sub.
-- KEYS[1]  P:paused     KEYS[2] P:pausedq    KEYS[3] P:pausedt    KEYS[4] P:delayed
-- KEYS[5]  P:leases     KEYS[6] P:w:<worker> KEYS[7] P:trun       KEYS[8] P:tlim
-- ARGV[1]  P            ARGV[2] worker id    ARGV[3] max tasks to lease (0 = only promote)
-- ARGV[4]  lease ms     ARGV[5] default tenant concurrency limit (0 = unlimited)
-- ARGV[6..] queue names in priority order
-- Reply: {paused (0|1), next_due_ms (-1 = none), now_ms, task...} where each task is a flat
--   run of 11 values: id, attempt (lease token), payload, serializer, target, queue, tenant,
--   batch (for a continuation: the batch it continues), retries left, enqueued ms, and the
--   batch's fields (HGETALL, flat) as a nested array (empty when the task has no batch).
local P, worker = ARGV[1], ARGV[2]
local want, lease_ms, deflim = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_ms()

-- 1. Due delayed tasks become ready (bounded per call; the caller loops while it gets work).
local due = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, 200)
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[4], id)
  local f = redis.call('HMGET', P .. ':t:' .. id, 'q', 'tn', 'b')
  if f[1] then
    redis.call('HINCRBY', P .. ':qs:' .. f[1], 'delayed', -1)
    if batch_canceled(P, f[3]) then redis.call('DEL', P .. ':t:' .. id)
    else push_ready(P, f[1], f[2], id, false) end
  end
end
local nxt = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
local next_due = -1
if nxt[2] then next_due = tonumber(nxt[2]) end

local out = {0, next_due, now}
if redis.call('EXISTS', KEYS[1]) == 1 then out[1] = 1; return out end
if want <= 0 then return out end

local got = 0
for qi = 6, #ARGV do
  local queue = ARGV[qi]
  if redis.call('SISMEMBER', KEYS[2], queue) == 0 then
    local ring, ringset = P .. ':ring:' .. queue, P .. ':ringset:' .. queue
    while got < want do
      local tenant = redis.call('LINDEX', ring, 0)
      if not tenant then break end
      local limit = tonumber(redis.call('HGET', KEYS[8], tenant) or deflim)
      local list = P .. ':q:' .. queue .. ':' .. tenant
      local id = false
      if redis.call('SISMEMBER', KEYS[3], tenant) == 1 then
        -- paused tenant: leaves the ring; resume_tenant puts it back
        redis.call('LPOP', ring); redis.call('SREM', ringset, tenant)
      elseif limit > 0 and tonumber(redis.call('HGET', KEYS[7], tenant) or '0') >= limit then
        -- at its concurrency limit: leaves the ring until one of its leases is dropped
        redis.call('LPOP', ring); redis.call('SREM', ringset, tenant)
        redis.call('SADD', P .. ':capped:' .. tenant, queue)
      else
        id = redis.call('LPOP', list)
        if id and redis.call('LLEN', list) > 0 then
          redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
        else
          redis.call('LPOP', ring); redis.call('SREM', ringset, tenant)
        end
      end
      if id then
        redis.call('HINCRBY', P .. ':qs:' .. queue, 'ready', -1)
        local tkey = P .. ':t:' .. id
        local f = redis.call('HMGET', tkey, 'p', 's', 'tg', 'b', 'r', 'e', 'cb')
        if f[1] then
          if batch_canceled(P, f[4]) then
            redis.call('DEL', tkey)
          else
            local attempt = redis.call('HINCRBY', tkey, 'a', 1)
            redis.call('HSET', tkey, 'st', 'running', 'w', worker, 'ls', now)
            redis.call('ZADD', KEYS[5], now + lease_ms, id)
            redis.call('SADD', KEYS[6], id)
            redis.call('HINCRBY', KEYS[7], tenant, 1)
            redis.call('HINCRBY', P .. ':qs:' .. queue, 'inflight', 1)
            local binfo = {}
            local shown = f[4]
            if f[4] and f[4] ~= '' then
              local bkey = P .. ':b:' .. f[4]
              redis.call('HINCRBY', bkey, 'run', 1)
              if not redis.call('HGET', bkey, 'started') then redis.call('HSET', bkey, 'started', now) end
              binfo = redis.call('HGETALL', bkey)
            elseif f[7] then
              -- a continuation sees the batch it continues (it is not counted in it)
              shown = f[7]
              binfo = redis.call('HGETALL', P .. ':b:' .. f[7])
            end
            local n = #out
            out[n+1] = id; out[n+2] = attempt; out[n+3] = f[1]; out[n+4] = f[2]; out[n+5] = f[3]
            out[n+6] = queue; out[n+7] = tenant; out[n+8] = shown or ''; out[n+9] = f[5]
            out[n+10] = f[6]; out[n+11] = binfo
            got = got + 1
          end
        end
      end
    end
  end
  if got >= want then break end
end
return out
