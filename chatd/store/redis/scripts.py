"""The Lua scripts of the Redis store, and the key layout they share (see README, "Redis").

Every write is one script: Redis runs a script alone, so a message's id and revision are
allocated, the message and its indexes stored and its change appended to the change stream
in one atomic step, and the stream's order is revision order across every node.

Keys (P is the prefix, "chatd:" by default; Redis Cluster is not supported: a script
touches keys of many slots):
  P meta                hash: epoch, layout, rev, msg_id, room_id, user_id, users_version
  P users               hash: lower(name) -> user id;   P u:<id>  hash: i n h a tv c
  P guests              hash: lower(name) -> GuestHold as JSON
  P revoked             zset: jti, score = expires_at
  P rooms               set of room ids;  P rooms:gone  set of deleted room ids (never reused)
  P room:<id>           hash: n (name) k (lower name) t o c e op;  P room_names  hash: k -> id
  P m:<id>              hash, one message: i v s sk x ts [r] [t tk sl tl p] [et eb] [d] [n]
  P all                 zset of every stored message id (tombstones too), score = id
  P nonce               hash: "<sender_key>\\n<nonce>" -> message id
  P r:<room>:ids        zset of the room's live messages, score = id (history pages)
  P r:<room>:revs       zset of all the room's messages, score = rev (sync)
  P d:{<ident>}:ids     zset of an identity's live DMs either way, score = id
  P d:{<ident>}:w:<nm>  zset of its live DMs with whoever held name nm, score = id
  P d:{<ident>}:with    set of lower names it has DMs with (tombstones count)
  P d:{<ident>}:revs    zset of all its DMs, score = rev (sync)
  P p:<pair>:ids        zset of a DM pair's live messages (retention's `keep`)
  P r:<room>:dead       zset of a room's tombstones, score = id (retention's `keep`)
  P p:<pair>:dead       the same for a DM pair
  P pairs               set of DM pair keys
  P changes             stream: one entry per revision, fields rev, kind, and the message
"""

from __future__ import annotations

# Shared helpers, prepended to every script that needs them. P is ARGV[1] in every script.
# Change stream entries kept (approximately): notices are capped here, and the store
# passes the same cap to the scripts that take it as an argument.
STREAM_MAXLEN = 100_000
# notify: append a change or notice to the change stream.
_NOTIFY = f"""
local function notify(...)
  return redis.call('XADD', ARGV[1]..'changes', 'MAXLEN', '~', {STREAM_MAXLEN}, '*', ...)
end
"""
_PRELUDE = _NOTIFY + r"""
local P = ARGV[1]
local function live_keys(room, sk, tk, sl, tl, pair)
  if room then return {P..'r:'..room..':ids'} end
  return {P..'d:{'..sk..'}:ids', P..'d:{'..tk..'}:ids', P..'d:{'..sk..'}:w:'..tl,
          P..'d:{'..tk..'}:w:'..sl, P..'p:'..pair..':ids'}
end
local function rev_keys(room, sk, tk)
  if room then return {P..'r:'..room..':revs'} end
  return {P..'d:{'..sk..'}:revs', P..'d:{'..tk..'}:revs'}
end
local STATE = {'i', 'd', 'r', 'sk', 'tk', 'sl', 'tl', 'p', 'n', 'ts'}
-- A room's or DM pair's tombstones by id (retention's `keep` removes those below its cut).
local function dead_key(st)
  if st[3] then return P..'r:'..st[3]..':dead' end
  return P..'p:'..st[8]..':dead'
end
local function unlive(id, st)
  for _, k in ipairs(live_keys(st[3], st[4], st[5], st[6], st[7], st[8])) do
    redis.call('ZREM', k, id)
  end
end
-- Remove a message and every trace of it (retention, a deleted room's purge).
local function drop(id, st)
  unlive(id, st)
  for _, k in ipairs(rev_keys(st[3], st[4], st[5])) do redis.call('ZREM', k, id) end
  if st[9] then redis.call('HDEL', P..'nonce', st[4]..'\n'..st[9]) end
  redis.call('ZREM', dead_key(st), id)
  redis.call('ZREM', P..'all', id)
  redis.call('DEL', P..'m:'..id)
end
"""

# ARGV: P, stream maxlen, the batch as msgpack: an array of 11-string arrays, one per
# message: room, sender, sender_key, recipient, recipient_key, text, ts, nonce ("" none,
# else "=" .. nonce), sender lower, recipient lower, pair ("" for a room message). One
# argument instead of 11 per message: packing thousands of arguments was the client's
# largest cost. The counters are read once and written once per batch.
# Reply per message: {1, id, rev} stored, {2, fields} the original of a repeated nonce,
# {3} the room was deleted.
SEND = _PRELUDE + r"""
local meta, nonces, stream, maxlen, node = P..'meta', P..'nonce', P..'changes', ARGV[2], ARGV[4] or ''
local batch = cmsgpack.unpack(ARGV[3])
local c = redis.call('HMGET', meta, 'msg_id', 'rev')
local id, rev = tonumber(c[1]) or 0, tonumber(c[2]) or 0
local out = {}
for _, a in ipairs(batch) do
  local room, sender, sk, rcpt, tk, text, ts, nonce = a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8]
  local sl, tl, pair = a[9], a[10], a[11]
  local orig = nil
  if nonce ~= '' then
    nonce = string.sub(nonce, 2)
    local dup = redis.call('HGET', nonces, sk..'\n'..nonce)
    if dup then
      orig = redis.call('HGETALL', P..'m:'..dup)
      if #orig == 0 then orig = nil end
    end
  end
  if orig then
    out[#out+1] = {2, orig}
  elseif room ~= '' and redis.call('SISMEMBER', P..'rooms:gone', room) == 1 then
    out[#out+1] = {3}
  else
    id = id + 1
    rev = rev + 1
    local f = {'i', id, 'v', rev, 's', sender, 'sk', sk, 'x', text, 'ts', ts}
    local n = #f
    if room ~= '' then
      f[n+1] = 'r'; f[n+2] = room
    else
      f[n+1] = 't'; f[n+2] = rcpt; f[n+3] = 'tk'; f[n+4] = tk; f[n+5] = 'sl'; f[n+6] = sl
      f[n+7] = 'tl'; f[n+8] = tl; f[n+9] = 'p'; f[n+10] = pair
      room = nil
    end
    if nonce ~= '' then
      f[#f+1] = 'n'; f[#f+1] = nonce
      redis.call('HSET', nonces, sk..'\n'..nonce, id)
    end
    redis.call('HSET', P..'m:'..id, unpack(f))
    redis.call('ZADD', P..'all', id, id)
    for _, k in ipairs(live_keys(room, sk, tk, sl, tl, pair)) do redis.call('ZADD', k, id, id) end
    for _, k in ipairs(rev_keys(room, sk, tk)) do redis.call('ZADD', k, rev, id) end
    if not room then
      redis.call('SADD', P..'pairs', pair)
      redis.call('SADD', P..'d:{'..sk..'}:with', tl)
      redis.call('SADD', P..'d:{'..tk..'}:with', sl)
    end
    redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'rev', rev, 'kind', 'message', 'node', node, unpack(f))
    out[#out+1] = {1, id, rev}
  end
end
redis.call('HSET', meta, 'msg_id', id, 'rev', rev)
return out
"""

# ARGV: P, maxlen, id, kind ("edited" or "deleted"), text, edited ts, by (the editor or
# the deleter), node (the writing node's id, for the bus: chatd/cluster).
# Reply: the message's fields after the change, or false when it is missing or deleted.
CHANGE = _PRELUDE + r"""
local id, kind = ARGV[3], ARGV[4]
local key = P..'m:'..id
local st = redis.call('HMGET', key, unpack(STATE))
if not st[1] or st[2] then return false end
local rev = redis.call('HINCRBY', P..'meta', 'rev', 1)
if kind == 'edited' then
  redis.call('HSET', key, 'x', ARGV[5], 'et', ARGV[6], 'eb', ARGV[7], 'v', rev)
else
  redis.call('HSET', key, 'x', '', 'd', '1', 'v', rev)
  unlive(id, st)
  redis.call('ZADD', dead_key(st), id, id)
end
for _, k in ipairs(rev_keys(st[3], st[4], st[5])) do redis.call('ZADD', k, rev, id) end
local all = redis.call('HGETALL', key)
redis.call('XADD', P..'changes', 'MAXLEN', '~', ARGV[2], '*', 'rev', rev, 'kind', 'message.'..kind,
           'node', ARGV[8] or '', 'by', ARGV[7], unpack(all))
return all
"""

# One step of retention. ARGV: P, index key suffix ("all" or a live index), after id,
# below id ("" none), older-than ts ("" none), nonce cut-off ts, batch.
# Reply: {removed live messages, last id looked at, 1 if more to look at}.
PRUNE = _PRELUDE + r"""
local index, after, below, older = P..ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local nonce_cut, batch = tonumber(ARGV[6]), tonumber(ARGV[7])
local hi = '+inf'
if below ~= '' then hi = '('..below end
local ids = redis.call('ZRANGEBYSCORE', index, '('..after, hi, 'LIMIT', 0, batch)
local removed, last, more = 0, tonumber(after), 0
if #ids == batch then more = 1 end
for _, id in ipairs(ids) do
  local st = redis.call('HMGET', P..'m:'..id, unpack(STATE))
  if st[1] then
    local ts = tonumber(st[10])
    if older ~= '' and ts >= tonumber(older) then more = 0; break end
    if st[9] and ts > nonce_cut then
      -- Its nonce is younger than the contract's 24 h: blanked, so a retry still finds it.
      if not st[2] then
        redis.call('HSET', P..'m:'..id, 'x', '', 'd', '1')
        unlive(id, st)
        redis.call('ZADD', dead_key(st), id, id)
      end
    else
      drop(id, st)
    end
    if not st[2] then removed = removed + 1 end
  else
    redis.call('ZREM', index, id)  -- a stale index entry
  end
  last = tonumber(id)
end
return {removed, last, more}
"""

# A deleted room's messages, `batch` at a time. ARGV: P, room id, batch.
# Reply: how many were removed (fewer than batch: done).
PURGE = _PRELUDE + r"""
local room, batch = ARGV[2], tonumber(ARGV[3])
local revs = P..'r:'..room..':revs'
local ids = redis.call('ZRANGE', revs, 0, batch - 1)
for _, id in ipairs(ids) do
  local st = redis.call('HMGET', P..'m:'..id, unpack(STATE))
  if st[1] then drop(id, st) else redis.call('ZREM', revs, id) end
end
if #ids < batch then redis.call('DEL', revs, P..'r:'..room..':ids', P..'r:'..room..':dead') end
return #ids
"""

# Room and account scripts append a notice to the change stream (kind room.*, user,
# hold, revoked), so every node's bus (chatd/cluster) adopts the change in stream order;
# their last ARGV is the writing node's id ("" for the command line).
# ARGV: P, name, name key, topic, owner, created_at, ephemeral, open, node.
# Reply: id, 0 = taken.
CREATE_ROOM = _NOTIFY + r"""
local P = ARGV[1]
if redis.call('HEXISTS', P..'room_names', ARGV[3]) == 1 then return 0 end
local id = redis.call('HINCRBY', P..'meta', 'room_id', 1)
redis.call('HSET', P..'room:'..id, 'n', ARGV[2], 'k', ARGV[3], 't', ARGV[4], 'o', ARGV[5],
           'c', ARGV[6], 'e', ARGV[7], 'op', ARGV[8])
redis.call('HSET', P..'room_names', ARGV[3], id)
redis.call('SADD', P..'rooms', id)
notify('kind', 'room.created', 'node', ARGV[9] or '', 'id', id, 'n', ARGV[2], 't', ARGV[4],
       'o', ARGV[5], 'c', ARGV[6], 'e', ARGV[7], 'op', ARGV[8])
return id
"""

# ARGV: P, id, name, name key, topic, node. Reply: 1 done (or no such room), 0 = name taken.
UPDATE_ROOM = _NOTIFY + r"""
local P, id = ARGV[1], ARGV[2]
local key = P..'room:'..id
local old = redis.call('HGET', key, 'k')
if not old then return 1 end
local holder = redis.call('HGET', P..'room_names', ARGV[4])
if holder and holder ~= id then return 0 end
if old ~= ARGV[4] then
  redis.call('HDEL', P..'room_names', old)
  redis.call('HSET', P..'room_names', ARGV[4], id)
end
redis.call('HSET', key, 'n', ARGV[3], 'k', ARGV[4], 't', ARGV[5])
notify('kind', 'room.updated', 'node', ARGV[6] or '', 'id', id, 'n', ARGV[3], 't', ARGV[5])
return 1
"""

# ARGV: P, id, node, by (who deleted it; "" an ephemeral room emptied). The room goes now; its messages follow in PURGE batches.
# Reply: 1 deleted, 0 it was already gone (no notice then: several nodes may delete it).
# A room goes (DELETE_ROOM; an ephemeral room emptied, _MEMBERSHIP). 1 it was there (its
# room.deleted entry is added: node, by), 0 it was not.
_REMOVE_ROOM = _NOTIFY + r"""
local function remove_room(P, id, node, by)
  local key = P..'room:'..id
  local k = redis.call('HGET', key, 'k')
  local existed = redis.call('EXISTS', key)
  if k and redis.call('HGET', P..'room_names', k) == id then redis.call('HDEL', P..'room_names', k) end
  redis.call('DEL', key, P..'pm:'..id)
  redis.call('SREM', P..'rooms', id)
  redis.call('SADD', P..'rooms:gone', id)
  if existed == 0 then return 0 end
  notify('kind', 'room.deleted', 'node', node, 'id', id, 'by', by)
  return 1
end
"""

DELETE_ROOM = _REMOVE_ROOM + r"""
return remove_room(ARGV[1], ARGV[2], ARGV[3] or '', ARGV[4] or '')
"""

# ARGV: P, name, name key, pw hash, admin, created_at, node. Reply: the new id, 0 = taken
# (by an account, or by a guest's hold that has not lapsed: names are one namespace).
CREATE_USER = _NOTIFY + r"""
local P = ARGV[1]
if redis.call('HEXISTS', P..'users', ARGV[3]) == 1 then return 0 end
-- A guest's hold that has not lapsed keeps the name (decided here, so across nodes too).
local held = redis.call('HGET', P..'guests', ARGV[3])
if held and held ~= '' then
  local o = cjson.decode(held)
  local lapsed = o.held_until ~= nil and o.held_until ~= cjson.null and o.held_until <= tonumber(ARGV[6])
  if not lapsed then return 0 end
end
local id = redis.call('HINCRBY', P..'meta', 'user_id', 1)
redis.call('HSET', P..'u:'..id, 'i', id, 'n', ARGV[2], 'h', ARGV[4], 'a', ARGV[5], 'tv', 0, 'c', ARGV[6])
redis.call('HSET', P..'users', ARGV[3], id)
notify('kind', 'user', 'node', ARGV[7] or '', 'key', ARGV[3])
return id
"""

# ARGV: P, name key, node. Reply: 1 deleted, 0 none.
DELETE_USER = _NOTIFY + r"""
local P = ARGV[1]
local id = redis.call('HGET', P..'users', ARGV[2])
if not id then return 0 end
redis.call('HDEL', P..'users', ARGV[2])
redis.call('DEL', P..'u:'..id)
notify('kind', 'user', 'node', ARGV[3] or '', 'key', ARGV[2])
return 1
"""

# ARGV: P, name key, node. Reply: the new token_version, 0 = no such user.
BUMP_TOKEN_VERSION = _NOTIFY + r"""
local P = ARGV[1]
local id = redis.call('HGET', P..'users', ARGV[2])
if not id then return 0 end
local tv = redis.call('HINCRBY', P..'u:'..id, 'tv', 1)
notify('kind', 'user', 'node', ARGV[3] or '', 'key', ARGV[2])
return tv
"""

# ARGV: P, user id, pw hash, node. Reply: the new token_version, false = no such user.
SET_PASSWORD = _NOTIFY + r"""
local P = ARGV[1]
local key = P..'u:'..ARGV[2]
if redis.call('EXISTS', key) == 0 then return false end
redis.call('HSET', key, 'h', ARGV[3])
local tv = redis.call('HINCRBY', key, 'tv', 1)
notify('kind', 'user', 'node', ARGV[4] or '', 'key', string.lower(redis.call('HGET', key, 'n')))
return tv
"""

# ARGV: P, name key. Reply: the user's fields, or false.
GET_USER = r"""
local P = ARGV[1]
local id = redis.call('HGET', P..'users', ARGV[2])
if not id then return false end
local u = redis.call('HGETALL', P..'u:'..id)
if #u == 0 then return false end
return u
"""

# ARGV: P. Reply: {users_version, {fields of each user}}; one consistent view.
ALL_USERS = r"""
local P = ARGV[1]
local out = {}
for _, id in ipairs(redis.call('HVALS', P..'users')) do
  local u = redis.call('HGETALL', P..'u:'..id)
  if #u > 0 then out[#out+1] = u end
end
return {redis.call('HGET', P..'meta', 'users_version') or '0', out}
"""

# Guest holds, compare-and-set on (jti, version). ARGV: P, name key, jti, version, new JSON
# ("" = release), node. Reply: 1 applied, 0 not (gone, another hold, or a newer version stored).
HOLD_CAS = _NOTIFY + r"""
local P = ARGV[1]
local old = redis.call('HGET', P..'guests', ARGV[2])
if not old then return 0 end
local o = cjson.decode(old)
if o.jti ~= ARGV[3] or (o.version or 0) >= tonumber(ARGV[4]) then return 0 end
if ARGV[5] == '' then
  redis.call('HDEL', P..'guests', ARGV[2])
else
  redis.call('HSET', P..'guests', ARGV[2], ARGV[5])
end
notify('kind', 'hold', 'node', ARGV[6] or '', 'key', ARGV[2], 'h', ARGV[5])
return 1
"""

# A history page. ARGV: P, index key (without P), before ("" none), after ("" none), limit.
# Newest first without `after`, oldest first with it. Reply: {more, {fields}...}.
PAGE = r"""
local P, index, before, after, limit = ARGV[1], ARGV[1]..ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local ids
if after ~= '' then
  local hi = '+inf'
  if before ~= '' then hi = '('..before end
  ids = redis.call('ZRANGEBYSCORE', index, '('..after, hi, 'LIMIT', 0, limit + 1)
else
  local hi = '+inf'
  if before ~= '' then hi = '('..before end
  ids = redis.call('ZREVRANGEBYSCORE', index, hi, '-inf', 'LIMIT', 0, limit + 1)
end
local out = {0}
if #ids > limit then out[1] = 1 end
for i = 1, math.min(#ids, limit) do out[#out+1] = redis.call('HGETALL', P..'m:'..ids[i]) end
return out
"""

# Sync. ARGV: P, rev, limit, then the rev-index keys (without P). The limit+1 lowest
# revisions above `rev` over all of them, in one consistent view.
# Reply: {more, {fields}...} in revision order.
CHANGES = r"""
local P, rev, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local found, seen = {}, {}
for i = 4, #ARGV do
  local r = redis.call('ZRANGEBYSCORE', P..ARGV[i], '('..rev, '+inf', 'WITHSCORES', 'LIMIT', 0, limit + 1)
  for j = 1, #r, 2 do
    if not seen[r[j]] then
      seen[r[j]] = true
      found[#found+1] = {tonumber(r[j+1]), r[j]}
    end
  end
end
table.sort(found, function(a, b) return a[1] < b[1] end)
local out = {0}
if #found > limit then out[1] = 1 end
for i = 1, math.min(#found, limit) do out[#out+1] = redis.call('HGETALL', P..'m:'..found[i][2]) end
return out
"""

# `chatd copy` into Redis: stored messages with their own ids and revisions, indexed as
# SEND and CHANGE index them (no stream entry: the stream is for live changes).
# ARGV: P, then 16 per message: id, rev, room ("" = DM), sender, sender_key, recipient,
# recipient_key, text, ts, edited ts, edited by ("" none), deleted ("1"/""), nonce
# ("" none, else "=" .. nonce), sender lower, recipient lower, pair.
IMPORT = _PRELUDE + r"""
for i = 2, #ARGV, 16 do
  local id, rev, room = ARGV[i], ARGV[i+1], ARGV[i+2]
  local sk, tk, nonce = ARGV[i+4], ARGV[i+6], ARGV[i+12]
  local sl, tl, pair = ARGV[i+13], ARGV[i+14], ARGV[i+15]
  local f = {'i', id, 'v', rev, 's', ARGV[i+3], 'sk', sk, 'x', ARGV[i+7], 'ts', ARGV[i+8]}
  if ARGV[i+9] ~= '' then f[#f+1] = 'et'; f[#f+1] = ARGV[i+9] end
  if ARGV[i+10] ~= '' then f[#f+1] = 'eb'; f[#f+1] = ARGV[i+10] end
  if ARGV[i+11] == '1' then f[#f+1] = 'd'; f[#f+1] = '1' end
  if room ~= '' then
    f[#f+1] = 'r'; f[#f+1] = room
  else
    for _, x in ipairs({'t', ARGV[i+5], 'tk', tk, 'sl', sl, 'tl', tl, 'p', pair}) do f[#f+1] = x end
    room = nil
    redis.call('SADD', P..'pairs', pair)
    redis.call('SADD', P..'d:{'..sk..'}:with', tl)
    redis.call('SADD', P..'d:{'..tk..'}:with', sl)
  end
  if nonce ~= '' then
    nonce = string.sub(nonce, 2)
    f[#f+1] = 'n'; f[#f+1] = nonce
    redis.call('HSET', P..'nonce', sk..'\n'..nonce, id)
  end
  redis.call('HSET', P..'m:'..id, unpack(f))
  redis.call('ZADD', P..'all', id, id)
  if ARGV[i+11] ~= '1' then
    for _, k in ipairs(live_keys(room, sk, tk, sl, tl, pair)) do redis.call('ZADD', k, id, id) end
  elseif room then
    redis.call('ZADD', P..'r:'..room..':dead', id, id)
  else
    redis.call('ZADD', P..'p:'..pair..':dead', id, id)
  end
  for _, k in ipairs(rev_keys(room, sk, tk)) do redis.call('ZADD', k, rev, id) end
end
return 1
"""

# A new guest hold, decided here so that a name is one guest's across nodes. ARGV: P, name
# key, hold JSON, now, node. Reply: 1 held; 0 the name is an account's; 2 another guest's
# hold that has not lapsed (its held_until is null or later than now).
HOLD_NEW = _NOTIFY + r"""
local P = ARGV[1]
if redis.call('HEXISTS', P..'users', ARGV[2]) == 1 then return 0 end
local old = redis.call('HGET', P..'guests', ARGV[2])
if old then
  local o = cjson.decode(old)
  local new = cjson.decode(ARGV[3])
  local lapsed = o.held_until ~= nil and o.held_until ~= cjson.null and o.held_until <= tonumber(ARGV[4])
  if o.jti ~= new.jti and not lapsed then return 2 end
end
redis.call('HSET', P..'guests', ARGV[2], ARGV[3])
notify('kind', 'hold', 'node', ARGV[5] or '', 'key', ARGV[2], 'h', ARGV[3])
return 1
"""

# A token revoked. ARGV: P, jti, expires_at, node.
REVOKE = _NOTIFY + r"""
local P = ARGV[1]
redis.call('ZADD', P..'revoked', ARGV[3], ARGV[2])
notify('kind', 'revoked', 'node', ARGV[4] or '', 'jti', ARGV[2], 'exp', ARGV[3])
return 1
"""

SCRIPTS = {
    "hold_new": HOLD_NEW,
    "revoke": REVOKE,
    "import": IMPORT,
    "send": SEND,
    "change": CHANGE,
    "prune": PRUNE,
    "purge": PURGE,
    "create_room": CREATE_ROOM,
    "update_room": UPDATE_ROOM,
    "delete_room": DELETE_ROOM,
    "create_user": CREATE_USER,
    "delete_user": DELETE_USER,
    "bump_token_version": BUMP_TOKEN_VERSION,
    "set_password": SET_PASSWORD,
    "get_user": GET_USER,
    "all_users": ALL_USERS,
    "hold_cas": HOLD_CAS,
    "page": PAGE,
    "changes": CHANGES,
}


# --- Room membership across nodes (chatd/cluster.py) ------------------------------------
# One server announces a user's first connection into a room (member.joined) and its last
# out (member.left), and closes an ephemeral room when its last member leaves. With several
# nodes these are decided here, in one atomic step with the change they follow, and the
# announcement is that step's stream entry (so every node sees it in stream order):
#   P node:<id>:m   hash: "<room id>\n<user key>" -> display name, the node's users in rooms
#   P pm:<room>     hash: user key -> on how many nodes that user is in the room; the room
#                   has a member anywhere while this key exists
# Entries: kind in/out, node, room, key, name; `ann` "1" on an `in` that is the user's
# first node in the room (member.joined), `left` the reason on an `out` that was its last
# (member.left). An ephemeral room emptied goes with a room.deleted entry (node "", by "":
# every node forgets it quietly; nobody is in it).
_MEMBERSHIP = _REMOVE_ROOM + r"""
local P = ARGV[1]
local function drop_if_emptied(room)
  if redis.call('EXISTS', P..'pm:'..room) == 1 or redis.call('HGET', P..'room:'..room, 'e') ~= '1' then
    return 0
  end
  return remove_room(P, room, '', '')
end
-- One node's user out of a room. Reply: 0 it was not in, 1 out, 2 out and the room closed.
local function go_out(node, room, ukey, reason)
  local h, f = P..'node:'..node..':m', room..'\n'..ukey
  local name = redis.call('HGET', h, f)
  if not name then return 0 end
  redis.call('HDEL', h, f)
  if redis.call('EXISTS', P..'room:'..room) == 0 then return 0 end
  local n = redis.call('HINCRBY', P..'pm:'..room, ukey, -1)
  local said = ''
  if n <= 0 then
    redis.call('HDEL', P..'pm:'..room, ukey)
    said = reason
  end
  notify('kind', 'out', 'node', node, 'room', room, 'key', ukey, 'name', name, 'left', said)
  return 1 + drop_if_emptied(room)
end
"""

# A node's user enters a room (its first connection there on that node). ARGV: P, node,
# room id, user key, display name. Reply: {on how many nodes the user is in the room now
# (1: the first, announced), its entry's id}; {-1} the room is gone. A user Redis still
# has in the room on this node (a departure of it that has not reached Redis yet: the
# node retries it) stays as it is, not announced again, and gets an entry too: the node
# admits its connections at that entry, as any other.
ROOM_ENTER = _NOTIFY + r"""
local P, node, room, ukey, name = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if redis.call('EXISTS', P..'room:'..room) == 0 then return {-1} end
local n, first = 0, ''
if redis.call('HSETNX', P..'node:'..node..':m', room..'\n'..ukey, name) == 1 then
  n = redis.call('HINCRBY', P..'pm:'..room, ukey, 1)
  if n == 1 then first = '1' end
else
  n = tonumber(redis.call('HGET', P..'pm:'..room, ukey) or '1')
end
local id = notify('kind', 'in', 'node', node, 'room', room, 'key', ukey, 'name', name, 'ann', first)
return {n, id}
"""

# A node's user leaves a room (its last connection there on that node). ARGV: P, node,
# room id, user key, reason. Reply: as go_out.
ROOM_LEAVE = _MEMBERSHIP + r"""
return go_out(ARGV[2], ARGV[3], ARGV[4], ARGV[5])
"""

# An ephemeral room nobody is in on any node goes (one nobody ever entered: its creator's
# connection broke during the create). ARGV: P, room id. Reply: 2 closed, else 0.
ROOM_CLOSE_IF_EMPTY = _MEMBERSHIP + r"""
if drop_if_emptied(ARGV[2]) == 1 then return 2 end
return 0
"""

# Every membership of a node goes, as its users' connections would leave (reason
# `disconnected`): a dead node (its heartbeat key expired; run once, by whichever node won
# the reap lock; gone "1": it leaves the node set and a `gone` entry follows), or a live
# node making Redis match what it has after an outage (gone ""). ARGV: P, node, gone.
# Reply: {how many memberships it had, {ids of the ephemeral rooms that closed}}.
REAP = _MEMBERSHIP + r"""
local node = ARGV[2]
local h = P..'node:'..node..':m'
local fields = redis.call('HKEYS', h)
local closed = {}
for _, f in ipairs(fields) do
  local room, ukey = string.match(f, '^([^\n]*)\n(.*)$')
  if room and go_out(node, room, ukey, 'disconnected') == 2 then closed[#closed+1] = room end
end
redis.call('DEL', h)
if ARGV[3] == '1' then
  redis.call('SREM', P..'nodes', node)
  notify('kind', 'gone', 'node', node)
end
return {#fields, closed}
"""

# What a node adopts when it may have missed changes (after an outage or a gap), in one
# consistent view with the stream position it stands for. ARGV: P, this node. Reply:
# {last stream id, entries added, rev, {{room id, fields}...}, {{node, fields, live}...}
# the nodes' memberships (this one's too; a dead node's until it is reaped: the room
# counts (pm:) hold them till then, and its reap's entries take them out), guests (flat
# hash), revoked (jti, exp flat)}.
CLUSTER_VIEW = r"""
local P, me = ARGV[1], ARGV[2]
local last, added = '0-0', 0
local ok, info = pcall(redis.call, 'XINFO', 'STREAM', P..'changes')
if ok then
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = info[i+1]
    elseif info[i] == 'entries-added' then added = info[i+1] end
  end
end
local rooms = {}
for _, id in ipairs(redis.call('SMEMBERS', P..'rooms')) do
  local h = redis.call('HGETALL', P..'room:'..id)
  if #h > 0 then rooms[#rooms+1] = {id, h} end
end
local members = {}
for _, node in ipairs(redis.call('SMEMBERS', P..'nodes')) do
  local live = 0
  if node == me or redis.call('EXISTS', P..'node:'..node) == 1 then live = 1 end
  members[#members+1] = {node, redis.call('HGETALL', P..'node:'..node..':m'), live}
end
return {last, added, redis.call('HGET', P..'meta', 'rev') or '0', rooms, members,
        redis.call('HGETALL', P..'guests'), redis.call('ZRANGE', P..'revoked', 0, -1, 'WITHSCORES')}
"""

SCRIPTS.update(
    room_enter=ROOM_ENTER, room_leave=ROOM_LEAVE, room_close_if_empty=ROOM_CLOSE_IF_EMPTY,
    reap=REAP, cluster_view=CLUSTER_VIEW,
)
