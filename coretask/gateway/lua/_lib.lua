-- _lib.lua: helpers prepended to coretask scripts at load time (not a script itself): each script
-- gets the top-level definitions it uses, directly or through others (transport.py _with_lib), so
-- every top-level statement here is a `local` definition at the start of a line.
-- KEYS/ARGV: none of its own; every function takes the key prefix P explicitly.
--
-- Key layout (P is the configured prefix, written as a hash tag such as "{coretask}", so that
-- every key below lives in one Redis Cluster slot and multi-key scripts stay legal):
--   P:t:<id>            hash   one task: q queue, tn tenant, b batch, p payload, s serializer,
--                              tg target, r retries left, a attempt (= lease token), e enqueued ms,
--                              d due ms, st state (queued|delayed|running|dead|waiting|isolated),
--                              w worker, ls lease start ms, on (continuations: success|complete),
--                              et/em/etb error type/message/traceback, da dead-at ms,
--                              sch schedule id and sk tick ms (runs enqueued by a schedule),
--                              sg signature (Options.signing_key; see coretask/signing.py),
--                              cx ms of cancel_task's mark on a running task (told to stop),
--                              ik / ikt its idempotency key's name and key_ttl ms (release_key),
--                              xk / xkt the same, kept by a dead letter for a retry (reclaim_key),
--                              cr crashes it was the culprit of (crashed.lua),
--                              cb (continuations) the batch it continues,
--                              to time limit ms, kr keep-result ms, kt retention ms (set_controls),
--                              pg/pt/pm progress done/total/message (progress.lua),
--                              once finished and kept (finish): fa finished ms, du duration ms,
--                              rv the encoded return value (kr), st succeeded|failed|canceled
--                              Integers: r a e d ls da sk to kr kt fa du. Always written: q tn p s tg r a e st.
--                              Every script checks the fields it reads with read_task before
--                              its first write for the task (see "Damaged task records" below).
--   P:q:<queue>:<tenant> list  ready task ids of one tenant in one queue (FIFO)
--   P:ring:<queue>      list   tenants of the queue that have ready work, served in turn
--   P:ringset:<queue>   set    the same tenants, for O(1) membership tests
--   P:queues            set    every queue that ever received a task
--   P:qt:<queue>        set    every tenant that ever had ready work in the queue
--   P:qs:<queue>        hash   counters: ready, delayed, inflight
--   P:delayed           zset   delayed and retrying task ids, score = due ms
--   P:leases            zset   running task ids, score = lease deadline ms (server clock)
--   P:wl:<worker>       hash   task id -> lease entry (lease_entry), one per lease of one worker process
--   P:workers           hash   worker process id -> last heartbeat ms (renew.lua)
--   P:idle              hash   idle worker process id -> JSON [lease ms, default tenant limit, queues]:
--                              registered by its fetch, waiting for a hand-off (idle_register)
--   P:idlers:<queue>    zset   the idle worker processes that serve the queue, score = deadline ms
--   P:inbox:<worker>    list   hand-offs to one idle worker process: a packed lease (pack), or ""
--                              to end its wait (idle.lua)
--   P:trun              hash   tenant -> tasks running now
--   P:tlim              hash   tenant -> concurrency limit override
--   P:capped:<tenant>   set    queues whose ring dropped the tenant because it was at its limit
--   P:dead:<queue>      list   dead-lettered task ids, oldest first
--   P:iso:<queue>       list   isolated task ids (state isolated, counted ready): tasks of a
--                              crashed process, run one at a time alone (crashed.lua); field cr
--                              of a task counts the crashes it was the culprit of
--   P:quarantine        list   ids of damaged tasks with no readable queue to dead-letter them to
--                              (key missing or not a hash, or no usable q), oldest first
--   P:quarantine:why    hash   task id -> why it was quarantined (names the field)
--   P:paused            string "1" while everything is paused
--   P:pausedq / P:pausedt set  paused queues / paused tenants
--   P:pausedw           set    paused workers: host names ("web-1") and managers ("web-1:4242"),
--                              matched against a worker process id "<host>:<manager pid>:<suffix>"
--                              (worker_paused)
--   P:b:<id>            hash   batch: tn, sc scope, q, total, done, failed, canceled, remaining,
--                              run (in flight), dur (summed task ms), created, started, ended, state,
--                              ck (cancel key: published by cancel_batch, see worker/control.py)
--   P:b:<id>:cont       list   continuation task ids not yet released
--   P:b:<id>:ids        list   ids of its tasks, in publication order (batch_publish, one RPUSH per
--                              chunk; deleted with the batch): the dashboard's batch page pages it
--   P:b:<id>:r          list   ids of its finished tasks that keep their results, in order
--   P:b:<id>:s:<stage>  list   task ids staged by one enqueue_batch/append_batch (expires)
--   P:b:<id>:c:<stage>  list   continuation ids staged likewise (expires)
--   P:b:<id>:p:<stage>  list   committed task ids still to be published to their queues
--   P:b:<id>:k          set    ids of the committed stages (a re-sent batch_commit returns 1)
--   P:publishing        set    "<batch>:<stage>" of every publication not yet finished
--   P:batches:<tenant>  zset   batch ids by creation ms
--   P:bend              zset   finished batch ids by end ms (retention cleanup)
--   P:bended            list   finished batch ids waiting for the on_batch_end hook
--   P:s:<id>            hash   cron schedule: tn, q, sc scope, cr cron, tz zone, sec ("1" = six
--                              fields), u unique, x expire ms, p/s/tg/r as a task, v version
--                              (bumped by every upsert), cd/up created/updated ms, lt last run's
--                              task id, lr last run ms, lk last tick ms, nf runs failed for good,
--                              lf/le/lft the last one's time ms, error and task id (bury),
--                              nu/nx/np ticks skipped
--                              (unique / expired / paused), ps paused since ms (schedule_pause.lua;
--                              absent = running)
--   P:sdue              zset   schedule ids, score = next tick ms (moved by compare-and-set)
--   P:sched:<tenant>    zset   the tenant's schedule ids, score 0 (ordered by id)
--   P:marker            string a random token a worker sets when absent: if it changes under a
--                              running worker, the dataset vanished (worker/maintenance.py)
--   P:tenants           zset   every tenant with work or history, score 0 (name order)
--   P:key:<tenant>:<key> string idempotency key (enqueue_task(key=...)): the id of the task that
--                              holds it while that task is staged, queued, delayed, waiting or
--                              running; "f:<id>" with key_ttl as expiry once it ended (a ':' or
--                              '%' in the tenant is written %3A / %25: keys.py)
--   P:ts:<tenant>       hash   tenant counters: done, failed (retries exhausted), canceled, dead
--                              (now in a dead letter list), b_<state> batches by state
--   P:t:<id>:done       list   one element pushed when a task that keeps its result finished
--                              (finish): get_result(wait=) blocks on it; expires with the record
--   P:h:<minute>        hash   history of one minute (minute = server ms // 60000): p:<queue> attempts
--                              that ended (succeeded, failed or canceled), f:<queue> attempts that
--                              failed; written by complete.lua and fail.lua (history), expires
--                              HISTORY_TTL_MS (25 h) after its first write: at most 1,500 such keys, read
--                              by name (never scanned)
--   P:moving            set    ids of tasks move_out.lua took out for another shard (rebalance), field
--                              st "moving" (ms: the state they had), until move_done.lua deletes them
--   P:fw:<id>           string the new id of a task moved to another shard (expires: Options.retention)
--   P:tshard            hash   tenant -> shard its new work goes to (Options.shards > 1; kept on
--                              shard 0 only, written by Python: coretask/gateway/shards.py)
--   P:shards            string Options.shards, recorded on shard 0 by the first check of a
--                              deployment of more than one shard (Gateway.check_shard_count)
--   P:migration-guard   (none)  never written nor read: in cluster mode the transport declares it
--                              as the last KEYS entry of every call, so that while the slot is
--                              being migrated Redis answers TRYAGAIN/ASK before any script starts
--                              (a script never runs on a node holding only part of its keys)
--   P:ev                channel events: "f:<queue>" work ready, "d" new earliest due time,
--                              "p"/"r" pause/resume, "c:<batch>" batch canceled,
--                              "s" schedules changed (workers re-read the next tick),
--                              "x:<task>" task canceled (workers verify field cx)

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Per-minute history for the dashboard's graphs: ``processed`` attempts of ``queue`` ended in
-- this minute, ``failed`` of them failed. One command per call (two with failures; the expiry
-- is set by a queue's first count of the minute, and a later write keeps it); callers aggregate
-- per queue, so a call that acknowledges many tasks pays once.
local HISTORY_TTL_MS = 25 * 3600 * 1000
local function history(P, queue, processed, failed, now)
  local key = P .. ':h:' .. math.floor(now / 60000)
  if redis.call('HINCRBY', key, 'p:' .. queue, processed) == processed then
    redis.call('PEXPIRE', key, HISTORY_TTL_MS)
  end
  if failed > 0 then redis.call('HINCRBY', key, 'f:' .. queue, failed) end
end

-- KEYS[i] when the caller passed it, else nil: how a script reads an optional key. In cluster
-- mode the transport appends P:migration-guard after a call's own keys, so "KEYS[i] is set" is
-- not enough (the guard is never one of a script's keys).
local function given_key(P, i)
  local k = KEYS[i]
  if k == nil or k == P .. ':migration-guard' then return nil end
  return k
end

-- A new task's controls (ARGV values of records.py Controls, in ms): each written only when set,
-- so a task without them costs nothing more.
local function set_controls(tkey, to, kr, kt)
  local f = {}
  if to and to ~= '' and to ~= '0' then f[#f + 1] = 'to'; f[#f + 1] = to end
  if kr and kr ~= '' and kr ~= '0' then f[#f + 1] = 'kr'; f[#f + 1] = kr end
  if kt and kt ~= '' and kt ~= '0' then f[#f + 1] = 'kt'; f[#f + 1] = kt end
  if #f > 0 then redis.call('HSET', tkey, unpack(f)) end   -- one write whatever is set
end

-- ----------------------------------------------------------------------- damaged task records
-- A script error does not roll back the writes made before it, so every script checks the
-- fields of a task hash it reads (read_task) before its first write for that task, and hands a
-- record that fails to take_out (or set_aside), which moves it out of circulation and undoes
-- what the call site says it was counted in; the script then goes on with its other tasks.

local TASK_INTS = {r = true, a = true, e = true, d = true, ls = true, da = true, sk = true, to = true, kr = true,
                   kt = true}
local QUEUES = {}   -- read_task rule: the field names a queue registered in P:queues
local UNCHECKED = {}   -- read_task rule: read as it is, never a problem (a value only reported, as fetch's d)

-- A field's name for a message. Its table is built here, on the way to a problem only: a
-- table at the top of the library is built by every call of every script that uses it.
local function field_label(name)
  local TASK_FIELDS = {q = 'queue', tn = 'tenant', b = 'batch', p = 'payload', s = 'serializer', tg = 'target',
                       r = 'retries', a = 'attempt', e = 'enqueued', d = 'due', st = 'state', w = 'worker',
                       ls = 'lease start', on = 'continuation', cb = 'continued batch', da = 'dead at',
                       sch = 'schedule', sk = 'tick', sg = 'signature', et = 'error type', em = 'error message',
                       etb = 'traceback', to = 'time limit', kr = 'keep result', kt = 'retention'}
  return "field '" .. name .. "' (" .. (TASK_FIELDS[name] or name) .. ")"
end

local function quoted(v)
  if #v > 40 then v = string.sub(v, 1, 40) .. '...' end
  return "'" .. v .. "'"
end

-- What is wrong with value v (false: absent) of task field `name` under `rule`, or nil. An
-- integer field that is present must hold an integer (at most 18 digits: HINCRBY and Python's
-- int() both take it); with a rule, the field must be present, q must be a queue name and tn a
-- tenant name (as coretask/options.py allows), and: rule a string = v must equal it, rule
-- QUEUES = v must be registered in P:queues, rule a table = v must be one of its keys; rule
-- UNCHECKED = anything goes.
local function field_problem(P, name, v, rule)
  if rule == UNCHECKED then return nil end
  if not v then
    if rule then return field_label(name) .. ' is missing' end
    return nil
  end
  if TASK_INTS[name] and (#v > 18 or not string.find(v, '^%-?%d+$')) then
    return field_label(name) .. ' is not a number: ' .. quoted(v)
  end
  if not rule then return nil end
  if name == 'q' and (#v > 100 or not string.find(v, '^[%w_%.%-]+$')) then
    return field_label(name) .. ' is not a queue name: ' .. quoted(v)
  end
  if name == 'tn' and (v == '' or #v > 200 or string.find(v, '%s')) then
    return field_label(name) .. ' is not a tenant name: ' .. quoted(v)
  end
  if rule == QUEUES then
    if redis.call('SISMEMBER', P .. ':queues', v) == 0 then
      return field_label(name) .. ' names no known queue: ' .. quoted(v)
    end
  elseif type(rule) == 'table' then
    if not rule[v] then return field_label(name) .. ' holds an unknown value: ' .. quoted(v) end
  elseif rule ~= true and v ~= rule then
    return field_label(name) .. ' is ' .. quoted(v) .. ', expected ' .. quoted(rule)
  end
  return nil
end

-- read_task(P, id, names, need): HMGET of the fields `names` (a table) of task id's hash, checked.
-- need: field -> rule (see field_problem: true = required, a value it must equal, QUEUES, a set);
-- fields without a rule may be absent, but an integer field must hold an integer when present.
-- Returns f, reason, kind: f is what HMGET returned (false for an absent field; nil when the
-- key holds another type), reason is nil when every field passed, else the first problem, naming
-- the field (or saying the key is missing / not a hash); kind is 'hash', 'none' (no key) or the
-- key's other type, and is 'none' only when a reason is given (a missing key reads as a hash
-- with no fields otherwise). Never raises.
local function read_task(P, id, names, need)
  local tkey = P .. ':t:' .. id
  local f = redis.pcall('HMGET', tkey, unpack(names))
  if f.err then
    local kind = redis.call('TYPE', tkey).ok
    return nil, "the task's key " .. tkey .. ' holds a ' .. kind .. ', not a hash', kind
  end
  for i = 1, #names do
    -- the plain cases (an optional field, a required one that is present, an integer that reads
    -- as one) are decided here, without a call: this runs for every field of every task a fetch
    -- leases or an acknowledgement settles; field_problem has the final word and the message
    local name = names[i]
    local rule, v = need[name], f[i]
    local why = nil
    if rule == nil or rule == true then
      if (rule and not v) or (v and TASK_INTS[name] and (#v > 18 or not string.find(v, '^%-?%d+$')))
         or (rule and (name == 'q' or name == 'tn')) then
        why = field_problem(P, name, v, rule)
      end
    elseif rule ~= UNCHECKED then
      why = field_problem(P, name, v, rule)
    end
    if why then
      if redis.call('EXISTS', tkey) == 0 then return f, "the task's record " .. tkey .. ' is missing', 'none' end
      return f, why, 'hash'
    end
  end
  return f, nil, 'hash'
end

-- set_aside(P, id, reason, queue, tenant, now, etb): the dead letter of a damaged record.
-- A hash goes to P:dead:<queue> (queue: what the call site knows, else the record's q when it
-- is a registered queue), with st = dead, q = that queue, et = CorruptTask, em = reason, and
-- counted like any dead letter (P:ts:<tenant> failed and dead, for the record's tn, or for
-- `tenant` written into it when its own is unusable), so dead_retry and dead_discard undo it.
-- A key that is missing or not a hash, or a hash with no usable queue, goes to P:quarantine
-- with its reason in P:quarantine:why (a hash is marked st = quarantined, et/em/da). Counters
-- and batches are the caller's (take_out). Returns 'dead' or 'quarantined'.
local function set_aside(P, id, reason, queue, tenant, now, etb)
  local tkey = P .. ':t:' .. id
  local kind = redis.call('TYPE', tkey).ok
  if kind == 'hash' then
    redis.call('PERSIST', tkey)    -- a staged record keeps its expiry otherwise
    local f = redis.call('HMGET', tkey, 'q', 'tn')
    if not queue and not field_problem(P, 'q', f[1], QUEUES) then queue = f[1] end
    if queue then
      redis.call('HSET', tkey, 'st', 'dead', 'q', queue, 'et', 'CorruptTask', 'em', reason, 'etb', etb or '',
                 'da', now)
      local tn = f[2]
      if field_problem(P, 'tn', tn, true) then
        tn = tenant
        if tn then redis.call('HSET', tkey, 'tn', tn) end
      end
      if tn then
        redis.call('HINCRBY', P .. ':ts:' .. tn, 'failed', 1)
        redis.call('HINCRBY', P .. ':ts:' .. tn, 'dead', 1)
      end
      redis.call('RPUSH', P .. ':dead:' .. queue, id)
      return 'dead'
    end
    redis.call('HSET', tkey, 'st', 'quarantined', 'et', 'CorruptTask', 'em', reason, 'da', now)
  end
  if redis.call('HSETNX', P .. ':quarantine:why', id, reason) == 1 then
    redis.call('RPUSH', P .. ':quarantine', id)
  else
    redis.call('HSET', P .. ':quarantine:why', id, reason)
  end
  return 'quarantined'
end

-- Count n more ready tasks of a tenant in a queue and make sure the tenant is in the queue's
-- ring. Returns true when the tenant joined the ring just now; while it stays in the ring, the
-- one-time registrations (P:qt:<queue>, and the callers' P:queues / P:tenants) are known done.
local function ready_added(P, queue, tenant, n)
  redis.call('HINCRBY', P .. ':qs:' .. queue, 'ready', n)
  if redis.call('SADD', P .. ':ringset:' .. queue, tenant) == 1 then
    redis.call('SADD', P .. ':qt:' .. queue, tenant)
    redis.call('RPUSH', P .. ':ring:' .. queue, tenant)
    redis.call('PUBLISH', P .. ':ev', 'f:' .. queue)
    return true
  end
  return false
end

-- Put a task id on its tenant's ready list (see ready_added for the reply).
-- front=true hands a task back to the head of the list (release without consuming a retry);
-- state_set=true when the caller already wrote st=queued into the task hash.
local function push_ready(P, queue, tenant, id, front, state_set)
  local list = P .. ':q:' .. queue .. ':' .. tenant
  if front then redis.call('LPUSH', list, id) else redis.call('RPUSH', list, id) end
  if not state_set then redis.call('HSET', P .. ':t:' .. id, 'st', 'queued') end
  return ready_added(P, queue, tenant, 1)
end

-- push_ready for many tasks of one queue and tenant (array part of ids), whose hashes already
-- say st = queued: one RPUSH and one counter update for all of them.
local function push_ready_n(P, queue, tenant, ids)
  redis.call('RPUSH', P .. ':q:' .. queue .. ':' .. tenant, unpack(ids))
  return ready_added(P, queue, tenant, #ids)
end

-- Schedule a task to become ready at due_ms.
local function push_delayed(P, queue, id, due_ms)
  redis.call('HSET', P .. ':t:' .. id, 'st', 'delayed', 'd', due_ms)
  redis.call('ZADD', P .. ':delayed', due_ms, id)
  redis.call('HINCRBY', P .. ':qs:' .. queue, 'delayed', 1)
  local first = redis.call('ZRANGE', P .. ':delayed', 0, 0)
  if first[1] == id then redis.call('PUBLISH', P .. ':ev', 'd') end
end

-- A tenant's running count changes by n (never 0: Lua's -0 would reach HINCRBY as "-0", which
-- Redis rejects); a tenant with nothing running leaves P:trun.
local function add_running(P, tenant, n)
  if tonumber(redis.call('HINCRBY', P .. ':trun', tenant, n)) <= 0 then redis.call('HDEL', P .. ':trun', tenant) end
end

-- A tenant's running count drops by n; when it had left rings at its concurrency limit, it is
-- re-admitted to them (where it still has ready work).
local function release_tenant(P, tenant, n)
  if n ~= 0 then add_running(P, tenant, -n) end   -- (n = 0 only re-admits)
  local capped = P .. ':capped:' .. tenant
  local queues = redis.call('SMEMBERS', capped)
  if #queues > 0 then
    redis.call('DEL', capped)
    for _, q in ipairs(queues) do
      if redis.call('LLEN', P .. ':q:' .. q .. ':' .. tenant) > 0
         and redis.call('SADD', P .. ':ringset:' .. q, tenant) == 1 then
        redis.call('RPUSH', P .. ':ring:' .. q, tenant)
        redis.call('PUBLISH', P .. ':ev', 'f:' .. q)
      end
    end
  end
end

-- Undo the bookkeeping of a lease: the lease entry, the worker's set, the tenant's running slot
-- and the in-flight counters of the queue and the batch.
local function drop_lease(P, id, worker, queue, tenant, batch)
  redis.call('ZREM', P .. ':leases', id)
  if worker and worker ~= '' then redis.call('HDEL', P .. ':wl:' .. worker, id) end
  redis.call('HINCRBY', P .. ':qs:' .. queue, 'inflight', -1)
  release_tenant(P, tenant, 1)
  if batch and batch ~= '' then
    redis.call('HINCRBY', P .. ':b:' .. batch, 'run', -1)
  end
end

-- Per-tenant statistics (P:ts:<tenant>): a batch moves from one state's count to another's.
local function count_batch_state(P, tenant, from, to)
  local key = P .. ':ts:' .. tenant
  if from then redis.call('HINCRBY', key, 'b_' .. from, -1) end
  if to then redis.call('HINCRBY', key, 'b_' .. to, 1) end
end

-- Release the continuations a finished batch has earned, each exactly once: a continuation
-- leaves P:b:<id>:cont in the same script that queues it.
local function release_continuations(P, batch, failed)
  local contkey = P .. ':b:' .. batch .. ':cont'
  local ids = redis.call('LRANGE', contkey, 0, -1)
  for _, cid in ipairs(ids) do
    local f, bad = read_task(P, cid, {'on', 'q', 'tn'}, {on = {success = true, complete = true}, q = QUEUES,
                                                          tn = true})
    if bad then
      -- a damaged continuation leaves the batch (it is counted in nothing) for the dead letters
      redis.call('LREM', contkey, 1, cid)
      set_aside(P, cid, bad, nil, nil, now_ms())
      f = {}
    end
    if f[1] == 'complete' or (f[1] == 'success' and failed == 0) then
      redis.call('LREM', contkey, 1, cid)
      redis.call('HDEL', P .. ':t:' .. cid, 'on')
      push_ready(P, f[2], f[3], cid, false)
    end
  end
end

-- Close a running batch whose remaining count reached 0: state, end time, continuations, and
-- the queue of batches waiting for the on_batch_end hook.
local function close_batch_if_done(P, batch, now)
  local bkey = P .. ':b:' .. batch
  local f = redis.call('HMGET', bkey, 'remaining', 'state', 'failed', 'tn')
  if tonumber(f[1] or '1') > 0 or f[2] ~= 'running' then return end
  local failed = tonumber(f[3] or '0')
  local state = 'succeeded'
  if failed > 0 then state = 'failed' end
  count_batch_state(P, f[4], 'running', state)
  redis.call('HSET', bkey, 'state', state, 'ended', now)
  redis.call('ZADD', P .. ':bend', now, batch)
  redis.call('RPUSH', P .. ':bended', batch)
  release_continuations(P, batch, failed)
end

-- Count n tasks of a batch as finished (field = done|failed|canceled) and, when nothing
-- remains, close the batch: state, end time, continuations and the on_batch_end hook queue.
-- Every counter moves in the same script, so total == done + failed + canceled + remaining
-- holds at every instant.
local function settle_batch_n(P, batch, field, n, dur_ms, now)
  if not batch or batch == '' then return end
  local bkey = P .. ':b:' .. batch
  local tenant = redis.call('HGET', bkey, 'tn')
  if not tenant then return end   -- deleted by retention (or only a canceled batch's tombstone)
  redis.call('HINCRBY', bkey, field, n)
  if field == 'canceled' then redis.call('HINCRBY', P .. ':ts:' .. tenant, 'canceled', n) end
  if dur_ms and dur_ms > 0 then redis.call('HINCRBY', bkey, 'dur', dur_ms) end
  redis.call('HINCRBY', bkey, 'remaining', -n)
  close_batch_if_done(P, batch, now)
end

local function settle_batch(P, batch, field, dur_ms, now)
  settle_batch_n(P, batch, field, 1, dur_ms, now)
end

-- True when the task belongs to a canceled batch. Such a task is deleted where it is found;
-- it was already counted as canceled when the batch was canceled.
local function batch_canceled(P, batch)
  if not batch or batch == '' then return false end
  return redis.call('HGET', P .. ':b:' .. batch, 'state') == 'canceled'
end

-- An ending task gives up its idempotency key (fields ik, ikt): deleted, or kept as "f:<id>" for
-- key_ttl ms; a task of a canceled batch, or one that never was (forget: its staging was
-- aborted), gives it up at once. Nothing when the key names another task by now. Called
-- wherever a keyed task's hash is deleted or buried.
local function release_key(P, id, forget)
  local tkey = P .. ':t:' .. id
  local f = redis.call('HMGET', tkey, 'ik', 'ikt', 'b')
  if not f[1] then return end
  redis.call('HDEL', tkey, 'ik', 'ikt')
  if redis.call('GET', f[1]) ~= id then return end
  local ttl = tonumber(f[2] or '0') or 0
  if ttl > 0 and not forget and not batch_canceled(P, f[3]) then
    redis.call('SET', f[1], 'f:' .. id, 'PX', ttl)
  else
    redis.call('DEL', f[1])
  end
end

-- Wake the get_result(wait=) callers of a task that keeps its result (kr ms > 0) and just
-- reached its final state: one element on P:t:<id>:done, which lives as long as the result.
-- A task of a batch is also listed in P:b:<batch>:r (get_batch_results; deleted with the batch).
local function notify_done(P, id, kr)
  kr = tonumber(kr or '0') or 0
  if kr <= 0 then return end
  local done = P .. ':t:' .. id .. ':done'
  redis.call('RPUSH', done, '1')
  redis.call('PEXPIRE', done, kr)
  local batch = redis.call('HGET', P .. ':t:' .. id, 'b')
  if batch and batch ~= '' then redis.call('RPUSH', P .. ':b:' .. batch .. ':r', id) end
end

-- finish(P, id, state, now, dur_ms, kr, kt, extra): a task reached its final state (succeeded,
-- failed or canceled) and leaves circulation. Its record is deleted, or, when it keeps its result
-- (field kr) or its record (field kt, Options.task_retention), kept for the longer of the two:
-- st = state, fa finished ms, du duration ms and the fields of `extra` (a flat list: the return
-- value rv, the error et/em/etb), then it expires; get_result's waiters are woken. kr and kt as
-- the caller read them (nil: read here). The idempotency key is the caller's (release_key).
local function finish(P, id, state, now, dur_ms, kr, kt, extra)
  local tkey = P .. ':t:' .. id
  if kr == nil then
    local f = redis.call('HMGET', tkey, 'kr', 'kt')
    kr, kt = f[1], f[2]
  end
  local keep = math.max(tonumber(kr or '0') or 0, tonumber(kt or '0') or 0)
  if keep <= 0 then
    redis.call('DEL', tkey)
    return
  end
  local f = {'st', state, 'fa', now, 'du', dur_ms or 0}
  for _, v in ipairs(extra or {}) do f[#f + 1] = v end
  redis.call('HSET', tkey, unpack(f))
  redis.call('PEXPIRE', tkey, keep)
  notify_done(P, id, kr)
end

-- A task whose retries are exhausted: dead letter list with its reason, or finished as failed
-- (deleted, unless it keeps its record) when the dead letter queue is off. Either way its batch
-- counts it as failed. A run enqueued by a schedule (field sch) is governed by dlsched
-- (Options.deadletter_schedules) instead: the next tick runs it again anyway.
local function bury(P, id, queue, batch, deadletter, etype, emsg, etb, now, dlsched, dur_ms)
  local tkey = P .. ':t:' .. id
  local tf = redis.call('HMGET', tkey, 'sch', 'tn', 'kr', 'kt', 'ik', 'ikt')
  release_key(P, id)
  if tf[1] then
    deadletter = dlsched
    -- a schedule's run that failed for good is told on its schedule (get_schedule's failures,
    -- last_failure, last_error): discarded by default, it would show nowhere else
    local skey = P .. ':s:' .. tf[1]
    if redis.call('EXISTS', skey) == 1 then
      redis.call('HINCRBY', skey, 'nf', 1)
      redis.call('HSET', skey, 'lf', now, 'le', string.sub(etype .. ': ' .. (emsg or ''), 1, 500), 'lft', id)
    end
  end
  local stats = P .. ':ts:' .. tf[2]
  redis.call('HINCRBY', stats, 'failed', 1)
  if deadletter == '1' then
    redis.call('HINCRBY', stats, 'dead', 1)
    redis.call('HSET', tkey, 'st', 'dead', 'r', '0', 'et', etype, 'em', emsg, 'etb', etb, 'da', now, 'fa', now,
               'du', dur_ms or 0)
    redis.call('RPUSH', P .. ':dead:' .. queue, id)
    if tf[5] then redis.call('HSET', tkey, 'xk', tf[5], 'xkt', tf[6] or '0') end   -- reclaim_key, on a retry
    notify_done(P, id, tf[3])
  else
    finish(P, id, 'failed', now, dur_ms, tf[3], tf[4], {'r', '0', 'et', etype, 'em', emsg, 'etb', etb})
  end
  settle_batch(P, batch, 'failed', 0, now)
end

-- A task going back to work (a retry, a release, a recovered lease, a dead letter retried) sheds
-- what described its last attempt: the worker, the lease start and the progress it reported,
-- so that get_task and the dashboard do not show a queued task as started somewhere, 80% done.
-- Further fields to drop in the same command may follow (a dead letter's error, when retried).
local function forget_attempt(tkey, ...)
  redis.call('HDEL', tkey, 'w', 'ls', 'pg', 'pt', 'pm', ...)
end

-- A failed attempt (or a lost lease) consumes one retry. Field r counts the attempts the task
-- may still fail, the one that just ended included (Options.retries: 3 = at most 3 failed
-- attempts in all), so the failure that brings it to 0 buries the task; r = 0 (retries=0) is
-- read as 1: one attempt, never retried. Otherwise r - 1 is stored and the task is delayed or
-- ready again. Returns 1 when it was requeued, 2 when it was buried instead.
local function retry_or_bury(P, id, queue, tenant, batch, delay_ms, deadletter, etype, emsg, etb, now, dlsched,
                             dur_ms)
  local tkey = P .. ':t:' .. id
  local left = tonumber(redis.call('HGET', tkey, 'r') or '0') - 1
  if left > 0 then
    redis.call('HSET', tkey, 'r', left, 'et', etype, 'em', emsg)
    forget_attempt(tkey)
    if delay_ms > 0 then push_delayed(P, queue, id, now + delay_ms)
    else push_ready(P, queue, tenant, id, false) end
    return 1
  end
  bury(P, id, queue, batch, deadletter, etype, emsg, etb, now, dlsched, dur_ms)   -- (r = 0 there)
  return 2
end

-- The id of the task holding an idempotency key (kname, P:key:<tenant>:<key>), or nil after
-- claiming the key for task id. A key is held by the live task it names (its hash names the key
-- back: a task deleted without releasing it holds nothing), by an ended one while "f:<id>"
-- lasts, never by a task of a canceled batch.
local function claim_key(P, kname, id)
  local cur = redis.call('GET', kname)
  if cur then
    if string.sub(cur, 1, 2) == 'f:' then return string.sub(cur, 3) end
    local f = redis.call('HMGET', P .. ':t:' .. cur, 'ik', 'b')
    if f[1] == kname and not batch_canceled(P, f[2]) then return cur end
  end
  redis.call('SET', kname, id)
  return nil
end

-- A dead letter moved back to work takes back the idempotency key it held before it was buried
-- (fields xk, xkt: bury) when the key is free, or still names it ("f:<id>", key_ttl): the retried
-- task then holds it again while it waits and runs, as it did before. A key that another task
-- claimed meanwhile stays with that task (claim_key's rules), and the retried task runs unkeyed.
local function reclaim_key(P, id)
  local tkey = P .. ':t:' .. id
  local f = redis.call('HMGET', tkey, 'xk', 'xkt')
  if not f[1] then return end
  redis.call('HDEL', tkey, 'xk', 'xkt')
  if redis.call('GET', f[1]) == 'f:' .. id then redis.call('SET', f[1], id)
  elseif claim_key(P, f[1], id) then return end
  redis.call('HSET', tkey, 'ik', f[1], 'ikt', f[2])
end

-- True when a running task was told to stop: cancel_task marked it (field cx) or its batch was
-- canceled. Such a task is never retried, buried or handed back, whatever it ended with.
local function told_to_stop(P, id, batch)
  return redis.call('HEXISTS', P .. ':t:' .. id, 'cx') == 1 or batch_canceled(P, batch)
end

-- Take a task that waits (queued, isolated, delayed, or a continuation waiting for its batch)
-- out of where it waits and out of the counter it is counted in; false when it is not there
-- (any other state: running, dead, staged), and then nothing changed.
local function unqueue(P, id, st, queue, tenant, cont_batch)
  if st == 'queued' then
    -- the tenant may stay in the queue's ring with an empty list: fetch.lua drops it from the ring
    if redis.call('LREM', P .. ':q:' .. queue .. ':' .. tenant, 1, id) == 0 then return false end
    redis.call('HINCRBY', P .. ':qs:' .. queue, 'ready', -1)
  elseif st == 'isolated' then
    if redis.call('LREM', P .. ':iso:' .. queue, 1, id) == 0 then return false end
    redis.call('HINCRBY', P .. ':qs:' .. queue, 'ready', -1)
  elseif st == 'delayed' then
    if redis.call('ZREM', P .. ':delayed', id) == 0 then return false end
    redis.call('HINCRBY', P .. ':qs:' .. queue, 'delayed', -1)
  elseif st == 'waiting' then
    if not cont_batch or redis.call('LREM', P .. ':b:' .. cont_batch .. ':cont', 1, id) == 0 then return false end
  else
    return false
  end
  return true
end


-- A task that ends canceled: key released, finished (deleted unless kept), counted canceled in
-- its batch (which counts its tenant too) or, without a batch, in its tenant's statistics.
local function end_canceled(P, id, tenant, batch, dur_ms, now)
  release_key(P, id)
  finish(P, id, 'canceled', now, dur_ms)
  if batch and batch ~= '' then
    settle_batch(P, batch, 'canceled', dur_ms, now)
  else
    redis.call('HINCRBY', P .. ':ts:' .. tenant, 'canceled', 1)
  end
end

-- take_out(P, id, reason, at, now): take a task whose record failed read_task out of circulation,
-- undoing what the call site says it was counted in, then set_aside (dead letter or quarantine).
-- at (every entry optional) is what the call site knows:
--   at.queue, at.tenant  where the task is counted (fetch: the list it was popped from; complete,
--                        fail, release: what the worker's fetch reply said). Otherwise the
--                        record's q / tn are used when usable; when neither is known, the
--                        counters of that queue / tenant cannot be fixed (the reason says so).
--   at.worker            the task is leased: counted in P:leases, P:wl:<worker>, qs:<queue>
--                        inflight, P:trun[tenant] and its batch's run; all undone here
--                        ('' = leased, owner unknown: removed from every P:wl:<w> of P:workers).
--   at.delayed           counted in qs:<queue> delayed (the caller took it off P:delayed).
--   at.batch             its batch, when the call site knows it (batch_publish); else the record's b
--   at.counted           counted in its batch's remaining (every task of a batch from commit to
--                        settlement: fetch, complete, fail, release, recover, batch_publish; not
--                        a continuation, nor a dead letter): settled as failed, like a burial.
--   at.etb               text for the dead letter's traceback field.
-- What each call site undoes itself: fetch's ready pop (qs ready) is in its aggregate; the
-- caller has already removed the id from the list or zset it took it from. A task of a canceled
-- batch is deleted instead, as wherever one is found (counted canceled here if it was running).
-- Returns 'dead', 'quarantined' or 'canceled'.
local function take_out(P, id, reason, at, now)
  local tkey = P .. ':t:' .. id
  local queue, tenant, batch = at.queue, at.tenant, at.batch
  local f = redis.pcall('HMGET', tkey, 'q', 'tn', 'b')
  if not f.err then
    if not queue and not field_problem(P, 'q', f[1], QUEUES) then queue = f[1] end
    if not tenant and not field_problem(P, 'tn', f[2], true) then tenant = f[2] end
    if not batch and f[3] and f[3] ~= '' then batch = f[3] end
  end
  if at.worker then
    redis.call('ZREM', P .. ':leases', id)
    if at.worker ~= '' then redis.call('HDEL', P .. ':wl:' .. at.worker, id)
    else   -- the record names no owner: every worker process with a heartbeat (renew.lua)
      for _, w in ipairs(redis.call('HKEYS', P .. ':workers')) do redis.call('HDEL', P .. ':wl:' .. w, id) end
    end
    if queue then redis.call('HINCRBY', P .. ':qs:' .. queue, 'inflight', -1) end
    if tenant then release_tenant(P, tenant, 1) end
    if batch and redis.call('EXISTS', P .. ':b:' .. batch) == 1 then
      redis.call('HINCRBY', P .. ':b:' .. batch, 'run', -1)
    end
  end
  if at.delayed and queue then redis.call('HINCRBY', P .. ':qs:' .. queue, 'delayed', -1) end
  local lost = {}   -- counters that stay one too high: said in the reason, for whoever reads it
  if at.worker and not queue then lost[#lost+1] = "its queue's in-flight count" end
  if at.worker and not tenant then lost[#lost+1] = "its tenant's running count" end
  if at.delayed and not queue then lost[#lost+1] = "its queue's delayed count" end
  if #lost > 0 then reason = reason .. ' (not undone, as unknown: ' .. table.concat(lost, ', ') .. ')' end
  if batch and batch_canceled(P, batch) then
    redis.call('DEL', tkey)
    if at.worker then settle_batch(P, batch, 'canceled', 0, now) end
    return 'canceled'
  end
  local where = set_aside(P, id, reason, queue, tenant, now, at.etb)
  if at.counted and batch then settle_batch(P, batch, 'failed', 0, now) end
  return where
end

-- An ARGV value that may be "" (unknown), as nil.
local function named(value)
  if value == '' then return nil end
  return value
end

-- read_task's answer for an answering worker, plus one more problem: a record that says it is
-- not running while it is in this worker's lease set (its state field was damaged meanwhile).
local function check_leased(P, worker, id, f, bad)
  if not bad and f[2] ~= 'running' and redis.call('HEXISTS', P .. ':wl:' .. worker, id) == 1 then
    return "field 'st' (state) is " .. quoted(f[2]) .. ', but the task is leased to worker ' .. worker
  end
  return bad
end

-- For complete, fail and release: is this answer for a damaged record this worker's to settle?
-- Yes when it presents the current token of a running task, or when the id is in the worker's
-- leases (lease_entry): then take_out. Otherwise the answer is stale and changes nothing, as
-- for a sound record.
local function owns_lease(P, worker, id, token, f)
  if f and f[1] == token and f[2] == 'running' then return true end
  return redis.call('HEXISTS', P .. ':wl:' .. worker, id) == 1
end

-- The lease token that follows a record's stored attempt `a` (as read_task read it: an integer,
-- or false when absent), as a string: a first attempt's is a constant, so the usual lease turns
-- no number into a string (sprintf, ~0.5 us each in Lua; fetch.lua).
local function next_attempt(a)
  if not a or a == '0' then return '1' end
  return tostring(tonumber(a) + 1)
end

-- A worker process's leases, P:wl:<worker>: a hash of task id -> this value. Every lease writes
-- its entry (fetch.lua, fetch_isolated.lua, a hand-off in enqueue.lua) and every script that
-- ends a lease deletes it in the same call, so an entry that holds an acknowledgement's token is
-- the lease itself, and complete.lua deletes the record without reading it (lease_entry_batch).
-- The entry is the token, then "|" and the batch's id for a task of a batch, or "*" when the
-- acknowledgement needs the record (an idempotency key, a kept result or record): complete.lua
-- reads those as before. (docs/decisions.md, "Acknowledgements")
local function lease_entry(attempt, batch, needs_record)
  if needs_record then return attempt .. '*' end
  if batch and batch ~= '' then return attempt .. '|' .. batch end
  return tostring(attempt)
end

-- For an entry that vouches for `token` without the record: true and the batch (nil for none);
-- false when the entry is another lease's, or says to read the record.
local function lease_entry_batch(entry, token)
  if entry == token then return true, nil end
  if entry and string.sub(entry, 1, #token + 1) == token .. '|' then return true, string.sub(entry, #token + 2) end
  return false
end

-- Acknowledge finished tasks of one worker: the groups of seven in args[first..last] (id, token,
-- outcome "ok" | "canceled", duration ms, queue and tenant the fetch reply named ("" = unknown:
-- the record's q and tn are read), the encoded return value ("" = none, or not kept)).
-- An acknowledgement counts only if it presents the task's current lease token, as the worker's
-- lease entry holds it (lease_entry), so an answer from a worker whose lease expired changes
-- nothing. The entries of every acknowledged task are read at once; the record of a task without
-- an idempotency key or a kept result or record (its queue and tenant named; its batch, if any,
-- in the entry) is then deleted unread, and all of them in one DEL, so such an acknowledgement
-- costs no command of its own. The others read their records, which also meets a damaged one.
-- A canceled task of no batch is counted in its tenant's statistics (a batch's task: in its
-- batch, which counts the tenant). A keyed task gives up its idempotency key (release_key). A
-- task that keeps its result or record (fields kr, kt) stays as a finished record (finish).
-- Counters are aggregated per queue, tenant and batch; each queue's acknowledgements count once
-- in the minute's history. `net` nil: the queues' in-flight counts and the tenants' running
-- counts are written here; a table {inflight = {queue -> n}, running = {tenant -> n}}: they are
-- subtracted into it instead, for a caller that leases in the same call and writes each count
-- once, net (fetch.lua); tenants held back at their concurrency limit are re-admitted either way.
-- Returns one code per group: 1 = counted, 0 = stale token, unknown task or a repeat within the
-- call (ignored), 2 = this worker's lease on a damaged record: taken out (take_out) instead.
local ACK_FIELDS, ACK_FIELDS_QT = {'a', 'st', 'b', 'ik', 'kr', 'kt'}, {'a', 'st', 'b', 'ik', 'kr', 'kt', 'q', 'tn'}
local function acknowledge(P, worker, leases, wl, args, first, last, now, net)
  local codes, ids, gone, seen = {}, {}, {}, {}
  local per_queue, per_tenant, per_tenant_done, per_batch = {}, {}, {}, {}
  local per_tenant_canceled = {}
  local asked = {}
  for i = first, last, 7 do asked[#asked+1] = args[i] end
  if #asked == 0 then return codes end
  local entries = redis.call('HMGET', wl, unpack(asked))
  for i = first, last, 7 do
    local id, token, ok = args[i], args[i+1], args[i+2] == 'ok'
    local queue, tenant = named(args[i+4]), named(args[i+5])
    local vouched, batch = lease_entry_batch(entries[(i - first) / 7 + 1], token)
    local f, bad
    if seen[id] then
      f = {}   -- a repeat inside one call: ignored (its record goes in the DEL below, counted once)
    elseif vouched and queue and tenant then
      f = {token, 'running', batch}   -- the lease itself: running, this token and batch; nothing to read
    elseif queue and tenant then
      f, bad = read_task(P, id, ACK_FIELDS, {a = true, st = true})
      bad = check_leased(P, worker, id, f, bad)
    else
      f, bad = read_task(P, id, ACK_FIELDS_QT, {a = true, st = true, q = not queue and QUEUES or nil,
                                                tn = not tenant or nil})
      bad = check_leased(P, worker, id, f, bad)
    end
    if bad then
      if owns_lease(P, worker, id, token, f) then
        take_out(P, id, bad, {worker = worker, queue = queue, tenant = tenant, counted = true,
                              etb = 'the task ran and ' .. (ok and 'succeeded' or 'was canceled') .. ' after '
                                    .. args[i+3] .. ' ms; its record was damaged when it was acknowledged'}, now)
        codes[#codes+1] = 2
      else
        codes[#codes+1] = 0
      end
    elseif f[1] == token and f[2] == 'running' then
      queue, tenant = queue or f[7], tenant or f[8]
      if f[4] then release_key(P, id) end
      if f[5] or f[6] then
        local result = {}
        if args[i+6] ~= '' then result = {'rv', args[i+6]} end
        finish(P, id, ok and 'succeeded' or 'canceled', now, tonumber(args[i+3]), f[5], f[6], result)
      else
        gone[#gone+1] = P .. ':t:' .. id
      end
      ids[#ids+1] = id
      seen[id] = true
      per_queue[queue] = (per_queue[queue] or 0) + 1
      per_tenant[tenant] = (per_tenant[tenant] or 0) + 1
      if ok then per_tenant_done[tenant] = (per_tenant_done[tenant] or 0) + 1 end
      if not ok and (not f[3] or f[3] == '') then
        per_tenant_canceled[tenant] = (per_tenant_canceled[tenant] or 0) + 1
      end
      if f[3] and f[3] ~= '' then
        local acc = per_batch[f[3]]
        if not acc then acc = {n = 0, ok = 0, canceled = 0, dur = 0}; per_batch[f[3]] = acc end
        acc.n = acc.n + 1
        acc.dur = acc.dur + tonumber(args[i+3])
        if ok then acc.ok = acc.ok + 1 else acc.canceled = acc.canceled + 1 end
      end
      codes[#codes+1] = 1
    else
      codes[#codes+1] = 0
    end
  end
  if #ids > 0 then
    redis.call('ZREM', leases, unpack(ids))
    redis.call('HDEL', wl, unpack(ids))
  end
  if #gone > 0 then redis.call('DEL', unpack(gone)) end   -- one slot: every key has the deployment's tag
  for q, n in pairs(per_queue) do
    if net then net.inflight[q] = (net.inflight[q] or 0) - n
    else redis.call('HINCRBY', P .. ':qs:' .. q, 'inflight', -n) end
    history(P, q, n, 0, now)
  end
  for t, n in pairs(per_tenant) do
    if net then
      net.running[t] = (net.running[t] or 0) - n
      release_tenant(P, t, 0)
    else release_tenant(P, t, n) end
  end
  for t, n in pairs(per_tenant_done) do redis.call('HINCRBY', P .. ':ts:' .. t, 'done', n) end
  for t, n in pairs(per_tenant_canceled) do redis.call('HINCRBY', P .. ':ts:' .. t, 'canceled', n) end
  for b, acc in pairs(per_batch) do
    local bkey = P .. ':b:' .. b
    if redis.call('EXISTS', bkey) == 1 then
      redis.call('HINCRBY', bkey, 'run', -acc.n)
      if acc.ok > 0 then settle_batch_n(P, b, 'done', acc.ok, acc.dur, now) end
      if acc.canceled > 0 then settle_batch_n(P, b, 'canceled', acc.canceled, acc.ok > 0 and 0 or acc.dur, now) end
    end
  end
  return codes
end

-- A reply (strings, numbers, arrays of them) as one string, for a list element: a value is
-- "<length>:<bytes>", an array "[<length>:" and its packed values (records.py parse_handoff).
local function pack(v)
  if type(v) == 'table' then
    local parts = {}
    for i = 1, #v do parts[i] = pack(v[i]) end
    local s = table.concat(parts)
    return '[' .. #s .. ':' .. s
  end
  v = tostring(v)
  return #v .. ':' .. v
end

-- Is worker process `worker` ("<host>:<manager pid>:<suffix>") paused by P:pausedw (`key`), by its
-- host or by its manager ("<host>:<pid>")? An id of another form is matched as a whole.
local function worker_paused(key, worker)
  local host, pid = string.match(worker, '^(.*):(%d+):[^:]*$')
  if not host then return redis.call('SISMEMBER', key, worker) == 1 end
  return redis.call('SISMEMBER', key, host) == 1 or redis.call('SISMEMBER', key, host .. ':' .. pid) == 1
end

-- Idle worker processes (hand-off, docs/decisions.md): a process with every thread free whose
-- fetch found nothing registers until `deadline` (server ms) and blocks on its inbox
-- P:inbox:<worker>; enqueue.lua then leases a new task to it at once instead of waking it to
-- fetch. P:idle holds worker -> JSON [lease ms, default tenant limit, queues],
-- P:idlers:<queue> the registered workers by deadline.
local function idle_register(P, worker, deadline, lease_ms, deflim, queues)
  redis.call('HSET', P .. ':idle', worker, cjson.encode({lease_ms, deflim, queues}))
  for _, q in ipairs(queues) do redis.call('ZADD', P .. ':idlers:' .. q, deadline, worker) end
end

-- Ends a worker's registration; returns it ({lease ms, limit, queues}) or nil when there was none.
local function idle_unregister(P, worker)
  local reg = redis.call('HGET', P .. ':idle', worker)
  if not reg then return nil end
  redis.call('HDEL', P .. ':idle', worker)
  reg = cjson.decode(reg)
  for _, q in ipairs(reg[3]) do redis.call('ZREM', P .. ':idlers:' .. q, worker) end
  return reg
end

-- The idle worker that takes a new ready task of `queue` and `tenant` at once, and its
-- registration; nil when none may. Only while no other task of the queue is ready (its ring is
-- empty: fetches serve those in turn), and under the rules a fetch leases by (fetch.lua): not
-- paused (everything, the queue, the tenant, or the worker: worker_paused), the tenant under its
-- concurrency limit. A
-- registration past its deadline is dropped (that worker's wait ended: it fetches again, or
-- it is gone).
local function idle_taker(P, queue, tenant, now)
  if redis.call('EXISTS', P .. ':ring:' .. queue) == 1 then return nil end
  local key = P .. ':idlers:' .. queue
  while true do
    -- ZRANGE, then idle_unregister's ZREM: no command beyond those the documented ACL user
    -- had before hand-offs existed (an upgrade needs no ACL change to enqueue)
    local top = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if not top[1] then return nil end
    local worker, deadline = top[1], tonumber(top[2])
    local reg = idle_unregister(P, worker)
    if not reg then redis.call('ZREM', key, worker) end
    if reg and deadline > now then
      -- the pause, paused queues and tenants, tenant limits: one EXISTS asks whether any exist
      -- at all (the usual answer is no), as fetch.lua's gate; only then is each asked
      local gated = redis.call('EXISTS', P .. ':paused', P .. ':pausedq', P .. ':pausedt', P .. ':tlim',
                               P .. ':pausedw') > 0
      local limit = tonumber(gated and redis.call('HGET', P .. ':tlim', tenant) or reg[2])
      if (not gated or (redis.call('EXISTS', P .. ':paused') == 0
                        and redis.call('SISMEMBER', P .. ':pausedq', queue) == 0
                        and redis.call('SISMEMBER', P .. ':pausedt', tenant) == 0
                        and not worker_paused(P .. ':pausedw', worker)))
          and (limit <= 0 or tonumber(redis.call('HGET', P .. ':trun', tenant) or '0') < limit) then
        return worker, reg
      end
      idle_register(P, worker, deadline, reg[1], reg[2], reg[3])   -- it waits on
      return nil
    end
  end
end
