-- move_done.lua: forget a task here once move_in.lua stored it on its new shard (rebalance), and
-- leave its new id behind for anyone who asks about the old one.
-- KEYS[1]  P:t:<old id>   KEYS[2] P:moving   KEYS[3] P:fw:<old id>
-- ARGV[1]  old id   ARGV[2] new id   ARGV[3] how long the forward is kept (ms)
-- Reply: 1
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], ARGV[2], 'PX', tonumber(ARGV[3]))
return 1
