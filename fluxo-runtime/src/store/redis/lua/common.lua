-- Shared by every script. ARGV[1] is the key base, "{<prefix>}:", so every
-- key of one prefix carries the same hash tag; ARGV[2] is the channel told
-- about work that became runnable.
local B = ARGV[1]
local CHANNEL = ARGV[2]

-- Set when the script makes an instance runnable now; see `flush`.
local notify = false

-- The server's clock, in milliseconds since the Unix epoch.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A whole number as the decimal string Redis and the client expect.
local function int(n)
  return string.format('%d', n)
end

local function ikey(id) return B .. 'i:' .. id end   -- hash: the instance
local function hkey(id) return B .. 'h:' .. id end   -- list: the journal
local function skey(id) return B .. 's:' .. id end   -- zset: inbox order
local function pkey(id) return B .. 'p:' .. id end   -- hash: inbox payloads
local function wfkey(wf, ver) return ver .. ':' .. wf end
local function readykey(wk) return B .. 'ready:' .. wk end
local function leasekey(wk) return B .. 'lease:' .. wk end
local function ownerkey(owner) return B .. 'owner:' .. owner end

-- Checks, before a script's first write, that the keys it will write hold
-- what the store keeps there (or nothing): a script that failed half-way
-- would leave half a change behind. The first problem is kept in `bad`.
local bad = false

local function need(key, want)
  if bad then
    return
  end
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= want then
    bad = 'key ' .. key .. ' holds a ' .. t .. ' where the store keeps a ' .. want
  end
end

-- A counter: nothing yet, or a whole number.
local function need_counter(key)
  need(key, 'string')
  if not bad then
    local v = redis.call('GET', key)
    if v and not tonumber(v) then
      bad = 'key ' .. key .. ' holds ' .. v .. ' where the store keeps a counter'
    end
  end
end

-- An instance another one may wake or cancel: its hash and its index.
local function need_instance(id)
  local key = ikey(id)
  need(key, 'hash')
  if not bad then
    local cur = redis.call('HMGET', key, 'wf', 'ver', 'ibx')
    if cur[1] and cur[2] then
      need(readykey(wfkey(cur[1], cur[2])), 'zset')
    end
    if cur[3] and not tonumber(cur[3]) and not bad then
      bad = 'instance ' .. id .. ' has no valid inbox sequence'
    end
  end
end

-- The keys `create` writes, unless the instance exists already.
local function need_new(id, wf, ver)
  if redis.call('EXISTS', ikey(id)) == 0 then
    need(readykey(wfkey(wf, ver)), 'zset')
    need(B .. 'all', 'zset')
    need(B .. 'wf:' .. wf, 'zset')
    need(B .. 'st:running', 'zset')
    need(B .. 'wfst:running:' .. wf, 'zset')
    need_counter(B .. 'created')
  end
end

-- The keys `unlease` writes.
local function need_lease(wk, owner)
  need(leasekey(wk), 'zset')
  need(ownerkey(owner), 'set')
end

-- Publishes one notice for everything the script made runnable.
local function flush()
  if notify then
    redis.call('PUBLISH', CHANNEL, '1')
    notify = false
  end
end

-- Ends the lease of an instance.
local function unlease(key, id, owner, wk)
  redis.call('HDEL', key, 'own', 'exp')
  redis.call('ZREM', leasekey(wk), id)
  if owner then
    redis.call('SREM', ownerkey(owner), id)
  end
end

-- Moves the listing indexes of an instance from one status to another.
local function move_status(id, wf, seq, from, to)
  redis.call('ZREM', B .. 'st:' .. from, id)
  redis.call('ZADD', B .. 'st:' .. to, seq, id)
  redis.call('ZREM', B .. 'wfst:' .. from .. ':' .. wf, id)
  redis.call('ZADD', B .. 'wfst:' .. to .. ':' .. wf, seq, id)
end

-- Bumps the inbox sequence of a running instance and makes it runnable now
-- (at once if nobody holds it, else when its holder lets go). Unknown and
-- finished instances are left alone.
local function wake(id, now)
  local key = ikey(id)
  local cur = redis.call('HMGET', key, 'st', 'own', 'wf', 'ver')
  if cur[1] ~= 'running' then
    return false
  end
  redis.call('HINCRBY', key, 'ibx', 1)
  redis.call('HSET', key, 'ua', now)
  if not cur[2] then
    redis.call('ZADD', readykey(wfkey(cur[3], cur[4])), now, id)
    notify = true
  end
  return true
end

-- Records a cancel request on a running instance and wakes it. Returns the
-- status (false for an unknown instance).
local function request_cancel(id, now)
  local key = ikey(id)
  local st = redis.call('HGET', key, 'st')
  if st == 'running' then
    redis.call('HSET', key, 'can', '1')
    wake(id, now)
  end
  return st
end

-- Creates a running instance, runnable now. False when the id exists.
local function create(id, wf, ver, input, parent, fmt, now)
  local key = ikey(id)
  if redis.call('EXISTS', key) == 1 then
    return false
  end
  local seq = redis.call('INCR', B .. 'created')
  redis.call('HSET', key, 'id', id, 'wf', wf, 'ver', ver, 'st', 'running', 'in', input,
    'can', '0', 'fmt', fmt, 'ca', now, 'ua', now, 'tok', '0', 'ibx', '0', 'seq', seq)
  if parent then
    redis.call('HSET', key, 'par', parent)
  end
  redis.call('ZADD', readykey(wfkey(wf, ver)), now, id)
  redis.call('ZADD', B .. 'all', seq, id)
  redis.call('ZADD', B .. 'wf:' .. wf, seq, id)
  redis.call('ZADD', B .. 'st:running', seq, id)
  redis.call('ZADD', B .. 'wfst:running:' .. wf, seq, id)
  notify = true
  return true
end

-- Removes one signal from an inbox. `sid` is the padded signal id.
local function consume(id, sid)
  local pk = pkey(id)
  local member = redis.call('HGET', pk, 'm' .. sid)
  if member then
    redis.call('ZREM', skey(id), member)
    redis.call('HDEL', pk, 'm' .. sid, 'p' .. sid)
  end
end

-- The inbox member of a signal: sorted by name, then by signal id.
local function inbox_member(name, sid)
  return #name .. ':' .. name .. ':' .. sid
end
