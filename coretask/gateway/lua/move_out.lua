-- move_out.lua: take tasks of a paused tenant out of this shard's queues, to be moved to another
-- shard (rebalance: coretask/gateway/shards.py). Each task is taken out whole or not at all: off
-- its ready list or the delayed set (counters with it), its idempotency key released, state
-- "moving", listed in P:moving until move_done.lua deletes it here, after move_in.lua stored
-- it on the other shard, so that a rebalance cut short is finished by the next one.
-- KEYS[1]  P:moving
-- ARGV[1]  P   ARGV[2] tenant   ARGV[3] "1" = the caller signs a moved task again (it has
--          Options.signing_key), "0" = it cannot   ARGV[4..] candidate task ids
-- Reply: {left, id, {field, value, ...}, ...}: every task taken out, and how many of the
--        tenant's queued or delayed candidates were left where they are: a task of a batch or a
--        continuation (a batch's tasks stay on the batch's shard: its counters are there), or,
--        when the caller cannot sign, a task whose signature names its id (field sg "t1:...",
--        coretask/signing.py: under a new id it would be refused). Also left alone, uncounted:
--        another tenant's, and what is not queued or delayed (running, dead, finished).
local P, tenant, can_sign = ARGV[1], ARGV[2], ARGV[3] == '1'
local out = {0}
for i = 4, #ARGV do
  local id = ARGV[i]
  local tkey = P .. ':t:' .. id
  local f = redis.call('HMGET', tkey, 'st', 'q', 'tn', 'b', 'cb', 'sg')
  local st = f[1]
  local mine = f[3] == tenant and (st == 'queued' or st == 'delayed')
  local stays = (f[4] or '') ~= '' or (f[5] or '') ~= '' or (not can_sign and string.sub(f[6] or '', 1, 3) == 't1:')
  if mine and stays then
    out[1] = out[1] + 1
  elseif mine and unqueue(P, id, st, f[2], tenant, nil) then
    release_key(P, id, true)
    redis.call('HSET', tkey, 'st', 'moving', 'ms', st)
    redis.call('SADD', KEYS[1], id)
    out[#out+1] = id
    out[#out+1] = redis.call('HGETALL', tkey)
  end
end
return out
