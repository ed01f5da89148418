-- Extend a lease we still own (python-redis-lock's EXTEND works in whole seconds; this in ms).
-- KEYS[1] lock key      ARGV[1] owner id      ARGV[2] lease TTL in milliseconds
-- Returns 1 when extended, 0 when the lease is gone or held by someone else.
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
