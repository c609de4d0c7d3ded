-- delete_task.lua: delete one task that is not running: queued (or isolated after a crash),
-- delayed or retrying, a continuation waiting for its batch, or dead-lettered.
-- A deleted task leaves no trace in the counters: a task of a batch that had not ended leaves
-- the batch (total -1, remaining -1; the batch may finish: continuations, on_batch_end), a dead
-- one stays counted failed in its batch and in P:ts:<tenant> failed (as dead_discard.lua), and
-- leaves the tenant's dead count. Its idempotency key is released (release_key).
-- KEYS[1]  P:t:<id>
-- ARGV[1]  P   ARGV[2] task id   ARGV[3] tenant the caller claims ("" = any)
-- ARGV[4]  "1" = only a dead task (discard_dead_task), "0" = any state above
-- Reply: 1 = deleted, 0 = unknown, another tenant's, running (see cancel_task), staged, of a
--        canceled batch (already counted canceled; dropped where it is found), or not dead
--        with ARGV[4] = "1".
local P, id = ARGV[1], ARGV[2]
local f = redis.call('HMGET', KEYS[1], 'st', 'q', 'tn', 'b', 'cb')
local st, queue, tenant, batch = f[1], f[2], f[3], f[4]
if not st or (ARGV[3] ~= '' and tenant ~= ARGV[3]) then return 0 end
if ARGV[4] == '1' and st ~= 'dead' then return 0 end
if st == 'dead' then
  if redis.call('LREM', P .. ':dead:' .. queue, 1, id) == 0 then return 0 end
  redis.call('HINCRBY', P .. ':ts:' .. tenant, 'dead', -1)
  release_key(P, id)
  redis.call('DEL', KEYS[1])
  return 1
end
if batch_canceled(P, batch) then return 0 end
if not unqueue(P, id, st, queue, tenant, f[5]) then return 0 end   -- dead, running or staged: no
release_key(P, id)
redis.call('DEL', KEYS[1])
if batch and batch ~= '' then
  local bkey = P .. ':b:' .. batch
  if redis.call('HGET', bkey, 'state') == 'running' then
    redis.call('HINCRBY', bkey, 'total', -1)
    redis.call('HINCRBY', bkey, 'remaining', -1)
    close_batch_if_done(P, batch, now_ms())
  end
end
return 1
