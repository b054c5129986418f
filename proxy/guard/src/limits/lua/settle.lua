-- Settles a hold: the same changes as LocalStore::settle.
--
-- KEYS[j]: the state key of entry j.
-- ARGV[1]: the clock in µs, or '' for the server's.
-- Then five values per entry, a kind and four parameters:
--   w  reservation: window ms, fixed window charged, amount reserved, amount used
--   s  slot:        slot id, unused x3
-- Answers the number of entries.

local now = clock(ARGV[1])
local now_ms = divmod(now, 1000)

for j = 1, #KEYS do
  local at = 1 + (j - 1) * 5
  local key = KEYS[j]
  if ARGV[at + 1] == 'w' then
    local window_ms = tonumber(ARGV[at + 2])
    local charged = tonumber(ARGV[at + 3])
    local amount = tonumber(ARGV[at + 4])
    local actual = tonumber(ARGV[at + 5])
    local idx = divmod(now_ms, window_ms)
    local cur, prev = roll(key, idx)
    if actual > amount then
      -- More than reserved: charged now, where it is still counted.
      local extra = actual - amount
      if charged + 1 == idx then
        prev = math.min(prev + extra, MAX)
      else
        cur = math.min(cur + extra, MAX)
      end
      store_window(key, window_ms, idx, cur, prev)
    elseif actual < amount then
      -- A refund goes back to the window that was charged, if it still counts.
      local refund = amount - actual
      if charged == idx then
        store_window(key, window_ms, idx, math.max(cur - refund, 0), prev)
      elseif charged + 1 == idx then
        store_window(key, window_ms, idx, cur, math.max(prev - refund, 0))
      end
    end
  else
    redis.call('ZREM', key, ARGV[at + 2])
  end
end
return #KEYS
