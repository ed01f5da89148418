-- Take a lease and mint its fencing token in one round trip, or queue for it (first come, first
-- served: a release hands the lease to the oldest live waiter, see queue.lua, prepended).
-- KEYS[1] lock key   KEYS[2] fencing counter   KEYS[3] queue   KEYS[4] deadlines
-- KEYS[5] the caller's wake-up list (grant_prefix .. owner id)
-- ARGV[1] owner id   ARGV[2] lease TTL in ms   ARGV[3] ms to keep the caller queued (0: do not queue)
-- ARGV[4] hand-over grace in ms   ARGV[5] counter idle TTL in ms (0: never expires)
-- ARGV[6] grant_prefix (the wake-up list name of a waiter, without its owner id)
-- Returns {1, token} when the lease is ours, with the TTL extended to ARGV[2] (taken now, handed
-- over to us by a release, or a retried call after a lost reply: the same token, not a wait for
-- ourselves), or {0, pttl} with the holder's remaining TTL in ms (queued unless ARGV[3] is 0).
local owner, ttl_ms, stay_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])
local grace_ms, idle_ms, grant_prefix = ARGV[4], tonumber(ARGV[5]), ARGV[6]
-- Uncontended: nobody queued and the lease free, four commands. The counter's expiry is pushed
-- past the new lease here too (keep_counter in queue.lua says which race that closes): left where
-- the last release put it, it could run out a moment after this token was minted.
if redis.call('EXISTS', KEYS[3]) == 0 and redis.call('SET', KEYS[1], owner, 'NX', 'PX', ttl_ms) then
    local token = redis.call('INCR', KEYS[2])
    if idle_ms > 0 then
        redis.call('PEXPIRE', KEYS[2], math.max(idle_ms, tonumber(ttl_ms)))
    end
    return {1, token}
end
local holder = redis.call('GET', KEYS[1])
if holder == owner then
    redis.call('PEXPIRE', KEYS[1], ttl_ms)
    redis.call('DEL', KEYS[5])
    local token = redis.call('GET', KEYS[2])
    -- A grant's counter outlived its grace (keep_counter), so the extension finds the token
    -- minted for it, and keeps it alive for the TTL it now sets.
    keep_counter(idle_ms)
    return {1, tonumber(token or '0')}
end
if not holder then
    local first = oldest()
    if not first or first == owner then
        -- Free, and nobody live queued ahead of us (only entries past their deadline, now dropped).
        redis.call('SET', KEYS[1], owner, 'PX', ttl_ms)
        if first then
            leave(owner)
        end
        return {1, mint(idle_ms)}
    end
    -- Free with an older waiter queued (a holder died, a grant lapsed): it is that waiter's turn,
    -- never a newcomer's.
    hand_over(first, grace_ms, idle_ms, grant_prefix)
end
if stay_ms > 0 then
    local now, now_us = now_ms()
    -- Queued once (a retry keeps its place), and present until the deadline it renews each call.
    if not redis.call('ZSCORE', KEYS[3], owner) then
        redis.call('ZADD', KEYS[3], now_us, owner)
    end
    redis.call('HSET', KEYS[4], owner, string.format('%d', now + stay_ms))
    -- The queue outlives no waiter: both keys vanish after the latest deadline.
    if redis.call('PTTL', KEYS[3]) < stay_ms then
        redis.call('PEXPIRE', KEYS[3], stay_ms)
        redis.call('PEXPIRE', KEYS[4], stay_ms)
    end
end
return {0, redis.call('PTTL', KEYS[1])}
