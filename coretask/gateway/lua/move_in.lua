-- move_in.lua: store a task moved from another shard (rebalance), under its new id, and make it
-- ready or delayed as it was there. Idempotent: a repeat (a rebalance finishing one cut short)
-- finds the id and writes nothing.
-- KEYS[1]  P:t:<new id>   KEYS[2] P:queues
-- ARGV[1]  P   ARGV[2] new id   ARGV[3..] the task's fields as move_out.lua returned them
-- Reply: 1 ready, 2 delayed, -1 the id exists already (moved before).
local P, id = ARGV[1], ARGV[2]
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local f, was, due = {}, 'queued', 0
for i = 3, #ARGV, 2 do
  local name, value = ARGV[i], ARGV[i + 1]
  if name == 'ms' then
    was = value
  elseif name == 'd' then
    due = tonumber(value) or 0
  elseif name ~= 'st' and name ~= 'ik' and name ~= 'ikt' and name ~= 'w' and name ~= 'ls' then
    f[#f+1] = name
    f[#f+1] = value
  end
end
redis.call('HSET', KEYS[1], 'st', 'queued', unpack(f))
local queue, tenant = redis.call('HGET', KEYS[1], 'q'), redis.call('HGET', KEYS[1], 'tn')
redis.call('SADD', KEYS[2], queue)
redis.call('ZADD', P .. ':tenants', 'NX', 0, tenant)
if was == 'delayed' and due > now_ms() then
  push_delayed(P, queue, id, due)
  return 2
end
push_ready(P, queue, tenant, id, false, true)
return 1
