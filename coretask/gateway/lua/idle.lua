-- idle.lua: end an idle worker process's registration for hand-offs (fetch.lua, enqueue.lua).
-- KEYS[1]  P:inbox:<worker>
-- ARGV[1]  P   ARGV[2] worker id   ARGV[3] mode:
--   "wake"  the worker's blocked loop has something to do (an event, a stop): when it was still
--           registered, the registration ends and an empty element wakes its blocking pop; a
--           hand-off that came first is popped first, and none can come after.
--   "leave" the worker stops waiting for hand-offs (its loop stops, or its blocking pop failed
--           and its reply may be lost): the registration ends and the inbox is emptied.
-- Reply: "wake": 1 when the registration was ended here, else 0; "leave": the hand-offs that
--        were in the inbox (packed leases), which the worker admits.
local P, worker, mode = ARGV[1], ARGV[2], ARGV[3]
local was = idle_unregister(P, worker)
if mode == 'wake' then
  if was then redis.call('RPUSH', KEYS[1], '') return 1 end
  return 0
end
local out = {}
for _, item in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if item ~= '' then out[#out+1] = item end
end
redis.call('DEL', KEYS[1])
return out
