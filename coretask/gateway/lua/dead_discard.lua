-- dead_discard.lua: delete dead-lettered tasks of one queue, oldest first. Batch counters keep
-- counting them as failed.
-- KEYS[1]  P:dead:<queue>
-- ARGV[1]  P   ARGV[2] max tasks to delete (0 = all)
-- Reply: number of tasks deleted.
local P = ARGV[1]
local max = tonumber(ARGV[2])
local n = 0
while max == 0 or n < max do
  local id = redis.call('LPOP', KEYS[1])
  if not id then break end
  local tenant = redis.pcall('HGET', P .. ':t:' .. id, 'tn')   -- a key of another type: deleted all the same
  if type(tenant) == 'string' and not field_problem(P, 'tn', tenant, true) then
    redis.call('HINCRBY', P .. ':ts:' .. tenant, 'dead', -1)
  end
  redis.call('DEL', P .. ':t:' .. id)
  n = n + 1
end
return n
