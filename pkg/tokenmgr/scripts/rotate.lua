-- Fenced write of a rotated token pair (invariant 1 in doc.go): only onto
-- the version and family the refresh token was read at.
-- KEYS[1] record hash, KEYS[2] intent hash, KEYS[3] rotations sorted set,
-- KEYS[4] pair key
-- ARGV[1] the version the refresh token was read at, ARGV[2] its family
-- ARGV[3] where to publish ("p:CHANNEL" or "s:CHANNEL"), ARGV[4] the rotation message (published as is:
-- "GRANT V m1 RECORD", the new record, its tokens sealed)
-- ARGV[5] now (unix ms), ARGV[6] rotations window (ms); KEYS[3] members are "V:NOW"
-- ARGV[7] the writer's layout ("hash" or "pair", record.lua)
-- ARGV[8..] field/value pairs of the new record (v excluded)
-- Returns {1, new_v, counted} on success (counted: 1 when the rotations set
-- took it), {0, stored_v} when another writer got there first or the grant
-- was seeded anew, {-1, 0} when the record is gone.
local args = record_args(8)
local v = redis.call('HGET', KEYS[1], 'v')
if not v then
  return {-1, 0}
end
local family = redis.call('HGET', KEYS[1], 'family') or ''
if v ~= ARGV[1] or family ~= ARGV[2] then
  return {0, tonumber(v) or -1}
end
local nv = tonumber(v) + 1
-- A rotation clears what belonged to the version before: through
-- write_record, so that a long reason it clears lets the hash be compact.
for _, f in ipairs({'reason', 'retry_at', 'restored', 'refused'}) do
  args.del[#args.del + 1] = f
end
write_record(KEYS[1], KEYS[4], ARGV[7] == 'pair', args)
redis.call('HSET', KEYS[1], 'v', nv)
redis.call('HINCRBY', KEYS[1], 'refresh_count', 1)
redis.call('DEL', KEYS[2])
publish(ARGV[3], ARGV[4])
-- The last hour's rotations, for operators: best effort, after the write
-- and the message, so that a user whose ACL predates it (no
-- ZREMRANGEBYSCORE) still rotates. Nothing is added unless trimming works,
-- so the set never grows unbounded; a rotation not counted marks the
-- record, so the count reads as unknown rather than low.
local now = tonumber(ARGV[5])
local trimmed = redis.pcall('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. (now - tonumber(ARGV[6])))
if type(trimmed) == 'number' and type(redis.pcall('ZADD', KEYS[3], now, nv .. ':' .. ARGV[5])) == 'number' then
  redis.pcall('PEXPIRE', KEYS[3], ARGV[6])
  redis.call('HDEL', KEYS[1], 'rotations_untracked')
  return {1, nv, 1}
end
redis.call('HSET', KEYS[1], 'rotations_untracked', '1')
return {1, nv, 0}
