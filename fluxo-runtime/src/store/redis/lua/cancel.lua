-- Records a cancel request and wakes the instance. KEYS[1]: the instance.
-- ARGV: 3 id. A finished instance is left as it is.
local st = redis.call('HGET', KEYS[1], 'st')
if not st then
  return {'notfound'}
end
need_instance(ARGV[3])
if bad then
  return {'corrupt', bad}
end
request_cancel(ARGV[3], now_ms())
flush()
return {'ok', st}
