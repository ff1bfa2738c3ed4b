-- Creates an instance or reports the existing one. KEYS[1]: the instance.
-- ARGV: 3 id, 4 workflow, 5 version, 6 input, 7 '1' or '0' for a parent,
-- 8 parent, 9 journal format.
need_new(ARGV[3], ARGV[4], ARGV[5])
if bad then
  return {'corrupt', bad}
end
local parent = false
if ARGV[7] == '1' then
  parent = ARGV[8]
end
if create(ARGV[3], ARGV[4], ARGV[5], ARGV[6], parent, ARGV[9], now_ms()) then
  flush()
  return {'created'}
end
return {'exists', redis.call('HGETALL', KEYS[1])}
