-- Puts back the newest pair a process holds when the stored record is
-- missing or older than it (invariant 9 in doc.go): lost by a restart
-- without persistence or a mistaken DEL, or rolled back by a failover to a
-- replica that had not seen the last writes. Never replaces a record as new
-- or newer: records are ordered by family (its seed time, then its name),
-- then a dead mark before any pair of its family, then version; a live
-- record that lost its tokens is no newer than its own version's pair. A
-- corrupt record is left alone.
-- KEYS[1] record hash, KEYS[2] pair key
-- ARGV[1] version of the pair, ARGV[2] its family, ARGV[3] where to publish ("p:CHANNEL" or "s:CHANNEL"),
-- ARGV[4] the message to publish ("GRANT V m1 RECORD"), ARGV[5] the writer's
-- layout ("hash" or "pair", record.lua), ARGV[6..] field/value pairs
-- Returns {1, v} when written, {0, stored_v} when left alone.
local args = record_args(6)
local v = redis.call('HGET', KEYS[1], 'v')
if v then
  local sv = tonumber(v)
  if not sv then
    return {0, -1}
  end
  local family = redis.call('HGET', KEYS[1], 'family') or ''
  local function epoch(f)
    return tonumber(string.match(f, '^(%d+)%.')) or 0
  end
  local older
  if family ~= ARGV[2] then
    local se, he = epoch(family), epoch(ARGV[2])
    if se ~= he then
      older = se < he
    else
      older = family < ARGV[2]
    end
  elseif redis.call('HGET', KEYS[1], 'refused') == '1' then
    -- A dead mark ends its family: the provider may have revoked every
    -- pair of it, the one restored included (record.go: Refused).
    older = false
  elseif sv == tonumber(ARGV[1]) then
    -- A record of this very version whose tokens alone are gone (its pair
    -- key lost, its token fields deleted) takes them back, and keeps the
    -- rest: its metadata (a fleet-wide retry_at, the refresh count) is
    -- newer than the holder's copy. A family's version names one pair.
    local held = redis.call('HMGET', KEYS[1], 'status', 'access_token', 'refresh_token')
    if held[1] ~= 'ok' or held[2] or held[3] or redis.call('EXISTS', KEYS[2]) == 1 then
      return {0, sv}
    end
    write_record(KEYS[1], KEYS[2], ARGV[5] == 'pair', {set = {}, del = {}, at = args.at, rt = args.rt})
    redis.call('HSET', KEYS[1], 'restored', '1')
    publish(ARGV[3], ARGV[4])
    return {1, sv}
  else
    older = sv < tonumber(ARGV[1])
  end
  if not older then
    return {0, sv}
  end
  redis.call('DEL', KEYS[1], KEYS[2])
end
write_record(KEYS[1], KEYS[2], ARGV[5] == 'pair', args)
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'family', ARGV[2], 'restored', '1')
publish(ARGV[3], ARGV[4])
return {1, tonumber(ARGV[1])}
