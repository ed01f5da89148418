-- The waiter queue and the hand-over, shared by acquire.lua and release.lua (prepended to each,
-- so it runs inside their single atomic call; it defines functions and touches no key by itself).
-- KEYS[1] lock key (value: owner id)   KEYS[2] fencing counter
-- KEYS[3] queue (sorted set: owner id -> arrival time in microseconds, oldest first)
-- KEYS[4] deadlines (hash: owner id -> Redis time in ms after which that waiter is skipped)
-- ARGV: see the including script (the functions below take what they need as arguments).
-- Returns: nothing (a fragment). Every key of one object carries one hash tag, and so does each
-- waiter's wake-up list (grant_prefix .. owner id): on Redis Cluster all of them share the slot.

-- Deadlines are judged by the clock of the Redis that stores them: waiters' clocks never compare.
-- TIME before writes needs scripts replicated by their effects: the default from Redis 5, the only
-- mode from Redis 7 (Redis 3.2/4 would refuse the write after TIME).

-- Now, in ms (a number, for deadlines) and in microseconds (a string: an arrival score, exact).
local function now_ms()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), t[1] .. string.format('%06d', tonumber(t[2]))
end

-- Push the idle counter's expiry back to idle_ms (0: never expires), and never to before the
-- lock's own expiry. Closes: a counter expiring under a live lease restarts low, the next lease is
-- re-anchored just above the database's mark, and a holder that lost its lease before writing
-- still presents a higher token than that newer lease, so its late commit would be accepted.
local function keep_counter(idle_ms)
    if idle_ms > 0 then
        redis.call('PEXPIRE', KEYS[2], math.max(idle_ms, redis.call('PTTL', KEYS[1])))
    end
end

-- Mint the next fencing token for the lock as just set. A counter that restarts low (after idling
-- out with no lease, or a Redis restart) is refused by the database's mark and re-anchored at the
-- lease's first judgement.
local function mint(idle_ms)
    local token = redis.call('INCR', KEYS[2])
    keep_counter(idle_ms)
    return token
end

-- The oldest waiter still before its deadline; those past theirs (dead, or gone after a timeout
-- without leaving) are dropped on the way. false when nobody is waiting. Reads the clock only
-- when someone is queued: the uncontended path stays a handful of commands.
local function oldest()
    local now
    while true do
        local first = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
        if not first then
            return false
        end
        now = now or now_ms()
        if tonumber(redis.call('HGET', KEYS[4], first) or '0') > now then
            return first
        end
        redis.call('ZREM', KEYS[3], first)
        redis.call('HDEL', KEYS[4], first)
    end
end

local function leave(owner)
    redis.call('ZREM', KEYS[3], owner)
    redis.call('HDEL', KEYS[4], owner)
end

-- Grant the free lock to a queued waiter and wake it: it holds the lease for grace_ms only, until
-- its own next call extends it to its TTL, so a waiter that died after its last call costs grace_ms.
local function hand_over(waiter, grace_ms, idle_ms, grant_prefix)
    redis.call('SET', KEYS[1], waiter, 'PX', grace_ms)
    local token = mint(idle_ms)
    leave(waiter)
    local wake = grant_prefix .. waiter
    redis.call('RPUSH', wake, token)
    redis.call('PEXPIRE', wake, grace_ms)
    return token
end
