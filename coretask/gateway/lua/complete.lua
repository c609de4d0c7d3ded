-- complete.lua: acknowledge finished tasks of one worker (many per call): succeeded or canceled.
-- An acknowledgement counts only if it presents the task's current lease token while the task
-- is running, so an answer from a worker whose lease expired changes nothing. Counter updates
-- are aggregated per queue, tenant and batch, so the per-task cost is two commands.
-- KEYS[1]  P:leases   KEYS[2] P:w:<worker>
-- ARGV[1]  P         ARGV[2] worker id
-- ARGV[3..] groups of four: id, token (attempt), outcome ("ok" | "canceled"), duration ms
-- Reply: array of codes, one per task: 1 = counted, 0 = stale token or unknown task (ignored).
-- A canceled task of no batch is counted in its tenant's statistics (a batch's task: in its
-- batch, which counts the tenant). A keyed task gives up its idempotency key (release_key).
local P = ARGV[1]
local now = now_ms()
local codes, ids = {}, {}
local per_queue, per_tenant, per_tenant_done, per_batch = {}, {}, {}, {}
local per_tenant_canceled = {}
for i = 3, #ARGV, 4 do
  local id, token = ARGV[i], ARGV[i+1]
  local tkey = P .. ':t:' .. id
  local f = redis.call('HMGET', tkey, 'a', 'st', 'q', 'tn', 'b', 'ik')
  if f[1] == token and f[2] == 'running' then
    if f[6] then release_key(P, id) end
    redis.call('DEL', tkey)
    ids[#ids+1] = id
    per_queue[f[3]] = (per_queue[f[3]] or 0) + 1
    per_tenant[f[4]] = (per_tenant[f[4]] or 0) + 1
    if ARGV[i+2] == 'ok' then per_tenant_done[f[4]] = (per_tenant_done[f[4]] or 0) + 1 end
    if ARGV[i+2] ~= 'ok' and (not f[5] or f[5] == '') then
      per_tenant_canceled[f[4]] = (per_tenant_canceled[f[4]] or 0) + 1
    end
    if f[5] and f[5] ~= '' then
      local acc = per_batch[f[5]]
      if not acc then acc = {n = 0, ok = 0, canceled = 0, dur = 0}; per_batch[f[5]] = acc end
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
  redis.call('SREM', KEYS[2], unpack(ids))
end
for q, n in pairs(per_queue) do redis.call('HINCRBY', P .. ':qs:' .. q, 'inflight', -n) end
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
