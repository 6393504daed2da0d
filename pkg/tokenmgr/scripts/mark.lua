-- Sets fields of the record at version ARGV[1] without a rotation:
-- "reauth_required" with its reason (the grant is dead, invariant 6 in
-- doc.go), a fleet-wide retry_at after a transient IdP error, or the same tokens
-- re-encrypted under a new key (rewrap). Never creates a record, never
-- touches a newer one.
-- KEYS[1] record hash, KEYS[2] intent hash
-- ARGV[1] version, ARGV[2] channel, ARGV[3] grant, ARGV[4] "dead", "defer" or "rewrap",
-- ARGV[5..] field/value pairs
-- Returns 1 when written, 0 when the version moved on or the record is gone.
local v = redis.call('HGET', KEYS[1], 'v')
if v ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
if ARGV[4] == 'dead' then
  redis.call('DEL', KEYS[2])
  redis.call('PUBLISH', ARGV[2], ARGV[3] .. ' ' .. v .. ' reauth_required')
end
return 1
