-- fetch.lua: a worker's turn: acknowledge its finished tasks, promote due delayed tasks, then
-- lease up to N ready tasks to it.
-- KEYS[1]  P:paused     KEYS[2] P:pausedq    KEYS[3] P:pausedt    KEYS[4] P:delayed
-- KEYS[5]  P:leases     KEYS[6] P:wl:<worker> KEYS[7] P:trun      KEYS[8] P:tlim
-- KEYS[9]  P:pausedw (paused hosts and managers: _lib.lua worker_paused)
-- ARGV[1]  P            ARGV[2] worker id    ARGV[3] max tasks to lease (0 = only promote)
-- ARGV[4]  lease ms     ARGV[5] default tenant concurrency limit (0 = unlimited)
-- ARGV[6]  idle ms: when > 0 and nothing is leased (and nothing paused), the worker registers as
--          idle until now + idle ms, or the next due time if sooner (_lib.lua idle_register), and
--          waits on P:inbox:<worker> for a hand-off from enqueue.lua (0 = do not register)
-- ARGV[7]  n: how many acknowledgements follow; ARGV[8 .. 7 + 7n] their groups of seven, as
--          complete.lua takes them (_lib.lua acknowledge; their codes are not returned: a stale
--          or repeated one changes nothing, a damaged record is taken out as there)
-- ARGV[8 + 7n ..] queue names in priority order
-- Reply: {paused (0|1: everything, or this worker's host or manager), next_due_ms (-1 = none; = now_ms when the call stopped after dropping
--   500 tasks of canceled batches or damaged records, so the caller calls again at once), now_ms, task...} where each task is a flat
--   run of 13 values: id, attempt (lease token), payload, serializer, target, queue, tenant,
--   batch (for a continuation: the batch it continues), retries left, enqueued ms, and the
--   batch's fields (HGETALL, flat) as a nested array, sent with the first task of each batch
--   in the reply only (empty for the others, and for tasks without a batch); then, 12th, a
--   nested array {signature (field sg), tenant field tn of the task hash} ("" when absent),
--   which the worker checks before it reads the task (coretask/signing.py); 13th, a nested
--   array {time limit ms (field to), keep-result ms (field kr), due ms (field d, set when the
--   task was delayed; sent as stored, unchecked: only metrics read it)} ("" when absent).
-- A leased task's hash gets st = running, w = worker, ls = lease start ms (get_task's started).
--
-- Queues are tried in the order given (first non-empty wins); inside a queue, tenants are
-- served in turn from the queue's ring (O(1) per task); a turn that only dropped tasks of a
-- canceled batch is not spent, so such tasks leave the queue 500 a call, whatever else waits. Counters are updated once per call,
-- aggregated, and a batch's hash is read once per call, not once per task. Paused state, paused queues, paused
-- tenants and tenant concurrency limits are all checked here, so no worker anywhere can take a
-- task that a pause or a limit forbids, whatever happened to pub/sub.
-- The acknowledgements come first (the pause does not hold them back, and what they release
-- counts for the limits); the queues' in-flight and the tenants' running counts they lower are
-- written once, net of what this call leases (in a busy worker's turn the two cancel out).
local P, worker = ARGV[1], ARGV[2]
local want, lease_ms, deflim = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local idle_ms = tonumber(ARGV[6])
local QFIRST = 8 + 7 * tonumber(ARGV[7])   -- the first queue name
local now = now_ms()
-- the numbers a lease writes, as strings once per call: Lua turns a number into a string with
-- sprintf (~0.5 us each, several per task otherwise; docs/benchmarks.md)
local now_s, deadline_s = tostring(now), tostring(now + lease_ms)
local MAX_DROPPED = 500
local batches = {}    -- batch id -> {h = HGETALL, state, started, runs}: read once per call
local per_tenant, per_queue_ready, per_queue_run = {}, {}, {}
acknowledge(P, worker, KEYS[5], KEYS[6], ARGV, 8, QFIRST - 1, now, {inflight = per_queue_run, running = per_tenant})

-- the counts this call changed, each written once (at every return)
local function write_counts()
  for t, n in pairs(per_tenant) do
    if n ~= 0 then add_running(P, t, n) end
  end
  for q, n in pairs(per_queue_ready) do redis.call('HINCRBY', P .. ':qs:' .. q, 'ready', -n) end
  for q, n in pairs(per_queue_run) do
    if n ~= 0 then redis.call('HINCRBY', P .. ':qs:' .. q, 'inflight', n) end
  end
  for b, e in pairs(batches) do
    if e.runs > 0 then
      redis.call('HINCRBY', P .. ':b:' .. b, 'run', e.runs)
      if not e.started then redis.call('HSET', P .. ':b:' .. b, 'started', now) end
    end
  end
end

-- 1. Due delayed tasks become ready (bounded per call; the caller loops while it gets work).
-- The earliest one is read first: with none due (the usual case) that is the only command.
local nxt = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
local due = {}
if nxt[2] and tonumber(nxt[2]) <= now then
  due = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, 200)
end
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[4], id)
  local f, bad = read_task(P, id, {'q', 'tn', 'b'}, {q = QUEUES, tn = true})
  if bad then   -- damaged record (_lib.lua): dead letter or quarantine, its delayed count undone
    take_out(P, id, bad, {delayed = true, counted = true}, now)
    f = {}
  end
  if f[1] then
    redis.call('HINCRBY', P .. ':qs:' .. f[1], 'delayed', -1)
    if batch_canceled(P, f[3]) then
      release_key(P, id)
      finish(P, id, 'canceled', now, 0)
    else push_ready(P, f[1], f[2], id, false) end
  end
end
if #due > 0 then nxt = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES') end
local next_due = -1
if nxt[2] then next_due = tonumber(nxt[2]) end

-- the pause, paused queues, tenants and workers, tenant limits: one command asks whether any exist
-- at all (the usual answer is no), and only then is each asked (empty sets and hashes do not exist)
local gated = redis.call('EXISTS', KEYS[1], KEYS[2], KEYS[3], KEYS[8], KEYS[9]) > 0
local out = {0, next_due, now}
if gated and (redis.call('EXISTS', KEYS[1]) == 1 or worker_paused(KEYS[9], worker)) then
  out[1] = 1; write_counts(); return out
end
if want <= 0 then write_counts(); return out end

local got = 0
local dropped = 0   -- tasks of canceled batches dropped (and damaged records taken out) by this call;
                    -- bounded like all work here
local limits = deflim > 0 or (gated and redis.call('EXISTS', KEYS[8]) == 1)
local any_tenant_paused = gated and redis.call('EXISTS', KEYS[3]) == 1
local wargs, zargs = {}, {}

local function batch_entry(b)
  local e = batches[b]
  if not e then
    local h = redis.call('HGETALL', P .. ':b:' .. b)
    e = {h = h, runs = 0}
    for j = 1, #h, 2 do
      if h[j] == 'state' then e.state = h[j+1] elseif h[j] == 'started' then e.started = true end
    end
    batches[b] = e
  end
  return e
end

-- what a lease reads of each task, and the rules it is read by (read once per queue, not per task)
local LEASE_FIELDS = {'p', 's', 'tg', 'b', 'r', 'e', 'cb', 'sg', 'tn', 'a', 'q', 'to', 'kr', 'd', 'ik', 'kt'}
for qi = QFIRST, #ARGV do
  local queue = ARGV[qi]
  local need = {p = true, s = true, tg = true, r = true, tn = true, q = queue, d = UNCHECKED}
  if not gated or redis.call('SISMEMBER', KEYS[2], queue) == 0 then
    local ring, ringset = P .. ':ring:' .. queue, P .. ':ringset:' .. queue
    while got < want and dropped < MAX_DROPPED do
      local head = redis.call('LRANGE', ring, 0, 1)   -- whose turn it is, and whether it is alone
      local tenant = head[1]
      if not tenant then break end
      local list = P .. ':q:' .. queue .. ':' .. tenant
      local room = want - got
      if any_tenant_paused and redis.call('SISMEMBER', KEYS[3], tenant) == 1 then
        -- paused tenant: leaves the ring; resume_tenant puts it back
        redis.call('LPOP', ring); redis.call('SREM', ringset, tenant)
        room = 0
      elseif limits then
        local limit = tonumber(redis.call('HGET', KEYS[8], tenant) or deflim)
        if limit > 0 then
          local running = tonumber(redis.call('HGET', KEYS[7], tenant) or '0') + (per_tenant[tenant] or 0)
          if running >= limit then
            -- at its concurrency limit: leaves the ring until one of its leases is dropped
            redis.call('LPOP', ring); redis.call('SREM', ringset, tenant)
            redis.call('SADD', P .. ':capped:' .. tenant, queue)
            room = 0
          elseif limit - running < room then
            room = limit - running
          end
        end
      end
      if room > 0 then
        -- one task per turn of the ring; several at once only when the tenant is alone in it
        local take = 1
        if room > 1 and not head[2] then take = room end
        local ids = redis.call('LPOP', list, take)
        local got_before = got
        for _, id in ipairs(ids or {}) do
          per_queue_ready[queue] = (per_queue_ready[queue] or 0) + 1
          local tkey = P .. ':t:' .. id
          local f, bad = read_task(P, id, LEASE_FIELDS, need)
          if not bad and f[4] and f[4] ~= '' and not batch_entry(f[4]).state then
            bad = "field 'b' (batch) names no batch: " .. quoted(f[4])
          end
          if bad then   -- damaged record (_lib.lua): dead letter or quarantine; ready is counted above
            take_out(P, id, bad, {queue = queue, tenant = tenant, counted = true}, now)
            dropped = dropped + 1   -- (bounded with the drops: neither is a lease)
            f = {}
          end
          if f[1] then
            local be = nil
            if f[4] and f[4] ~= '' then be = batch_entry(f[4]) end
            if be and be.state == 'canceled' then
              release_key(P, id)
              finish(P, id, 'canceled', now, 0)
              dropped = dropped + 1
            else
              -- the attempt (the lease token) read with the record, written with the state: one
              -- command (read_task checked that a present 'a' holds an integer)
              local attempt = next_attempt(f[10])
              redis.call('HSET', tkey, 'a', attempt, 'st', 'running', 'w', worker, 'ls', now_s)
              wargs[#wargs+1] = id
              wargs[#wargs+1] = lease_entry(attempt, f[4], f[13] or f[15] or f[16])
              zargs[#zargs+1] = deadline_s; zargs[#zargs+1] = id
              per_tenant[tenant] = (per_tenant[tenant] or 0) + 1
              per_queue_run[queue] = (per_queue_run[queue] or 0) + 1
              local binfo, shown = {}, f[4]
              if not be and f[7] then
                -- a continuation sees the batch it continues (it is not counted in it)
                shown = f[7]
                be = batch_entry(f[7])
              elseif be then
                be.runs = be.runs + 1
              end
              if be and not be.sent then binfo = be.h; be.sent = true end
              local n = #out
              out[n+1] = id; out[n+2] = attempt; out[n+3] = f[1]; out[n+4] = f[2]; out[n+5] = f[3]
              out[n+6] = queue; out[n+7] = tenant; out[n+8] = shown or ''; out[n+9] = f[5]
              out[n+10] = f[6]; out[n+11] = binfo; out[n+12] = {f[8] or '', f[9] or ''}
              out[n+13] = {f[12] or '', f[13] or '', f[14] or ''}
              got = got + 1
            end
          end
        end
        if ids and redis.call('LLEN', list) > 0 then
          -- its turn passes when it got a task (a tenant alone in the ring keeps it: nothing to
          -- move); a turn that only dropped tasks of canceled batches (or took out damaged
          -- records) is not spent, so a canceled batch leaves its queue at up to MAX_DROPPED a
          -- call, not one task per turn of the ring while other tenants have work
          if take == 1 and got > got_before then redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT') end
        else
          redis.call('LPOP', ring); redis.call('SREM', ringset, tenant)
        end
      end
    end
  end
  if got >= want or dropped >= MAX_DROPPED then break end
end
if #zargs > 0 then
  redis.call('ZADD', KEYS[5], unpack(zargs))
  redis.call('HSET', KEYS[6], unpack(wargs))
end
write_counts()
if dropped >= MAX_DROPPED then
  -- more canceled tasks may wait: report a due time of now so that the worker calls again at once
  out[2] = now
elseif got == 0 and idle_ms > 0 then
  -- every thread of the worker is free and nothing is ready for it: it waits on its inbox until
  -- the deadline (or the next due delayed task), and enqueue.lua hands it a new task directly
  local deadline = now + idle_ms
  if next_due ~= -1 and next_due < deadline then deadline = next_due end
  local queues = {}
  for qi = QFIRST, #ARGV do queues[#queues+1] = ARGV[qi] end
  idle_register(P, worker, deadline, lease_ms, deflim, queues)
end
return out
