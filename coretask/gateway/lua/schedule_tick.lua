-- schedule_tick.lua: claim one due tick of a schedule and enqueue its run, or run a schedule now on demand.
-- KEYS[1]  P:sdue   KEYS[2] P:s:<id>   KEYS[3] P:paused   KEYS[4] P:t:<new task id>
-- KEYS[5]  P:queues
-- ARGV[1]  P   ARGV[2] schedule id   ARGV[3] mode: "tick" | "trigger"   ARGV[4] new task id
-- ARGV[5]  tick ms (the score the caller read)   ARGV[6] version the caller read
-- ARGV[7]  next tick ms (computed by the caller from max(now, tick): at most one catch-up run)
--   (ARGV[5..7] are ignored in mode "trigger", which never moves the next tick.)
-- ARGV[8]  mode "trigger" only, optional: the tenant the caller claims ("" or absent = any);
--          another tenant's schedule is treated as unknown (-2) and nothing changes
-- Reply: {code, now_ms, score_ms}; score_ms is the schedule's due time after the call (-1 if it
--   has none). code 1 = run enqueued, 2 = tick skipped because the previous run is still
--   queued, delayed or running (unique), 3 = tick skipped because it is older than expire,
--   0 = lost the compare-and-set (another process claimed it, or the schedule was replaced),
--   -1 = globally paused (tick left in place), -2 = no such schedule, 4 = tick skipped because
--   the schedule itself is paused (field ps, schedule_pause.lua; counted in np: the tick moves on,
--   so resuming never enqueues the ticks missed).
--   While the schedule's queue or tenant is paused (P:pausedq, P:pausedt) ticks move on, but a
--   run is enqueued only if the last one is not still waiting (queued or delayed), so a pause
--   holds at most one run, as a global pause does (code 2, counted in nu like unique).
--
-- Claiming is a compare-and-set: the schedule moves from this tick to the next
-- only if its score still equals this tick and its version is the one the caller read, and the
-- run is enqueued in the same script, so however many processes race for a tick exactly one
-- enqueues it. The tick moves on even when its run is skipped (unique, expire).
local P, id, mode, tid = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now = now_ms()
local function score()
  return tonumber(redis.call('ZSCORE', KEYS[1], id) or '-1')
end
if redis.call('EXISTS', KEYS[2]) == 0 then return {-2, now, score()} end
if mode == 'trigger' and ARGV[8] and ARGV[8] ~= '' and redis.call('HGET', KEYS[2], 'tn') ~= ARGV[8] then
  return {-2, now, score()}
end

-- The run: a task hash as enqueue.lua writes it, plus the schedule id (sch) and tick (sk). The
-- schedule's signature (sg, "s1:...", naming the schedule) goes with it: workers verify the run
-- against the schedule it names (coretask/signing.py).
local function enqueue(tick)
  local s = redis.call('HMGET', KEYS[2], 'q', 'tn', 'p', 's', 'tg', 'r', 'sg', 'to', 'kr', 'kt')
  redis.call('HSET', KEYS[4], 'q', s[1], 'tn', s[2], 'p', s[3], 's', s[4], 'tg', s[5], 'r', s[6],
             'a', 0, 'e', now, 'sch', id, 'sk', tick)
  if s[7] then redis.call('HSET', KEYS[4], 'sg', s[7]) end
  set_controls(KEYS[4], s[8], s[9], s[10])
  redis.call('SADD', KEYS[5], s[1])
  push_ready(P, s[1], s[2], tid, false)
  redis.call('HSET', KEYS[2], 'lt', tid, 'lr', now)
end

if mode == 'trigger' then
  enqueue(now)
  redis.call('PUBLISH', P .. ':ev', 's')
  return {1, now, score()}
end

if redis.call('EXISTS', KEYS[3]) == 1 then return {-1, now, score()} end
local tick, nxt = tonumber(ARGV[5]), tonumber(ARGV[7])
if score() ~= tick or redis.call('HGET', KEYS[2], 'v') ~= ARGV[6] then return {0, now, score()} end
redis.call('ZADD', KEYS[1], nxt, id)
redis.call('HSET', KEYS[2], 'lk', tick)

local f = redis.call('HMGET', KEYS[2], 'x', 'u', 'lt', 'q', 'tn', 'ps')
if f[6] then
  redis.call('HINCRBY', KEYS[2], 'np', 1)
  return {4, now, nxt}
end
local expire = tonumber(f[1] or '0')
if expire > 0 and now - tick > expire then
  redis.call('HINCRBY', KEYS[2], 'nx', 1)
  return {3, now, nxt}
end
local held = redis.call('SISMEMBER', P .. ':pausedq', f[4] or '') == 1
  or redis.call('SISMEMBER', P .. ':pausedt', f[5] or '') == 1
if (f[2] == '1' or held) and f[3] then
  local st = redis.pcall('HGET', P .. ':t:' .. f[3], 'st')   -- a damaged last run does not block the tick
  if st == 'queued' or st == 'delayed' or (st == 'running' and f[2] == '1') then
    redis.call('HINCRBY', KEYS[2], 'nu', 1)
    return {2, now, nxt}
  end
end
enqueue(tick)
return {1, now, nxt}
