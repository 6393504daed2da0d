-- Operator import of a token pair: creates or replaces the record as a new
-- token family, bumps the version, clears a dead status and any intent, and
-- tells the fleet. The family is named after the seed's time on this
-- server's clock, later than the family it replaces, so that every process
-- orders the two even if the record is lost in between (invariant 9 in
-- doc.go).
-- KEYS[1] record hash, KEYS[2] intent hash
-- ARGV[1] rotation channel, ARGV[2] grant name, ARGV[3] random family id (hex),
-- ARGV[4..] field/value pairs
-- Returns {new version, family}.
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0') or 0
local nv = v + 1
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local old = redis.call('HGET', KEYS[1], 'family')
if old then
  local e = tonumber(string.match(old, '^(%d+)%.'))
  if e and e >= ms then
    ms = e + 1
  end
end
local family = string.format('%.0f', ms) .. '.' .. ARGV[3]
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('HSET', KEYS[1], 'v', nv, 'family', family)
redis.call('PUBLISH', ARGV[1], ARGV[2] .. ' ' .. nv)
return {nv, family}
