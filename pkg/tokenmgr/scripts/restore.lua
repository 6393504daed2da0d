-- Puts back a record that Redis lost (restart without persistence, eviction,
-- a mistaken DEL), from a process that still holds the pair. Never replaces a
-- live record: only a missing one, or one that was itself restored from an
-- older version (two processes restoring at once: the newest pair wins).
-- KEYS[1] record hash
-- ARGV[1] version of the pair, ARGV[2] channel, ARGV[3] grant, ARGV[4..] pairs
-- Returns {1, v} when written, {0, stored_v} when left alone.
local v = redis.call('HGET', KEYS[1], 'v')
if v then
  if redis.call('HGET', KEYS[1], 'restored') ~= '1' or tonumber(v) >= tonumber(ARGV[1]) then
    return {0, tonumber(v) or -1}
  end
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'restored', '1', unpack(ARGV, 4))
redis.call('PUBLISH', ARGV[2], ARGV[3] .. ' ' .. ARGV[1])
return {1, tonumber(ARGV[1])}
