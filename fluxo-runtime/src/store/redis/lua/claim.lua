-- Leases due work. KEYS[1]: the claiming owner's set of leases.
-- ARGV: 3 owner, 4 lease in milliseconds, 5 limit, then pairs of workflow
-- and version.
--
-- Expired leases go first (oldest expiry first), then due instances
-- (earliest wake-up first), across all the listed workflows. Returns the
-- earliest future wake-up ('' for none), then per claimed instance its
-- record and its journal length; or 'corrupt' and why.
local owner = ARGV[3]
local now = now_ms()
local expires = now + tonumber(ARGV[4])
local limit = tonumber(ARGV[5])
local wks = {}
local listed = {}
for i = 6, #ARGV - 1, 2 do
  local wk = wfkey(ARGV[i], ARGV[i + 1])
  if not listed[wk] then
    listed[wk] = true
    wks[#wks + 1] = wk
  end
end

local picked = {}
local taken = {}
local function gather(index, kind, want)
  local found = {}
  for _, wk in ipairs(wks) do
    local r = redis.call('ZRANGEBYSCORE', index(wk), '-inf', int(now), 'WITHSCORES', 'LIMIT', 0, want)
    for j = 1, #r, 2 do
      found[#found + 1] = {tonumber(r[j + 1]), r[j], wk}
    end
  end
  table.sort(found, function(a, b) return a[1] < b[1] end)
  for _, f in ipairs(found) do
    if #picked >= limit then
      return
    end
    if not taken[f[2]] then
      taken[f[2]] = true
      picked[#picked + 1] = {f[2], f[3], kind}
    end
  end
end
if limit > 0 then
  gather(leasekey, 'lease', limit)
  if #picked < limit then
    gather(readykey, 'ready', limit - #picked)
  end
end

-- Checks first, writes after (see `need`).
need(KEYS[1], 'set')
for _, p in ipairs(picked) do
  local id, wk, kind = p[1], p[2], p[3]
  local key = ikey(id)
  need(key, 'hash')
  if bad then
    break
  end
  local cur = redis.call('HMGET', key, 'st', 'own', 'tok')
  local leased = cur[2] ~= false
  -- An index entry that no longer matches its instance is dropped.
  p[4] = cur[1] == 'running' and leased == (kind == 'lease')
  p[5] = cur[2]
  if p[4] then
    if not tonumber(cur[3]) then
      bad = 'instance ' .. id .. ' has no valid lease token'
    end
    need(hkey(id), 'list')
    if leased then
      need(ownerkey(cur[2]), 'set')
    end
  end
end
if bad then
  return {'corrupt', bad}
end

local out = {''}
for _, p in ipairs(picked) do
  local id, wk, kind, ok, old_owner = p[1], p[2], p[3], p[4], p[5]
  local key = ikey(id)
  if not ok then
    if kind == 'lease' then
      redis.call('ZREM', leasekey(wk), id)
    else
      redis.call('ZREM', readykey(wk), id)
    end
  else
    if old_owner then
      redis.call('SREM', ownerkey(old_owner), id)
    end
    redis.call('HINCRBY', key, 'tok', 1)
    redis.call('HSET', key, 'own', owner, 'exp', int(expires))
    redis.call('ZREM', readykey(wk), id)
    redis.call('ZADD', leasekey(wk), int(expires), id)
    redis.call('SADD', KEYS[1], id)
    out[#out + 1] = redis.call('HGETALL', key)
    out[#out + 1] = redis.call('LLEN', hkey(id))
  end
end

local next_wake = false
for _, wk in ipairs(wks) do
  local r = redis.call('ZRANGEBYSCORE', readykey(wk), '(' .. int(now), '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if r[2] then
    local at = tonumber(r[2])
    if not next_wake or at < next_wake then
      next_wake = at
    end
  end
end
if next_wake then
  out[1] = int(next_wake)
end
return out
