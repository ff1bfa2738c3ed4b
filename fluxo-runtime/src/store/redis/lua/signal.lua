-- Appends a signal to a running instance's inbox and wakes it.
-- KEYS[1]: the instance. ARGV: 3 id, 4 signal name, 5 payload.
local id = ARGV[3]
local st = redis.call('HGET', KEYS[1], 'st')
if not st then
  return {'notfound'}
end
if st ~= 'running' then
  return {'finished', st}
end
need_counter(B .. 'signals')
need(skey(id), 'zset')
need(pkey(id), 'hash')
need_instance(id)
if bad then
  return {'corrupt', bad}
end
local sid = redis.call('INCR', B .. 'signals')
local padded = string.format('%020d', sid)
local member = inbox_member(ARGV[4], padded)
redis.call('ZADD', skey(id), 0, member)
redis.call('HSET', pkey(id), 'p' .. padded, ARGV[5], 'm' .. padded, member)
wake(id, now_ms())
flush()
return {'ok', sid}
