-- Prepended to every script that writes a record (store.go).
--
-- record_args reads the field/value pairs ARGV[from..] of a record write.
-- Every writer calls it before its first write: a script that fails keeps
-- what it wrote before the failure, so a bad argument must stop it first.
local function record_args(from)
  local a = {set = {}, del = {}}
  for i = from, #ARGV, 2 do
    local f, val = ARGV[i], ARGV[i + 1]
    if val == nil then
      error('record_args: field ' .. f .. ' has no value')
    elseif f == 'access_token' then
      a.at = val
    elseif f == 'refresh_token' then
      a.rt = val
    elseif val == '' then
      a.del[#a.del + 1] = f
    else
      a.set[#a.set + 1] = f
      a.set[#a.set + 1] = val
    end
  end
  if (a.at == nil) ~= (a.rt == nil) then
    error('record_args: the access and refresh token are written together')
  end
  return a
end

-- Redis keeps a hash a listpack while every field and value fits in
-- hash-max-listpack-value (64 B by default), turns it into a hashtable
-- when one does not, and never turns it back.
local listpack_value = 64

local function has_long(flat)
  for i = 1, #flat do
    if #flat[i] > listpack_value then
      return true
    end
  end
  return false
end

-- write_record applies a (record_args) to the record hash rec. An empty
-- value removes its field: absent and empty read the same (record.go), and
-- an empty field still costs memory. The sealed tokens go where the
-- writer's layout puts them (Options.Layout, record.go): with to_pair, one
-- string "LEN:ACCESSREFRESH" in the pair key, and out of the hash; without,
-- fields of the hash, and the pair key goes. Either way the tokens just
-- written are the only copy, so no reader of either layout finds an older
-- pair beside them. A write without tokens (a mark) leaves them where they
-- are. With to_pair, a hash that held a long value (the tokens of a
-- LayoutHash write, a long reason) and holds none now is written anew, so
-- that it is a listpack again; what a writer sets after it is short (a
-- version, a flag), and a field it clears goes in a.del.
local function write_record(rec, pair, to_pair, a)
  local was_long = to_pair and has_long(redis.call('HGETALL', rec))
  local set, del = a.set, a.del
  if a.at ~= nil then
    if to_pair then
      redis.call('SET', pair, #a.at .. ':' .. a.at .. a.rt)
      del[#del + 1] = 'access_token'
      del[#del + 1] = 'refresh_token'
    else
      set[#set + 1] = 'access_token'
      set[#set + 1] = a.at
      set[#set + 1] = 'refresh_token'
      set[#set + 1] = a.rt
      redis.call('DEL', pair)
    end
  end
  if #set > 0 then
    redis.call('HSET', rec, unpack(set))
  end
  if #del > 0 then
    redis.call('HDEL', rec, unpack(del))
  end
  if was_long then
    local now = redis.call('HGETALL', rec)
    if #now > 0 and not has_long(now) then
      redis.call('DEL', rec)
      redis.call('HSET', rec, unpack(now))
    end
  end
end
