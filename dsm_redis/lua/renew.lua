-- Extend a lease we still own (python-redis-lock's EXTEND works in whole seconds; this in ms), and
-- keep the object's fencing counter from expiring while it is in use.
-- KEYS[1] lock key      KEYS[2] fencing counter
-- ARGV[1] owner id      ARGV[2] lease TTL in milliseconds   ARGV[3] counter idle TTL in ms (0: never)
-- Returns 1 when extended, 0 when the lease is gone or held by someone else.
if redis.call('GET', KEYS[1]) == ARGV[1] then
    -- Never to before the lease's new expiry: a counter expiring under a live lease would let a
    -- later lease be re-anchored below this holder's token (see keep_counter in queue.lua).
    if tonumber(ARGV[3]) > 0 then
        redis.call('PEXPIRE', KEYS[2], math.max(tonumber(ARGV[3]), tonumber(ARGV[2])))
    end
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
