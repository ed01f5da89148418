-- Re-anchor a fencing counter that Redis lost (restart without persistence, failover, flush,
-- eviction, or expired while idle): only for the current owner, raise the counter above the
-- database's mark and mint.
-- KEYS[1] lock key      KEYS[2] fencing counter
-- ARGV[1] owner id      ARGV[2] the highest token the database has committed for the object
-- ARGV[3] counter idle TTL in ms (0: never expires)
-- Returns the new token, or -1 when the caller no longer owns the lease (a genuinely stale holder).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return -1
end
local floor = tonumber(ARGV[2])
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
if current < floor then
    redis.call('SET', KEYS[2], floor)
end
local token = redis.call('INCR', KEYS[2])
-- SET cleared the counter's expiry: an idle counter must still expire, never before the lease
-- that re-anchored it (a later lease would restart below this token: keep_counter in queue.lua).
if tonumber(ARGV[3] or '0') > 0 then
    redis.call('PEXPIRE', KEYS[2], math.max(tonumber(ARGV[3]), redis.call('PTTL', KEYS[1])))
end
return token
