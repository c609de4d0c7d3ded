-- overdue.lua: the tasks of one worker process that were told to stop and have not, past a
-- grace period: the manager ends that process (a task stuck in C code that holds its process's
-- GIL cannot be stopped from inside it), then hands the process's other tasks back.
-- KEYS[1]  P:wl:<worker>   KEYS[2] P:paused
-- ARGV[1]  P   ARGV[2] grace ms
-- Reply: {now_ms, then per overdue task: id, why ("canceled" | "task" | "requeue" | "timeout"),
--        ms since the abort, lease token (field a), ms since the attempt started (field ls; 0
--        when absent)}
-- Read-only. A task is overdue when its batch was canceled (the batch's "ended" time), the task
-- itself was canceled (cancel_task's mark cx, why "task"), the processor was paused with
-- requeue (the pause's time, stored in the flag's value), or its time limit ran out (lease
-- start ls + time limit to, why "timeout") more than grace ms ago and the task is still leased
-- to this worker as running.
local P, grace = ARGV[1], tonumber(ARGV[2])
local now = now_ms()
local out = {now}
local ids = redis.call('HKEYS', KEYS[1])
if #ids == 0 then return out end
local requeued_at = nil
local flag = redis.call('GET', KEYS[2])
if flag and string.sub(flag, 1, 8) == 'requeue:' then requeued_at = tonumber(string.sub(flag, 9)) end
local ended = {}
for _, id in ipairs(ids) do
  -- pcall: a key of another type is not this read-only check's to judge (the task's next
  -- answer, or recovery, takes it out); every other task is still checked
  local f = redis.pcall('HMGET', P .. ':t:' .. id, 'st', 'b', 'cx', 'ls', 'to', 'a')
  if not f.err and f[1] == 'running' then
    local since, why = nil, nil
    if f[2] and f[2] ~= '' then
      local e = ended[f[2]]
      if e == nil then
        local b = redis.call('HMGET', P .. ':b:' .. f[2], 'state', 'ended')
        e = (b[1] == 'canceled' and tonumber(b[2])) or false
        ended[f[2]] = e
      end
      if e then since, why = e, 'canceled' end
    end
    if not since and f[3] then since, why = tonumber(f[3]), 'task' end
    if not since and requeued_at then since, why = requeued_at, 'requeue' end
    local ls, to = tonumber(f[4] or ''), tonumber(f[5] or '')   -- nil when absent or not a number
    if not since and ls and to and to > 0 and now > ls + to then since, why = ls + to, 'timeout' end
    if since and now - since > grace then
      out[#out+1] = id; out[#out+1] = why; out[#out+1] = now - since; out[#out+1] = f[6] or ''
      out[#out+1] = ls and now - ls or 0
    end
  end
end
return out
