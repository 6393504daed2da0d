-- The refreshers that announce themselves (invariant 11 in doc.go): a hash
-- of holder -> "UNTIL_MS SCOPE", where SCOPE is "*" (every grant in the
-- schedule) or the grant names it serves, space-separated. Times are this
-- server's clock, so no two processes' clocks are compared.
-- KEYS[1] the refreshers hash
-- ARGV[1] "beat" or "live"
-- beat: ARGV[2] holder, ARGV[3] TTL (ms), ARGV[4] scope. Records the holder
--       as live for TTL and drops holders whose time ran out. Returns 1.
-- live: returns the scopes of the holders still live.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local all = redis.call('HGETALL', KEYS[1])
if ARGV[1] == 'beat' then
  for i = 1, #all, 2 do
    local untilMs = tonumber(string.match(all[i + 1], '^(%d+)')) or 0
    if untilMs <= now and all[i] ~= ARGV[2] then
      redis.call('HDEL', KEYS[1], all[i])
    end
  end
  redis.call('HSET', KEYS[1], ARGV[2], string.format('%.0f', now + tonumber(ARGV[3])) .. ' ' .. ARGV[4])
  return 1
end
local live = {}
for i = 1, #all, 2 do
  local untilMs, scope = string.match(all[i + 1], '^(%d+) (.*)$')
  if untilMs and tonumber(untilMs) > now then
    live[#live + 1] = scope
  end
end
return live
