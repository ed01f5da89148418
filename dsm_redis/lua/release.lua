-- Release a lease we own and hand it over to the oldest live waiter (see queue.lua, prepended),
-- or leave the queue: a waiter that gives up calls this too, and gives back a grant that reached
-- it too late.
-- KEYS[1] lock key   KEYS[2] fencing counter   KEYS[3] queue   KEYS[4] deadlines
-- KEYS[5] python-redis-lock's wake-up list (signalled when no waiter of ours takes the lease)
-- ARGV[1] owner id   ARGV[2] hand-over grace in ms   ARGV[3] counter idle TTL in ms (0: never)
-- ARGV[4] grant_prefix   ARGV[5] lifetime of the python-redis-lock signal in ms
-- Returns 1 when the caller held the lease (now released or handed over), 0 otherwise.
local owner = ARGV[1]
if redis.call('GET', KEYS[1]) ~= owner then
    -- Not (or no longer) the holder: a waiter giving up, or a retried release. Leave the queue.
    leave(owner)
    redis.call('DEL', ARGV[4] .. owner)
    return 0
end
-- The holder is never queued: hand_over and a direct take both took it out of the queue. (A
-- grant given back by a waiter that gave up leaves its wake-up list to expire with the grace.)
redis.call('DEL', KEYS[1])
-- The counter was just used: its idle expiry starts again (after the work, off the acquire path).
if tonumber(ARGV[3]) > 0 then
    redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
local first = oldest()
if first then
    hand_over(first, ARGV[2], tonumber(ARGV[3]), ARGV[4])
    return 1
end
-- Nobody queued: wake a python-redis-lock client waiting on the same name, as its UNLOCK does.
redis.call('DEL', KEYS[5])
redis.call('LPUSH', KEYS[5], 1)
redis.call('PEXPIRE', KEYS[5], ARGV[5])
return 1
