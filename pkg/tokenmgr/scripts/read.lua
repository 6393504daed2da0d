-- Reads a grant's record and whether its lease is held, in one round trip:
-- a reader that finds the record due and the lease taken waits for the
-- holder's rotation message instead of trying the lease (no herd, invariant
-- 12 in doc.go).
-- KEYS[1] record hash, KEYS[2] lease key (absent when the lease lives on
-- other servers, Options.LockRedis, or is not asked about: an empty key
-- name would hash to another Cluster slot and fail with CROSSSLOT)
-- Returns {HGETALL of the record, 1 if the lease is held else 0}.
local held = 0
if KEYS[2] and redis.call('EXISTS', KEYS[2]) == 1 then
  held = 1
end
return {redis.call('HGETALL', KEYS[1]), held}
