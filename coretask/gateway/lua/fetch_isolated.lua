-- fetch_isolated.lua: lease one isolated task (see crashed.lua) to the manager's isolation
-- worker, a process of one thread that runs nothing else meanwhile.
-- KEYS[1]  P:paused   KEYS[2] P:pausedt   KEYS[3] P:leases   KEYS[4] P:wl:<worker>   KEYS[5] P:trun
-- KEYS[6]  P:tlim       KEYS[7] P:pausedw
-- ARGV[1]  P   ARGV[2] worker id   ARGV[3] lease ms   ARGV[4] tasks wanted (0 or 1)
-- ARGV[5]  default tenant concurrency limit (0 = unlimited)   ARGV[6..] queue names
-- Reply: as fetch.lua's ({paused, -1, now_ms, then at most one task's 13 values}); paused is 2
--   when nothing was leased but isolated tasks wait behind a queue or tenant pause or a tenant
--   limit: the isolation worker then waits for them instead of ending (and being started again
--   by its manager, twice a second, for as long as they wait).
-- A paused processor, queue or worker (its host or manager) leases nothing; a task of a paused tenant, or of a tenant at its
-- concurrency limit, goes to the back of the list and waits like a queued task.
local P, worker, lease_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])
local now = now_ms()
local out = {0, -1, now}
if redis.call('EXISTS', KEYS[1]) == 1 or worker_paused(KEYS[7], worker) then out[1] = 1; return out end
if tonumber(ARGV[4]) <= 0 then return out end
local deflim = tonumber(ARGV[5])
local function at_limit(tenant)
  local limit = tonumber(redis.call('HGET', KEYS[6], tenant) or deflim)
  return limit > 0 and tonumber(redis.call('HGET', KEYS[5], tenant) or '0') >= limit
end
local held = false
for qi = 6, #ARGV do
  local queue = ARGV[qi]
  local list = P .. ':iso:' .. queue
  if redis.call('SISMEMBER', P .. ':pausedq', queue) == 1 then
    held = held or redis.call('LLEN', list) > 0
  else
    for _ = 1, redis.call('LLEN', list) do
      local id = redis.call('LPOP', list)
      local tkey = P .. ':t:' .. id
      local names = {'p', 's', 'tg', 'b', 'r', 'e', 'cb', 'sg', 'tn', 'st', 'to', 'kr'}
      local f, bad = read_task(P, id, names, {})
      if not bad and f[10] == 'isolated' then   -- it is to run: what running needs must be there
        f, bad = read_task(P, id, names, {p = true, s = true, tg = true, tn = true, r = true})
      end
      if bad and redis.call('EXISTS', tkey) == 1 then
        -- damaged while it waited: dead letter (or quarantine), its ready count undone here
        redis.call('HINCRBY', P .. ':qs:' .. queue, 'ready', -1)
        take_out(P, id, bad, {queue = queue, counted = true}, now)
      elseif f[10] ~= 'isolated' then
        -- gone (deleted, or its batch's retention ran): nothing to run
        if not f[1] then redis.call('HINCRBY', P .. ':qs:' .. queue, 'ready', -1) end
      elseif redis.call('SISMEMBER', KEYS[2], f[9]) == 1 or at_limit(f[9]) then
        redis.call('RPUSH', list, id)
        held = true
      else
        redis.call('HINCRBY', P .. ':qs:' .. queue, 'ready', -1)
        if batch_canceled(P, f[4]) then
          release_key(P, id)
          finish(P, id, 'canceled', now, 0)   -- counted canceled when its batch was
        else
          local attempt = redis.call('HINCRBY', tkey, 'a', 1)
          redis.call('HSET', tkey, 'st', 'running', 'w', worker, 'ls', now)
          redis.call('ZADD', KEYS[3], now + lease_ms, id)
          redis.call('HSET', KEYS[4], id, lease_entry(attempt, nil, true))   -- rare: acknowledged the long way
          redis.call('HINCRBY', KEYS[5], f[9], 1)
          redis.call('HINCRBY', P .. ':qs:' .. queue, 'inflight', 1)
          local shown, binfo = f[4], {}
          if f[4] and f[4] ~= '' then
            redis.call('HINCRBY', P .. ':b:' .. f[4], 'run', 1)
          elseif f[7] then
            shown = f[7]
          end
          if shown and shown ~= '' then binfo = redis.call('HGETALL', P .. ':b:' .. shown) end
          out[4] = id; out[5] = attempt; out[6] = f[1]; out[7] = f[2]; out[8] = f[3]; out[9] = queue
          out[10] = f[9]; out[11] = shown or ''; out[12] = f[5]; out[13] = f[6]; out[14] = binfo
          out[15] = {f[8] or '', f[9] or ''}; out[16] = {f[11] or '', f[12] or ''}
          return out
        end
      end
    end
  end
end
if held then out[1] = 2 end
return out
