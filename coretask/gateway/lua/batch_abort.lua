-- batch_abort.lua: delete what a failed enqueue_batch/append_batch staged, in bounded chunks
-- (the caller repeats while the reply is non-zero). Without it the staged data still expires.
-- KEYS[1]  P:b:<batch>:s:<stage>   KEYS[2] P:b:<batch>:c:<stage>
-- ARGV[1]  P   ARGV[2] max ids per call
-- Reply: number of ids still staged.
local P, max = ARGV[1], tonumber(ARGV[2])
for k = 1, 2 do
  local ids = redis.call('LPOP', KEYS[k], max)
  if ids then
    for _, id in ipairs(ids) do
      release_key(P, id, true)       -- a keyed staged task claimed its key (batch_stage)
      redis.call('DEL', P .. ':t:' .. id)
    end
  end
end
return redis.call('LLEN', KEYS[1]) + redis.call('LLEN', KEYS[2])
