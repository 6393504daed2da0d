-- Prepended to every script that writes a record (store.go).
-- write_record sets the field/value pairs ARGV[from..] on the record hash
-- rec. An empty value removes its field: absent and empty read the same
-- (record.go), and an empty field still costs memory. The sealed tokens go
-- where the writer's layout puts them (Options.Layout, record.go): with
-- to_pair, one string "LEN:ACCESSREFRESH" in the pair key, and out of the
-- hash; without, fields of the hash, and the pair key goes. Either way
-- the tokens just written are the only copy, so no reader of either layout
-- finds an older pair beside them. A write without tokens (a mark) leaves
-- them where they are. The check comes before any write: a script that
-- fails keeps what it wrote before the failure.
local function write_record(rec, pair, to_pair, from)
  local set, del = {}, {}
  local at, rt
  for i = from, #ARGV, 2 do
    local f, val = ARGV[i], ARGV[i + 1]
    if f == 'access_token' then
      at = val
    elseif f == 'refresh_token' then
      rt = val
    elseif val == '' then
      del[#del + 1] = f
    else
      set[#set + 1] = f
      set[#set + 1] = val
    end
  end
  if (at == nil) ~= (rt == nil) then
    error('write_record: the access and refresh token are written together')
  end
  if at ~= nil then
    if to_pair then
      local held = redis.call('HMGET', rec, 'access_token', 'refresh_token')
      if held[1] or held[2] then
        -- The tokens made Redis turn the hash into a hashtable, which it
        -- never turns back into a listpack: write the hash anew without
        -- them (once per grant, the first write in this layout).
        local old = redis.call('HGETALL', rec)
        redis.call('DEL', rec)
        local keep = {}
        for i = 1, #old, 2 do
          if old[i] ~= 'access_token' and old[i] ~= 'refresh_token' then
            keep[#keep + 1] = old[i]
            keep[#keep + 1] = old[i + 1]
          end
        end
        if #keep > 0 then
          redis.call('HSET', rec, unpack(keep))
        end
      end
      redis.call('SET', pair, #at .. ':' .. at .. rt)
      del[#del + 1] = 'access_token'
      del[#del + 1] = 'refresh_token'
    else
      set[#set + 1] = 'access_token'
      set[#set + 1] = at
      set[#set + 1] = 'refresh_token'
      set[#set + 1] = rt
      redis.call('DEL', pair)
    end
  end
  if #set > 0 then
    redis.call('HSET', rec, unpack(set))
  end
  if #del > 0 then
    redis.call('HDEL', rec, unpack(del))
  end
end
