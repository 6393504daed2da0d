-- Records, before the IdP call, that a holder is about to spend the refresh
-- token read at version ARGV[1] (invariant 4 in doc.go). If an intent for the
-- same version is already there, a previous holder may have spent the token
-- and died: keep its start time, since the provider's reuse leeway counts
-- from the first use.
-- KEYS[1] record hash, KEYS[2] intent hash
-- ARGV[1] version, ARGV[2] holder, ARGV[3] now (unix ms), ARGV[4] intent TTL (ms)
-- Returns {1, previous_holder, started_at, attempts} or {0, stored_v} when the
-- version moved on, {-1} when the record is gone.
local v = redis.call('HGET', KEYS[1], 'v')
if not v then
  return {-1}
end
if v ~= ARGV[1] then
  return {0, v}
end
local prev = redis.call('HMGET', KEYS[2], 'holder', 'from_v', 'started_at', 'attempts')
local started = ARGV[3]
local previous = ''
local attempts = 1
if prev[2] == ARGV[1] then
  previous = prev[1] or ''
  started = prev[3] or ARGV[3]
  attempts = tonumber(prev[4] or '1') + 1
end
redis.call('HSET', KEYS[2], 'holder', ARGV[2], 'from_v', ARGV[1], 'started_at', started, 'attempts', attempts)
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return {1, previous, started, attempts}
