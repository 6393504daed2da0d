-- Reads a grant's record and whether its lease is held, in one round trip:
-- a reader that finds the record due and the lease taken waits for the
-- holder's rotation message instead of trying the lease (no herd, invariant
-- 12 in doc.go).
-- KEYS[1] record hash, KEYS[2] pair key (the sealed tokens of a LayoutPair
-- record, record.go), KEYS[3] lease key (absent when the lease lives on
-- other servers, Options.LockRedis, or is not asked about: an empty key
-- name would hash to another Cluster slot and fail with CROSSSLOT)
-- Returns {HGETALL of the record, 1 if the lease is held else 0, the pair
-- key's value: false when there is none, 0 when it is empty or not a
-- string (an operator's mistake, reported as a corrupt record rather than
-- failing every read)}.
local held = 0
if KEYS[3] and redis.call('EXISTS', KEYS[3]) == 1 then
  held = 1
end
local pair = redis.pcall('GET', KEYS[2])
if (type(pair) == 'table' and pair.err) or pair == '' then
  pair = 0 -- no writer leaves it empty
end
return {redis.call('HGETALL', KEYS[1]), held, pair}
