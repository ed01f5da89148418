-- Take a lease and mint its fencing token in one round trip.
-- KEYS[1] lock key (value: owner id)      KEYS[2] fencing counter (per object, never expires)
-- ARGV[1] owner id                        ARGV[2] lease TTL in milliseconds
-- Returns {1, token} when the lease is ours (a retried call after a lost reply returns the same
-- token instead of waiting for itself), or {0, pttl} with the holder's remaining TTL in ms.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return {1, redis.call('INCR', KEYS[2])}
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, tonumber(redis.call('GET', KEYS[2]) or '0')}
end
return {0, redis.call('PTTL', KEYS[1])}
