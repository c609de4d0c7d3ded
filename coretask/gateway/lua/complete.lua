-- complete.lua: acknowledge finished tasks of one worker (many per call): succeeded or canceled.
-- An acknowledgement counts only if it presents the task's current lease token, as the worker's
-- lease entry holds it (_lib.lua lease_entry), so an answer from a worker whose lease expired
-- changes nothing. The entries of every acknowledged task are read at once; the record of a task
-- without an idempotency key or a kept result or record (its queue and tenant named; its batch,
-- if any, in the entry) is then deleted unread, and all of them in one DEL, so such an
-- acknowledgement costs no command of its own. The others read their records as before, which
-- also meets a damaged one. Counter updates are aggregated per queue, tenant and batch.
-- KEYS[1]  P:leases   KEYS[2] P:wl:<worker>
-- ARGV[1]  P         ARGV[2] worker id
-- ARGV[3..] groups of seven: id, token (attempt), outcome ("ok" | "canceled"), duration ms,
--           queue and tenant the fetch reply named (where fetch counted the task; "" = unknown:
--           the record's q and tn are used), the encoded return value ("" = none, or not kept)
-- Reply: array of codes, one per task: 1 = counted, 0 = stale token or unknown task (ignored),
--        2 = this worker's lease on a damaged record: taken out (_lib.lua take_out) instead.
-- A canceled task of no batch is counted in its tenant's statistics (a batch's task: in its
-- batch, which counts the tenant). A keyed task gives up its idempotency key (release_key). A
-- task that keeps its result or record (fields kr, kt) stays as a finished record (finish).
-- Each queue's acknowledgements count once in the minute's history (P:h:<minute>).
local P, worker = ARGV[1], ARGV[2]
local now = now_ms()
local codes, ids, gone, seen = {}, {}, {}, {}
local per_queue, per_tenant, per_tenant_done, per_batch = {}, {}, {}, {}
local per_tenant_canceled = {}
-- q and tn last: read only when the worker could not name them (the fetch reply did)
local ACK_FIELDS, ACK_FIELDS_QT = {'a', 'st', 'b', 'ik', 'kr', 'kt'}, {'a', 'st', 'b', 'ik', 'kr', 'kt', 'q', 'tn'}
local ACK_NEED = {a = true, st = true}
local asked = {}
for i = 3, #ARGV, 7 do asked[#asked+1] = ARGV[i] end
local entries = {}
if #asked > 0 then entries = redis.call('HMGET', KEYS[2], unpack(asked)) end
for i = 3, #ARGV, 7 do
  local id, token = ARGV[i], ARGV[i+1]
  local queue, tenant = named(ARGV[i+4]), named(ARGV[i+5])
  local tkey = P .. ':t:' .. id
  local vouched, batch = lease_entry_batch(entries[(i - 3) / 7 + 1], token)
  local f, bad
  if seen[id] then
    f = {}   -- a repeat inside one call: ignored (its record goes in the DEL below, counted once)
  elseif vouched and queue and tenant then
    f = {token, 'running', batch}   -- the lease itself: running, this token and batch; nothing to read
  elseif queue and tenant then
    f, bad = read_task(P, id, ACK_FIELDS, ACK_NEED)
    bad = check_leased(P, worker, id, f, bad)
  else
    f, bad = read_task(P, id, ACK_FIELDS_QT, {a = true, st = true, q = not queue and QUEUES or nil,
                                              tn = not tenant or nil})
    bad = check_leased(P, worker, id, f, bad)
  end
  if bad then
    if owns_lease(P, worker, id, token, f) then
      local how = ARGV[i+2] == 'ok' and 'succeeded' or 'was canceled'
      take_out(P, id, bad, {worker = worker, queue = queue, tenant = tenant, counted = true,
                            etb = 'the task ran and ' .. how .. ' after ' .. ARGV[i+3] .. ' ms; its record was '
                                  .. 'damaged when it was acknowledged'}, now)
      codes[#codes+1] = 2
    else
      codes[#codes+1] = 0
    end
  elseif f[1] == token and f[2] == 'running' then
    queue, tenant = queue or f[7], tenant or f[8]
    if f[4] then release_key(P, id) end
    if f[5] or f[6] then
      local result = {}
      if ARGV[i+6] ~= '' then result = {'rv', ARGV[i+6]} end
      finish(P, id, ARGV[i+2] == 'ok' and 'succeeded' or 'canceled', now, tonumber(ARGV[i+3]), f[5], f[6], result)
    else
      gone[#gone+1] = tkey
    end
    ids[#ids+1] = id
    seen[id] = true
    per_queue[queue] = (per_queue[queue] or 0) + 1
    per_tenant[tenant] = (per_tenant[tenant] or 0) + 1
    if ARGV[i+2] == 'ok' then per_tenant_done[tenant] = (per_tenant_done[tenant] or 0) + 1 end
    if ARGV[i+2] ~= 'ok' and (not f[3] or f[3] == '') then
      per_tenant_canceled[tenant] = (per_tenant_canceled[tenant] or 0) + 1
    end
    if f[3] and f[3] ~= '' then
      local acc = per_batch[f[3]]
      if not acc then acc = {n = 0, ok = 0, canceled = 0, dur = 0}; per_batch[f[3]] = acc end
      acc.n = acc.n + 1
      acc.dur = acc.dur + tonumber(ARGV[i+3])
      if ARGV[i+2] == 'ok' then acc.ok = acc.ok + 1 else acc.canceled = acc.canceled + 1 end
    end
    codes[#codes+1] = 1
  else
    codes[#codes+1] = 0
  end
end
if #ids > 0 then
  redis.call('ZREM', KEYS[1], unpack(ids))
  redis.call('HDEL', KEYS[2], unpack(ids))
end
if #gone > 0 then redis.call('DEL', unpack(gone)) end   -- one slot: every key has the deployment's tag
for q, n in pairs(per_queue) do
  redis.call('HINCRBY', P .. ':qs:' .. q, 'inflight', -n)
  history(P, q, n, 0, now)
end
for t, n in pairs(per_tenant) do release_tenant(P, t, n) end
for t, n in pairs(per_tenant_done) do redis.call('HINCRBY', P .. ':ts:' .. t, 'done', n) end
for t, n in pairs(per_tenant_canceled) do redis.call('HINCRBY', P .. ':ts:' .. t, 'canceled', n) end
for b, acc in pairs(per_batch) do
  local bkey = P .. ':b:' .. b
  if redis.call('EXISTS', bkey) == 1 then
    redis.call('HINCRBY', bkey, 'run', -acc.n)
    if acc.ok > 0 then settle_batch_n(P, b, 'done', acc.ok, acc.dur, now) end
    if acc.canceled > 0 then settle_batch_n(P, b, 'canceled', acc.canceled, acc.ok > 0 and 0 or acc.dur, now) end
  end
end
return codes
