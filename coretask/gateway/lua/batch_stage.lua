-- batch_stage.lua: write one chunk of a batch being built (or appended to). Staged tasks are
-- invisible to workers and expire on their own, so a producer that crashes or meets a Redis
-- error before batch_commit leaves nothing behind (batch_abort removes them at once when the
-- producer is still alive to do it).
-- KEYS[1]  P:b:<batch>:s:<stage>   staged task ids      KEYS[2] P:b:<batch>:c:<stage> staged
--          continuation ids        KEYS[3] P:queues (not written here: a staged batch that is
--          aborted must leave nothing behind; publish and commit register the queues)
-- ARGV[1]  P   ARGV[2] ttl ms of the staged data   ARGV[3] batch id   ARGV[4] S, shapes
-- ARGV[5..] S shapes of 12 (what tasks of a chunk mostly share): queue, tenant, serializer,
--           target, retries, due ms (0 = ready at once; negative = a delay of that many ms from
--           now on the server's clock, fixed here), continuation condition ("" for a
--           task of the batch, else "success" | "complete"), idempotency key name
--           (P:key:<tenant>:<key>, "" = none) and its key_ttl ms, then the controls: time
--           limit, keep-result and retention ms (fields to, kr, kt; 0 = off)
-- then groups of 4, one per task: id, shape number (1-based), payload, signature (field sg,
--           "" = unsigned)
-- A task whose shape names a key (batch.enqueue(key=...)) is sent alone in its chunk: it is
-- staged only if it can claim the key (claim_key in _lib.lua), and the first-task check below
-- stays exact for it.
-- Reply: {entries staged, id of the task holding the key ("" when none, or staged)}. A chunk
-- whose first task exists already was staged by an earlier send of this same call (its reply
-- was lost and redis-py sent it again): nothing is written twice.
local P, ttl, batch = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local W = 12
local first = 5 + W * tonumber(ARGV[4])
if first <= #ARGV and redis.call('EXISTS', P .. ':t:' .. ARGV[first]) == 1 then
  return {(#ARGV - first + 1) / 4, ''}
end
local now = now_ms()
local tasks, conts = {}, {}
for i = first, #ARGV, 4 do
  local tkey = P .. ':t:' .. ARGV[i]
  local s = 5 + W * (tonumber(ARGV[i+1]) - 1)
  if ARGV[s+7] ~= '' then
    if #ARGV > first + 3 then return redis.error_reply('a keyed task must be staged alone') end
    local holder = claim_key(P, ARGV[s+7], ARGV[i])
    if holder then return {0, holder} end
  end
  local due = tonumber(ARGV[s+5])
  if due < 0 then due = now - due end
  local h = {'q', ARGV[s], 'tn', ARGV[s+1], 's', ARGV[s+2], 'tg', ARGV[s+3], 'r', ARGV[s+4],
             'd', due, 'p', ARGV[i+2], 'a', 0, 'e', now, 'st', 'staged'}
  if ARGV[s+6] == '' then
    h[21] = 'b'; h[22] = batch
    tasks[#tasks+1] = ARGV[i]
  else
    h[21] = 'on'; h[22] = ARGV[s+6]; h[23] = 'cb'; h[24] = batch
    conts[#conts+1] = ARGV[i]
  end
  if ARGV[i+3] ~= '' then h[#h+1] = 'sg'; h[#h+1] = ARGV[i+3] end
  if ARGV[s+7] ~= '' then h[#h+1] = 'ik'; h[#h+1] = ARGV[s+7]; h[#h+1] = 'ikt'; h[#h+1] = ARGV[s+8] end
  redis.call('HSET', tkey, unpack(h))
  set_controls(tkey, ARGV[s+9], ARGV[s+10], ARGV[s+11])
  redis.call('PEXPIRE', tkey, ttl)
end
if #tasks > 0 then redis.call('RPUSH', KEYS[1], unpack(tasks)) end
if #conts > 0 then redis.call('RPUSH', KEYS[2], unpack(conts)) end
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return {#tasks + #conts, ''}
