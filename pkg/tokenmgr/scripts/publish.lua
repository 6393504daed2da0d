-- Prepended to every script that announces a write (store.go): publish
-- sends a rotation message where the Manager listens. target is
-- "p:CHANNEL" (PUBLISH, the global channel) or "s:CHANNEL" (SPUBLISH: the
-- grant's own channel, in its slot, with sharded messages).
local function publish(target, message)
  if string.sub(target, 1, 2) == 's:' then
    redis.call('SPUBLISH', string.sub(target, 3), message)
  else
    redis.call('PUBLISH', string.sub(target, 3), message)
  end
end
