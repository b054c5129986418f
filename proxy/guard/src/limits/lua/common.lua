-- Shared by admit.lua and settle.lua (prepended to each by the store).
--
-- Redis runs Lua 5.1, whose numbers are doubles. Every value here is an
-- integer below 2^53, so it is exact; the store clamps limits and amounts to
-- MAX, and a product that could pass 2^53 goes through muldiv, which never
-- leaves that range.

local MAX = 2251799813685248 -- 2^51

-- The exact decimal form: redis.call would print a number with %.14g.
local function str(n)
  return string.format('%.0f', n)
end

-- floor(x / y) and x mod y, exactly, for integers x >= 0, y > 0, x + y < 2^53.
-- The rounded quotient is off by at most one; the remainder says which way.
local function divmod(x, y)
  local q = math.floor(x / y)
  local r = x - q * y
  if r < 0 then
    q, r = q - 1, r + y
  elseif r >= y then
    q, r = q + 1, r - y
  end
  return q, r
end

local function ceil_div(x, y)
  local q, r = divmod(x, y)
  if r > 0 then
    q = q + 1
  end
  return q
end

-- floor(a * b / m) and a * b mod m, exactly, for integers a, b >= 0 and
-- 0 < m <= MAX, when the quotient is below 2^53: binary long multiplication,
-- in which no intermediate value reaches 2m.
local function muldiv(a, b, m)
  local qa, ra = divmod(a, m)
  local q, r = 0, 0
  local rest = b
  local bit = 1
  while bit * 2 <= rest do
    bit = bit * 2
  end
  while bit >= 1 do
    q, r = q * 2, r * 2
    if r >= m then
      q, r = q + 1, r - m
    end
    if rest >= bit then
      rest = rest - bit
      r = r + ra
      if r >= m then
        q, r = q + 1, r - m
      end
    end
    bit = bit / 2
  end
  return qa * b + q, r
end

-- Microseconds since the epoch: the server's clock, so that every proxy
-- sharing this Redis agrees; a test may pass its own.
local function clock(given)
  if given ~= '' then
    return tonumber(given)
  end
  if redis.replicate_commands then
    -- Redis before 5 replicates scripts verbatim unless told otherwise.
    redis.replicate_commands()
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- A window's counts as seen in fixed window `idx`: (current, previous).
-- The hash holds i (its fixed window), c (counted in it), p (in the one before).
local function roll(key, idx)
  local h = redis.call('HMGET', key, 'i', 'c', 'p')
  local i = tonumber(h[1])
  if i == idx then
    return tonumber(h[2]) or 0, tonumber(h[3]) or 0
  end
  if i ~= nil and i + 1 == idx then
    return 0, tonumber(h[2]) or 0
  end
  return 0, 0
end

-- Two windows after `idx` began, nothing in it counts: the key goes.
local function store_window(key, window_ms, idx, cur, prev)
  redis.call('HSET', key, 'i', str(idx), 'c', str(cur), 'p', str(prev))
  redis.call('PEXPIREAT', key, str((idx + 2) * window_ms))
end
