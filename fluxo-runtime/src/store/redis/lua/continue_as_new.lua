-- Restarts a running instance with a new input and an empty journal,
-- keeping its id, inbox and cancel request (continue-as-new). Fenced like a
-- commit; releases the lease and makes the instance runnable now.
-- KEYS[1]: the instance. ARGV: 3 id, 4 lease token, 5 new input.
local key = KEYS[1]
local id = ARGV[3]
local cur = redis.call('HMGET', key, 'st', 'tok', 'own', 'wf', 'ver', 'ibx', 'can')
if not cur[1] then
  return {'notfound'}
end
if cur[1] ~= 'running' or cur[2] ~= ARGV[4] or not cur[3] then
  return {'lost'}
end
if not cur[4] or not cur[5] or not cur[6] then
  return {'corrupt', 'the record of instance ' .. id .. ' is incomplete'}
end
local owner = cur[3]
local wk = wfkey(cur[4], cur[5])
need_lease(wk, owner)
need(readykey(wk), 'zset')
need(hkey(id), 'list')
if bad then
  return {'corrupt', bad}
end
local now = now_ms()
redis.call('DEL', hkey(id))
redis.call('HSET', key, 'in', ARGV[5], 'ua', now)
unlease(key, id, owner, wk)
redis.call('ZADD', readykey(wk), now, id)
notify = true
flush()
return {'applied', cur[6], cur[7]}
