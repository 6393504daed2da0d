-- Sets fields of the record at version ARGV[1] of family ARGV[2] without a
-- rotation. Never creates a record, never touches a newer one. Modes:
--   dead:   the provider refused the refresh token (invariant 6 in doc.go);
--           its family may be revoked. The version is bumped, which fences
--           off every write decided before the mark: a held pair cannot
--           resurrect the grant (invariant 10). 'refused' marks it, so that
--           a pair of the family held from before a rollback is not
--           restored over it either (restore.lua).
--   lost:   nobody refused the token, but an answer that may have rotated it
--           was lost (a strict provider, or the leeway passed). The version
--           stays, so a holder that still holds the answer can write it and
--           revive the grant.
--   defer:  a fleet-wide retry_at after a transient provider error.
--   rewrap: the same tokens re-encrypted under a new key.
-- KEYS[1] record hash, KEYS[2] intent hash, KEYS[3] pair key
-- ARGV[1] version, ARGV[2] family, ARGV[3] where to publish ("p:CHANNEL" or
-- "s:CHANNEL"), ARGV[4] grant,
-- ARGV[5] mode, ARGV[6] the writer's layout ("hash" or "pair", record.lua),
-- ARGV[7..] field/value pairs
-- Returns the record's version after the write, or 0 when the version or
-- family moved on or the record is gone.
local args = record_args(7)
local v = redis.call('HGET', KEYS[1], 'v')
local family = redis.call('HGET', KEYS[1], 'family') or ''
if not v or v ~= ARGV[1] or family ~= ARGV[2] then
  return 0
end
write_record(KEYS[1], KEYS[3], ARGV[6] == 'pair', args)
if ARGV[5] == 'dead' then
  redis.call('HSET', KEYS[1], 'refused', '1')
  v = redis.call('HINCRBY', KEYS[1], 'v', 1)
  redis.call('DEL', KEYS[2])
  publish(ARGV[3], ARGV[4] .. ' ' .. v .. ' reauth_required')
elseif ARGV[5] == 'lost' then
  publish(ARGV[3], ARGV[4] .. ' ' .. v .. ' reauth_required')
end
return tonumber(v)
