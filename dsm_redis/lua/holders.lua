-- Describe one lease for operators (dsm_locks).
-- KEYS[1] lock key      KEYS[2] fencing counter
-- Returns {owner or false, pttl in ms, counter or false}.
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1]), redis.call('GET', KEYS[2])}
