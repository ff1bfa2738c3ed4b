-- Applies one fenced commit. KEYS[1]: the instance.
-- ARGV: 3 id, 4 lease token, 5 transition (none, park, release, complete,
-- fail, cancel), 6 seen inbox sequence (park), 7 wake-up time or '' (park),
-- 8 output or failure, 9 padded signal id to consume or '', 10 journal
-- format of new instances, 11 number of events, then per event its id and
-- its encoded entry, then the number of new instances and per instance id,
-- workflow, version, input, '1' or '0' for a parent, parent; then the number
-- of instances to cancel and their ids.
--
-- Everything is checked before the first write, so a refused commit writes
-- nothing.
local key = KEYS[1]
local id = ARGV[3]
local cur = redis.call('HMGET', key, 'st', 'tok', 'own', 'ibx', 'can', 'par', 'wf', 'ver', 'seq')
if not cur[1] then
  return {'notfound'}
end
if cur[1] ~= 'running' or cur[2] ~= ARGV[4] or not cur[3] then
  return {'lost'}
end
if not cur[4] or not cur[7] or not cur[8] or not cur[9] then
  return {'corrupt', 'the record of instance ' .. id .. ' is incomplete'}
end
local owner, ibx, parent = cur[3], cur[4], cur[6]
local wf = cur[7]
local wk = wfkey(wf, cur[8])
local hk = hkey(id)
local next_id = redis.call('LLEN', hk)

local events = {}
local n = tonumber(ARGV[11])
local at = 12
for i = 0, n - 1 do
  local got = ARGV[at]
  if tonumber(got) ~= next_id + i then
    return {'conflict', got, int(next_id + i)}
  end
  events[#events + 1] = ARGV[at + 1]
  at = at + 2
end
local children = {}
for _ = 1, tonumber(ARGV[at]) do
  children[#children + 1] = {ARGV[at + 1], ARGV[at + 2], ARGV[at + 3], ARGV[at + 4], ARGV[at + 5], ARGV[at + 6]}
  at = at + 6
end
at = at + 1
local cancels = {}
for _ = 1, tonumber(ARGV[at]) do
  cancels[#cancels + 1] = ARGV[at + 1]
  at = at + 1
end

local kind = ARGV[5]
local status = nil
local field = nil
if kind == 'complete' then
  status, field = 'completed', 'out'
elseif kind == 'fail' then
  status, field = 'failed', 'fail'
elseif kind == 'cancel' then
  status, field = 'cancelled', 'fail'
end
local parks = kind == 'park' and ibx == ARGV[6]
if parks or kind == 'release' or status then
  need_lease(wk, owner)
  need(readykey(wk), 'zset')
end
if status then
  need(B .. 'st:running', 'zset')
  need(B .. 'st:' .. status, 'zset')
  need(B .. 'wfst:running:' .. wf, 'zset')
  need(B .. 'wfst:' .. status .. ':' .. wf, 'zset')
  if parent then
    need_instance(parent)
  end
elseif ARGV[9] ~= '' then
  need(skey(id), 'zset')
  need(pkey(id), 'hash')
end
for _, c in ipairs(children) do
  need_new(c[1], c[2], c[3])
end
for _, target in ipairs(cancels) do
  need_instance(target)
end
if bad then
  return {'corrupt', bad}
end

-- Writes.
local now = now_ms()
for i = 1, #events, 512 do
  redis.call('RPUSH', hk, unpack(events, i, math.min(i + 511, #events)))
end
redis.call('HSET', key, 'ua', now)
local result = {'applied', ibx, cur[5]}
if kind == 'park' then
  if parks then
    unlease(key, id, owner, wk)
    if ARGV[7] ~= '' then
      redis.call('ZADD', readykey(wk), ARGV[7], id)
      if tonumber(ARGV[7]) <= now then
        notify = true
      end
    end
  else
    result = {'inbox', ibx, cur[5]}
  end
elseif kind == 'release' then
  unlease(key, id, owner, wk)
  redis.call('ZADD', readykey(wk), now, id)
  notify = true
elseif status then
  redis.call('HSET', key, 'st', status, field, ARGV[8])
  unlease(key, id, owner, wk)
  redis.call('ZREM', readykey(wk), id)
  -- A finished instance takes no more signals: its inbox goes.
  redis.call('DEL', skey(id), pkey(id))
  move_status(id, wf, cur[9], 'running', status)
end
if not status and ARGV[9] ~= '' then
  consume(id, ARGV[9])
end
for _, c in ipairs(children) do
  local child_parent = false
  if c[5] == '1' then
    child_parent = c[6]
  end
  create(c[1], c[2], c[3], c[4], child_parent, ARGV[10], now)
end
for _, target in ipairs(cancels) do
  request_cancel(target, now)
end
if status and parent then
  wake(parent, now)
end
flush()
return result
