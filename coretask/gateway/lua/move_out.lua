-- move_out.lua: take tasks of a paused tenant out of this shard's queues, to be moved to another
-- shard (rebalance: coretask/gateway/shards.py). Each task is taken out whole or not at all: off
-- its ready list or the delayed set (counters with it), its idempotency key released, state
-- "moving", listed in P:moving until move_done.lua deletes it here, after move_in.lua stored
-- it on the other shard, so that a rebalance cut short is finished by the next one.
-- KEYS[1]  P:moving
-- ARGV[1]  P   ARGV[2] tenant   ARGV[3..] candidate task ids
-- Reply: {id, {field, value, ...}, ...} for every task taken out. Left alone: another tenant's,
--        not queued or delayed (running, dead, finished), a task of a batch or a continuation
--        (a batch's tasks stay on the batch's shard: its counters are there).
local P, tenant = ARGV[1], ARGV[2]
local out = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local tkey = P .. ':t:' .. id
  local f = redis.call('HMGET', tkey, 'st', 'q', 'tn', 'b', 'cb')
  local st = f[1]
  if f[3] == tenant and (st == 'queued' or st == 'delayed') and (f[4] or '') == '' and (f[5] or '') == ''
     and unqueue(P, id, st, f[2], tenant, nil) then
    release_key(P, id, true)
    redis.call('HSET', tkey, 'st', 'moving', 'ms', st)
    redis.call('SADD', KEYS[1], id)
    out[#out+1] = id
    out[#out+1] = redis.call('HGETALL', tkey)
  end
end
return out
