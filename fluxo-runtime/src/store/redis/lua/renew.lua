-- Extends leases of an owner. KEYS[1]: the owner's set of leases.
-- ARGV: 3 owner, 4 lease in milliseconds, 5 'all' for every lease of the
-- owner (ending them with a lease of 0) or 'listed' for those of the ids in
-- ARGV[6..] only. Returns the extended ones with a cancel request. Ids the
-- owner no longer holds leave its set either way.
local owner = ARGV[3]
local all = ARGV[5] == 'all'
local listed = {}
for i = 6, #ARGV do
  listed[ARGV[i]] = true
end
local held = {}
local gone = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ikey(id)
  need(key, 'hash')
  if bad then
    return {'corrupt', bad}
  end
  local cur = redis.call('HMGET', key, 'own', 'st', 'can', 'wf', 'ver')
  if cur[1] == owner and cur[2] == 'running' and cur[4] and cur[5] then
    if all or listed[id] then
      local lk = leasekey(wfkey(cur[4], cur[5]))
      need(lk, 'zset')
      held[#held + 1] = {id, key, lk, cur[3] == '1'}
    end
  else
    gone[#gone + 1] = id
  end
end
if bad then
  return {'corrupt', bad}
end
local expires = int(now_ms() + tonumber(ARGV[4]))
local cancelled = {}
for _, h in ipairs(held) do
  redis.call('HSET', h[2], 'exp', expires)
  redis.call('ZADD', h[3], expires, h[1])
  if h[4] then
    cancelled[#cancelled + 1] = h[1]
  end
end
for _, id in ipairs(gone) do
  redis.call('SREM', KEYS[1], id)
end
table.sort(cancelled)
return {'ok', cancelled}
