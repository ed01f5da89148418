-- Release a lease we own and hand it over to the oldest live waiter (see queue.lua, prepended),
-- or leave the queue: a waiter that gives up calls this too, and gives back a grant that reached
-- it too late.
-- KEYS[1] lock key   KEYS[2] fencing counter   KEYS[3] queue   KEYS[4] deadlines
-- KEYS[5] python-redis-lock's wake-up list (signalled when no waiter of ours takes the lease)
-- ARGV[1] owner id   ARGV[2] hand-over grace in ms   ARGV[3] counter idle TTL in ms (0: never)
-- ARGV[4] grant_prefix   ARGV[5] lifetime of the python-redis-lock signal in ms
-- Returns 1 when the caller held the lease (now released or handed over), 0 otherwise.
local owner = ARGV[1]
leave(owner)
redis.call('DEL', ARGV[4] .. owner)
if redis.call('GET', KEYS[1]) ~= owner then
    return 0
end
redis.call('DEL', KEYS[1])
local now = now_ms()
local first = oldest(now)
if first then
    hand_over(first, ARGV[2], tonumber(ARGV[3]), ARGV[4])
    return 1
end
-- Nobody queued: wake a python-redis-lock client waiting on the same name, as its UNLOCK does.
redis.call('DEL', KEYS[5])
redis.call('LPUSH', KEYS[5], 1)
redis.call('PEXPIRE', KEYS[5], ARGV[5])
return 1
