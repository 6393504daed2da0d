-- Operator import of a token pair: creates or replaces the record, bumps the
-- version, clears a dead status and any intent, and tells the fleet.
-- KEYS[1] record hash, KEYS[2] intent hash
-- ARGV[1] rotation channel, ARGV[2] grant name, ARGV[3..] field/value pairs
-- Returns the new version.
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
local nv = v + 1
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], 'v', nv, unpack(ARGV, 3))
redis.call('PUBLISH', ARGV[1], ARGV[2] .. ' ' .. nv)
return nv
