-- The newest instances of one listing index. KEYS[1]: the index.
-- ARGV: 3 position of the last instance to return.
local out = {}
for _, id in ipairs(redis.call('ZREVRANGE', KEYS[1], 0, ARGV[3])) do
  out[#out + 1] = redis.call('HGETALL', ikey(id))
end
return out
