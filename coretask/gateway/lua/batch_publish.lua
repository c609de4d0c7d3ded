-- batch_publish.lua: move up to N committed tasks of a batch from one publication list to their
-- queues (or the delayed set). Bounded work per call keeps Redis responsive while a
-- 100,000-task batch goes out; tasks of a batch canceled meanwhile are dropped (cancel_batch
-- already counted them as canceled).
-- KEYS[1]  P:b:<batch>:p:<stage>   KEYS[2] P:publishing
-- ARGV[1]  P   ARGV[2] batch id   ARGV[3] stage id   ARGV[4] max tasks this call
-- Reply: number of tasks still waiting in the publication list.
-- A task whose record is damaged (_lib.lua read_task: q, tn, d) is dead-lettered or quarantined
-- and counted failed in the batch; the others are published.
local P, batch, max = ARGV[1], ARGV[2], tonumber(ARGV[4])
local ids = redis.call('LPOP', KEYS[1], max)
if ids then
  local canceled = batch_canceled(P, batch)
  local now = now_ms()
  local groups, order = {}, {}   -- ready tasks per queue and tenant, pushed with one RPUSH each
  if not canceled then redis.call('RPUSH', P .. ':b:' .. batch .. ':ids', unpack(ids)) end
  for _, id in ipairs(ids) do
    local tkey = P .. ':t:' .. id
    if canceled then
      release_key(P, id)
      redis.call('DEL', tkey)
    else
      redis.call('PERSIST', tkey)
      local f, bad, kind = read_task(P, id, {'q', 'tn', 'd'}, {q = true, tn = true})
      if kind == 'none' then
        -- its staged hash expired before publication (over an hour): lost, counted failed
        settle_batch(P, batch, 'failed', 0, now)
      elseif bad then
        -- a damaged record (_lib.lua): dead letter or quarantine, counted failed in the batch
        -- (its queue, when a queue name, is registered as publishing would, to show its dead letters)
        local queue = f and not field_problem(P, 'q', f[1], true) and f[1] or nil
        if queue then redis.call('SADD', P .. ':queues', queue) end
        take_out(P, id, bad, {queue = queue, batch = batch, counted = true}, now)
      else
        local due = tonumber(f[3] or '0')
        if due > now then
          redis.call('SADD', P .. ':queues', f[1])
          push_delayed(P, f[1], id, due)
        else
          redis.call('HSET', tkey, 'st', 'queued')
          local key = f[1] .. '\0' .. f[2]
          local g = groups[key]
          if not g then g = {q = f[1], tn = f[2]}; groups[key] = g; order[#order+1] = key end
          g[#g+1] = id
        end
      end
    end
  end
  for _, key in ipairs(order) do
    local g = groups[key]
    if push_ready_n(P, g.q, g.tn, g) then
      redis.call('SADD', P .. ':queues', g.q)   -- registered once per tenant joining the ring
    end
  end
end
local left = redis.call('LLEN', KEYS[1])
if left == 0 then redis.call('SREM', KEYS[2], batch .. ':' .. ARGV[3]) end
return left
