-- Admits one request against every quota of its plan, or refuses it and
-- changes nothing: the same decisions as LocalStore::admit.
--
-- KEYS[j]: the state key of entry j.
-- ARGV[1]: the clock in µs, or '' for the server's; ARGV[2]: slot lease, ms.
-- Then five values per entry: quota index, kind, and three parameters:
--   r  GCRA:        interval µs, tau µs (interval x burst), burst
--   w  window:      window ms, limit, amount asked
--   c  concurrency: limit, slot id, unused
-- Answers {0, quota, retry s} when refused, else
-- {1, headroom quota or -1, remaining, reset s, fixed window per entry (0 if none)}.

local now = clock(ARGV[1])
local now_ms = divmod(now, 1000)
local lease = tonumber(ARGV[2])

-- Seconds until `amount` fits again, assuming nothing else is charged.
local function window_retry(cur, prev, amount, limit, window_ms, elapsed)
  local w = window_ms * 1000
  if amount > limit then
    return (divmod(window_ms, 1000))
  end
  local wait
  if cur + amount <= limit then
    -- Still this window: prev * (w - e) / w + cur + amount <= limit.
    local room = limit - cur - amount
    local need
    if prev == 0 then
      need = elapsed
    elseif room >= prev then
      need = 0
    else
      need = w - muldiv(room, w, prev)
    end
    wait = math.max(need - elapsed, 0)
  else
    -- The next window: cur * (w - e') / w + amount <= limit.
    local room = limit - amount
    local c = math.max(cur, 1)
    local need
    if room >= c then
      need = 0
    else
      need = w - muldiv(room, w, c)
    end
    wait = (w - elapsed) + need
  end
  return math.max(ceil_div(wait, 1000000), 1)
end

local deny_q, deny_s = -1, 0
local best, head_q, head_rem, head_reset = 0, -1, 0, 0
local apply = {}
local windows = {}

for j = 1, #KEYS do
  local at = 2 + (j - 1) * 5
  local q = tonumber(ARGV[at + 1])
  local kind = ARGV[at + 2]
  local key = KEYS[j]
  -- Left nil when this quota refuses.
  local remaining, reset, limit
  local retry
  windows[j] = 0
  if kind == 'r' then
    local interval = tonumber(ARGV[at + 3])
    local tau = tonumber(ARGV[at + 4])
    local burst = tonumber(ARGV[at + 5])
    local tat = math.max(tonumber(redis.call('GET', key)) or 0, now)
    local ahead = tat + interval - now
    if ahead > tau then
      retry = math.max(ceil_div(ahead - tau, 1000000), 1)
    else
      remaining = divmod(tau - ahead, interval)
      reset = ceil_div(ahead, 1000000)
      limit = burst
      -- Once the TAT is past, a missing key says the same.
      apply[j] = { 'r', tat + interval, ceil_div(ahead, 1000) + 1 }
    end
  elseif kind == 'w' then
    local window_ms = tonumber(ARGV[at + 3])
    local lim = tonumber(ARGV[at + 4])
    local amount = tonumber(ARGV[at + 5])
    local idx = divmod(now_ms, window_ms)
    local cur, prev = roll(key, idx)
    local w = window_ms * 1000
    local _, elapsed = divmod(now, w)
    -- The sliding estimate: the previous window weighted by how much of it
    -- still overlaps the last window length, plus the current one (rounded up).
    local weighted, part = muldiv(prev, w - elapsed, w)
    if part > 0 then
      weighted = weighted + 1
    end
    local used = cur + weighted
    if used + amount > lim then
      retry = window_retry(cur, prev, amount, lim, window_ms, elapsed)
    else
      remaining = lim - used - amount
      reset = divmod(window_ms, 1000) - divmod(elapsed, 1000000)
      limit = lim
      windows[j] = idx
      if amount > 0 then
        apply[j] = { 'w', window_ms, idx, cur + amount, prev }
      end
    end
  else
    local lim = tonumber(ARGV[at + 3])
    -- Slots whose lease ran out belong to proxies that never settled them.
    redis.call('ZREMRANGEBYSCORE', key, '-inf', str(now_ms))
    local held = redis.call('ZCARD', key)
    if held >= lim then
      retry = 1
    else
      remaining = lim - held - 1
      reset = 0
      limit = lim
      apply[j] = { 'c', ARGV[at + 4] }
    end
  end
  if retry ~= nil then
    -- The refusal that matters is the one that lasts longest.
    if deny_q < 0 or retry > deny_s then
      deny_q, deny_s = q, retry
    end
  else
    -- The tightest limit is the one with the least left, relative to its size.
    local frac = muldiv(remaining, 1000000, math.max(limit, 1))
    if head_q < 0 or frac < best then
      best, head_q, head_rem, head_reset = frac, q, remaining, reset
    end
  end
end

if deny_q >= 0 then
  return { 0, deny_q, deny_s }
end

for j = 1, #KEYS do
  local a = apply[j]
  if a ~= nil then
    if a[1] == 'r' then
      redis.call('SET', KEYS[j], str(a[2]), 'PX', str(a[3]))
    elseif a[1] == 'w' then
      store_window(KEYS[j], a[2], a[3], a[4], a[5])
    else
      redis.call('ZADD', KEYS[j], str(now_ms + lease), a[2])
      redis.call('PEXPIRE', KEYS[j], str(lease))
    end
  end
end

local reply = { 1, head_q, head_rem, head_reset }
for j = 1, #KEYS do
  reply[4 + j] = windows[j]
end
return reply
