-- Operator import of a token pair: creates or replaces the record as a new
-- token family, bumps the version, clears a dead status and any intent, and
-- tells the fleet. The caller named the family after this server's clock,
-- later than the family it replaces (invariant 9 in doc.go), and sealed the
-- tokens for that family and version; the script refuses if the record
-- changed since the caller read it.
-- KEYS[1] record hash, KEYS[2] intent hash, KEYS[3] pair key
-- ARGV[1] the version the caller read ('' if the record was missing),
-- ARGV[2] the family it read, ARGV[3] where to publish ("p:CHANNEL" or "s:CHANNEL"), ARGV[4] the message
-- to publish ("GRANT V m1 RECORD"),
-- ARGV[5] the new version, ARGV[6] the writer's layout ("hash" or "pair",
-- record.lua), ARGV[7..] field/value pairs (family included)
-- Returns 1 when written, 0 when the record changed meanwhile.
local args = record_args(7)
local v = redis.call('HGET', KEYS[1], 'v') or ''
local family = redis.call('HGET', KEYS[1], 'family') or ''
if v ~= ARGV[1] or family ~= ARGV[2] then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], 'v', ARGV[5])
write_record(KEYS[1], KEYS[3], ARGV[6] == 'pair', args)
publish(ARGV[3], ARGV[4])
return 1
