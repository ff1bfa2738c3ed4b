-- The oldest signal of a name and the inbox sequence, read together.
-- KEYS[1]: the instance. ARGV: 3 id, 4 signal name.
local ibx = redis.call('HGET', KEYS[1], 'ibx')
if not ibx then
  return {'notfound'}
end
local name = ARGV[4]
local first = redis.call('ZRANGEBYLEX', skey(ARGV[3]), '[' .. #name .. ':' .. name .. ':',
  '(' .. #name .. ':' .. name .. ';', 'LIMIT', 0, 1)
if not first[1] then
  return {'ok', ibx}
end
local sid = string.sub(first[1], -20)
return {'ok', ibx, sid, redis.call('HGET', pkey(ARGV[3]), 'p' .. sid)}
