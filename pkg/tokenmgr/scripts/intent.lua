-- The refresh intent of a version (invariants 4 and 10 in doc.go): who is
-- about to spend its refresh token, and whether an earlier attempt may have
-- spent it already without its answer reaching Redis.
-- KEYS[1] record hash, KEYS[2] intent hash
-- ARGV[1] "begin" or "settle", ARGV[2] version, ARGV[3] family, ARGV[4] holder,
-- ARGV[5] now (unix ms), ARGV[6] intent TTL (ms)
--
-- begin, before the provider call: returns {1, doubt_holder, doubt_since,
-- attempts}, where doubt_holder and doubt_since ('' if none) name the
-- earliest earlier attempt at this version whose outcome is unknown: the
-- provider may have rotated, and its answer may be lost or still held by
-- that holder. The provider's reuse leeway counts from doubt_since. Returns
-- {0, stored_v} when the version or family moved on, {-1} when the record
-- is gone.
--
-- settle, after a definite answer without a rotation (the provider refused,
-- or the request never left): clears the doubt this holder's attempt added.
-- Returns 1 when it did, 0 when the intent moved on.
local v = redis.call('HGET', KEYS[1], 'v')
if not v then
  return {-1}
end
local family = redis.call('HGET', KEYS[1], 'family') or ''
if v ~= ARGV[2] or family ~= ARGV[3] then
  return {0, tonumber(v) or -1}
end
local cur = redis.call('HMGET', KEYS[2], 'holder', 'from_v', 'family', 'attempts', 'doubt_since', 'doubt_holder', 'own_doubt')
local same = cur[2] == ARGV[2] and (cur[3] or '') == ARGV[3]
if ARGV[1] == 'settle' then
  if not same or cur[1] ~= ARGV[4] then
    return 0
  end
  if cur[7] == '1' then
    redis.call('HDEL', KEYS[2], 'doubt_since', 'doubt_holder')
  end
  redis.call('HSET', KEYS[2], 'own_doubt', '0')
  return 1
end
local attempts, since, holder = 1, '', ''
if same then
  attempts = tonumber(cur[4] or '0') + 1
  since, holder = cur[5] or '', cur[6] or ''
end
local own = '0'
local newSince, newHolder = since, holder
if since == '' then
  own, newSince, newHolder = '1', ARGV[5], ARGV[4]
end
redis.call('HSET', KEYS[2], 'holder', ARGV[4], 'from_v', ARGV[2], 'family', ARGV[3], 'started_at', ARGV[5],
  'attempts', attempts, 'doubt_since', newSince, 'doubt_holder', newHolder, 'own_doubt', own)
redis.call('PEXPIRE', KEYS[2], ARGV[6])
return {1, holder, since, attempts}
