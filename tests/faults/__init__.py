"""Fault-injection suite (issue 7): every scenario ends by asserting the final state of every task
involved (runs counted per task by the tasks themselves, coretask's queue, batch and tenant
counters, leases).

Scenario -> test
================

Network faults (tests/faults/proxy.py: a threaded asyncio TCP proxy with latency, reset-all,
half-open and lost-reply knobs; the worker behind it sets ``?socket_timeout=1`` in its URL, which
redis-py's URL options let override coretask's 30 s default, so Options needs no new field)
  - 50 ms latency, worker behind the proxy with invisibility=2, 4 tasks longer than it: leases
    renewed through the slow link, every task exactly once
      -> test_network.py::test_latency_50ms_leases_are_kept_and_every_task_runs_exactly_once
  - every connection (loop, pub/sub, producer) reset 5 times mid-run: reconnects, every task
    exactly once, the producer never fails
      -> test_network.py::test_every_connection_reset_mid_run_the_worker_reconnects_and_all_tasks_complete
  - a fetch reply lost to a reset after Redis ran the script (redis-py resends the call): the
    tasks it leased are handed back, not left leased to a live worker forever
      -> test_network.py::test_fetch_reply_lost_to_a_reset_the_tasks_it_leased_are_handed_back
  - half-open longer than invisibility: the leases expire, another worker (direct) runs the
    tasks; the first worker's late acknowledgements (stale tokens) change nothing; its late fetch
    does not strand tasks; exact run counts and counters
      -> test_network.py::test_half_open_longer_than_invisibility_leases_expire_and_late_acks_change_nothing
  - Redis restart (appendonly), pub/sub connection killed, producer fails fast while Redis is down
      -> tests/test_reconnect.py (test_worker_survives_redis_restart_and_no_acknowledged_task_is_lost,
         test_pubsub_connection_killed_is_reconnected_and_resubscribed,
         test_producer_fails_fast_with_connection_error_while_redis_is_down)
  - stale lease tokens, call by call
      -> tests/test_lifecycle.py::test_stale_tokens_change_nothing

Server state (a server of the test's own)
  - SCRIPT FLUSH every 30 ms while a manager and a producer work
      -> test_server_state.py::test_script_flush_while_running_scripts_reload_and_every_task_completes
  - maxmemory (noeviction) reached: enqueue_task and enqueue_batch raise StoreFull naming
    maxmemory, the keyspace is unchanged (a batch whose first chunks were staged is cleaned up),
    running tasks are still acknowledged, work continues once maxmemory is raised
      -> test_server_state.py::test_maxmemory_reached_enqueue_raises_store_full_and_writes_nothing

Refusals: replies by which a server declines a call for now (coretask/gateway/refusals.py),
waited out for Options.busy_timeout, then StoreUnavailable(reason=...); manager + producer under
load, every task exactly once after (workload.py: producer thread + reconcile)
  - BUSY (a 2 s script, busy-reply-threshold 50 ms; also on the wait_replicas path, EVALSHA +
    WAIT to a master with a replica), MISCONF (a failed snapshot with
    stop-writes-on-bgsave-error), LOADING (a restart with a dataset that loads for seconds)
      -> test_refusals.py
  - AOF appendfsync everysec, kill -9 under load: acknowledged enqueues lost only within the
    stated bound (2 s before the kill; measured 0)
      -> test_aof.py
  - Redis Cluster (a 6-node cluster of the tests' own, whatever --server says): graceful CLUSTER FAILOVER, the prefix's slot migrated
    key by key (TRYAGAIN/ASK; the migration guard), CLUSTERDOWN with two masters killed
      -> test_cluster_faults.py

Poison tasks
  - payload over max_payload_bytes, refused at enqueue with both sizes
      -> tests/test_enqueue.py::test_payload_over_max_payload_bytes_is_refused_with_both_sizes
  - unimportable target, corrupted payload, unknown serializer
      -> tests/test_lifecycle.py::test_unloadable_tasks_are_dead_lettered_and_the_worker_goes_on
  - a task that kills its own process, repeatedly -> dead letter after its retries
      -> tests/test_worker.py::test_task_killing_its_own_process_is_dead_lettered_after_its_retries
  - SystemExit, KeyboardInterrupt, sys.exit(), an application BaseException subclass
      -> test_poison.py::test_base_exceptions_are_failures_and_the_worker_threads_survive
  - a task returning a huge (300 MiB) object
      -> test_poison.py::test_a_task_returning_a_huge_object_completes_and_the_object_is_dropped
  - an exception whose __str__ raises / returns a non-string
      -> test_poison.py::test_exceptions_whose_str_fails_are_dead_lettered_with_a_placeholder

Worker recycling (Options.max_tasks_per_process, Options.max_memory_per_process in MiB of RSS)
  -> test_recycle.py: test_max_tasks_per_process_50_over_500_tasks,
     test_max_memory_per_process_recycles_a_leaking_process,
     test_quick_recycles_are_not_crashes_and_get_no_backoff,
     test_embedded_run_ignores_the_recycling_limits, test_recycling_limits_are_validated

Worker processes killed and shut down
  - kill -9 of a worker mid-task, manager restarts it, SIGKILL of the manager (no orphans), the
    whole group killed (lease expiry), SIGTERM with one task / a task longer than shutdown_timeout
      -> tests/test_worker.py
  - SIGTERM with 100 tasks running (2 x 50 threads, 0.5-3 s, shutdown_timeout=2): each finishes or
    is handed back by the deadline; after a second manager drains, each ran to completion once
      -> test_shutdown.py::test_sigterm_with_100_tasks_running_each_finishes_or_is_handed_back_exactly_once

Soak (benchmarks/soak.py; long form by hand: ``python -m benchmarks.soak --tasks 200000``)
  -> test_soak.py::test_soak_5000_tasks_with_kills_failures_cancellations_and_a_pause
"""
