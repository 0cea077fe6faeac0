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
  P m:<id>              string, one message: a msgpack array (MESSAGE below)
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
  P changes             stream: one entry per notice (room, account, presence, event), per
                        edit or delete (kind message.edited/deleted, fields rev, by, m: the
                        message), and per batch of sends of one script call (kind messages,
                        rev: its last revision, m: a msgpack array of the messages)

MESSAGE, the stored value and what the stream carries: a msgpack array, in this order
  1 id  2 rev  3 room id (nil: a DM)  4 sender  5 recipient  6 text  7 ts  8 edited ts
  9 edited by  10 deleted (bool)  11 sender key  12 recipient key  13 nonce
  14 sender lower  15 recipient lower  16 DM pair key
trailing nils left out (a room message without a nonce has 11 elements). The first 12 are
chatd.store.base.MessageRecord's fields in its order (array_like: decoded straight into
it). One value instead of a hash of 12 fields: a send is one SET and one slice of one
stream entry, which is what made Redis the bound of a persisted send (README, "Running
several nodes").
"""

from __future__ import annotations

# Shared helpers, prepended to every script that needs them. P is ARGV[1] in every script.
# Change stream entries kept (approximately): notices are capped here, and the store
# passes the same cap to the scripts that take it as an argument.
STREAM_MAXLEN = 100_000
# Also kept no longer than this (ms, approximately; trimmed by the send script): an entry
# of sends holds up to a few hundred messages, so the entry cap alone could keep a lot of
# them. A node whose reader lags by more than this (sustained overload; or Redis's clock
# stepped forward) finds a gap and ends its connections once (server.shutdown; clients
# reconnect and sync): protocol.md, "Several nodes".
STREAM_KEEP_MS = 60_000
# notify: append a change or notice to the change stream.
# Every change but a send, an edit or a delete (those move the revision) goes on the stream
# through notify. One that changes what a backup copies (a room, an account, a revocation:
# not a membership, a guest hold or a node's end) also moves `P meta changes`, which
# `chatd backup --redis` compares before and after its copy (chatd/store/copy.py).
_NOTIFY = f"""
local function notify(...)
  local kind = select(2, ...)
  if kind ~= 'in' and kind ~= 'out' and kind ~= 'hold' and kind ~= 'gone' then
    redis.call('HINCRBY', ARGV[1]..'meta', 'changes', 1)
  end
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
-- A msgpack array's header for n elements (n < 65536), and the element count of a stored
-- message (read from its header: a Lua table with nils has no reliable length).
local function header(n)
  if n < 16 then return string.char(0x90 + n) end
  return string.char(0xdc, math.floor(n / 256), n % 256)
end
local function count(v)
  local b = string.byte(v, 1)
  if b == 0xdc then return string.byte(v, 2) * 256 + string.byte(v, 3) end
  return b - 0x90
end
-- A message's fields packed again (cmsgpack.pack of several values is their concatenation;
-- nils stay nils): exact, floats included.
local function repack(t, n) return header(n) .. cmsgpack.pack(unpack(t, 1, n)) end
-- What the indexes need of a message (MESSAGE's fields by name):
-- {id, deleted, room, sk, tk, sl, tl, pair, nonce, ts}.
local function state(t) return {t[1], t[10], t[3], t[11], t[12], t[14], t[15], t[16], t[13], t[7]} end
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
-- The stored messages of `ids` (missing ones left out), appended to `out`; MGET in chunks
-- (a Lua call takes a few thousand arguments at most).
local function fetch(ids, out)
  for i = 1, #ids, 1000 do
    local keys = {}
    for j = i, math.min(#ids, i + 999) do keys[#keys+1] = P..'m:'..ids[j] end
    for _, v in ipairs(redis.call('MGET', unpack(keys))) do
      if v then out[#out+1] = v end
    end
  end
  return out
end
"""

# A batch of sends. ARGV: P, stream maxlen, the batch's index fields as one msgpack array
# (per room message: room id, nonce key, tail length; per DM: "", nonce key, tail length,
# sender key, recipient key, sender lower, recipient lower, pair), node, the tails
# concatenated (each: MESSAGE's elements 3.. packed by the store as an array; the script
# puts the id and revision in front), the stream's age cap in ms. The nonce key is
# "<sender key>\n<nonce>", "" for none. One argument for the whole batch, not several per
# message: packing thousands of arguments was the client's largest cost.
# Every write is grouped: one HMGET for the counters and one for the batch's nonces, one
# MSET, one ZADD per index key, one XADD: per-command costs are per batch, not per send.
# Reply, flat, two per message: id, rev (stored); -1, the stored original (a nonce used
# before); -2, 0 (the room was deleted).
SEND = _PRELUDE + r"""
local meta, stream, maxlen, node = P..'meta', P..'changes', ARGV[2], ARGV[4] or ''
local b, tails = cmsgpack.unpack(ARGV[3]), ARGV[5]
local c = redis.call('HMGET', meta, 'msg_id', 'rev')
local id, rev = tonumber(c[1]) or 0, tonumber(c[2]) or 0
-- The batch's nonces, looked up at once; one used twice in the batch is found in `seen`.
local seen, nks, i = {}, {}, 1
while i <= #b do
  if b[i+1] ~= '' then nks[#nks+1] = b[i+1] end
  if b[i] == '' then i = i + 8 else i = i + 3 end
end
if #nks > 0 then
  local got = redis.call('HMGET', P..'nonce', unpack(nks))
  for j = 1, #nks do if got[j] then seen[nks[j]] = got[j] end end
end
local made, gone, rkeys, zs, zorder, sets, sorder = {}, {}, {}, {}, {}, {}, {}
local mset, all, vals, newn, out = {}, {}, {}, {}, {}
local function zadd(k, score, m)
  local t = zs[k]
  if not t then t = {}; zs[k] = t; zorder[#zorder+1] = k end
  t[#t+1] = score; t[#t+1] = m
end
local function sadd(k, m)
  local t = sets[k]
  if not t then t = {}; sets[k] = t; sorder[#sorder+1] = k end
  t[#t+1] = m
end
local off = 1
i = 1
while i <= #b do
  local room, nk, len = b[i], b[i+1], b[i+2]
  local sk, tk, sl, tl, pair
  if room == '' then
    sk, tk, sl, tl, pair = b[i+3], b[i+4], b[i+5], b[i+6], b[i+7]
    room = nil
    i = i + 8
  else
    i = i + 3
  end
  local tail = string.sub(tails, off, off + len - 1)
  off = off + len
  local orig = false
  if nk ~= '' and seen[nk] then
    orig = made[seen[nk]] or redis.call('GET', P..'m:'..seen[nk])
  end
  if orig then
    out[#out+1] = -1; out[#out+1] = orig
  else
    if room and gone[room] == nil then
      gone[room] = redis.call('SISMEMBER', P..'rooms:gone', room) == 1
    end
    if room and gone[room] then
      out[#out+1] = -2; out[#out+1] = 0
    else
      id = id + 1
      rev = rev + 1
      local v = header(string.byte(tail, 1) - 0x8e) .. cmsgpack.pack(id, rev) .. string.sub(tail, 2)
      made[id] = v
      mset[#mset+1] = P..'m:'..id; mset[#mset+1] = v
      all[#all+1] = id; all[#all+1] = id
      vals[#vals+1] = v
      if room then
        local k = rkeys[room]
        if not k then
          k = {P..'r:'..room..':ids', P..'r:'..room..':revs'}
          rkeys[room] = k
        end
        zadd(k[1], id, id)
        zadd(k[2], rev, id)
      else
        for _, k in ipairs(live_keys(nil, sk, tk, sl, tl, pair)) do zadd(k, id, id) end
        for _, k in ipairs(rev_keys(nil, sk, tk)) do zadd(k, rev, id) end
        sadd(P..'pairs', pair)
        sadd(P..'d:{'..sk..'}:with', tl)
        sadd(P..'d:{'..tk..'}:with', sl)
      end
      if nk ~= '' then
        newn[#newn+1] = nk; newn[#newn+1] = id
        seen[nk] = id
      end
      out[#out+1] = id; out[#out+1] = rev
    end
  end
end
if #vals > 0 then
  redis.call('MSET', unpack(mset))
  redis.call('ZADD', P..'all', unpack(all))
  for _, k in ipairs(zorder) do redis.call('ZADD', k, unpack(zs[k])) end
  for _, k in ipairs(sorder) do redis.call('SADD', k, unpack(sets[k])) end
  if #newn > 0 then redis.call('HSET', P..'nonce', unpack(newn)) end
  redis.call('HSET', meta, 'msg_id', id, 'rev', rev)
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'kind', 'messages', 'node', node,
             'rev', rev, 'm', header(#vals) .. table.concat(vals))
  local now = redis.call('TIME')  -- seconds, microseconds; entry ids are in ms
  local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  redis.call('XTRIM', stream, 'MINID', '~', ms - tonumber(ARGV[6]))
end
return out
"""

# ARGV: P, maxlen, id, kind ("edited" or "deleted"), text, edited ts, by (the editor or
# the deleter), node (the writing node's id, for the bus: chatd/cluster).
# Reply: the message (MESSAGE) after the change, or false when it is missing or deleted.
CHANGE = _PRELUDE + r"""
local id, kind = ARGV[3], ARGV[4]
local key = P..'m:'..id
local v = redis.call('GET', key)
if not v then return false end
local t = cmsgpack.unpack(v)
if t[10] then return false end
local st = state(t)
-- A deleted room's messages stay until purged; a change to one is refused (as SEND does).
if st[3] and redis.call('SISMEMBER', P..'rooms:gone', st[3]) == 1 then return false end
local rev = redis.call('HINCRBY', P..'meta', 'rev', 1)
t[2] = rev
if kind == 'edited' then
  t[6] = ARGV[5]; t[8] = tonumber(ARGV[6]); t[9] = ARGV[7]
else
  t[6] = ''; t[10] = true
  unlive(id, st)
  redis.call('ZADD', dead_key(st), id, id)
end
v = repack(t, count(v))
redis.call('SET', key, v)
for _, k in ipairs(rev_keys(st[3], st[4], st[5])) do redis.call('ZADD', k, rev, id) end
redis.call('XADD', P..'changes', 'MAXLEN', '~', ARGV[2], '*', 'kind', 'message.'..kind,
           'node', ARGV[8] or '', 'rev', rev, 'by', ARGV[7], 'm', v)
return v
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
  local v = redis.call('GET', P..'m:'..id)
  if v then
    local t = cmsgpack.unpack(v)
    local st = state(t)
    local ts = st[10]
    if older ~= '' and ts >= tonumber(older) then more = 0; break end
    if st[9] and ts > nonce_cut then
      -- Its nonce is younger than the contract's 24 h: blanked, so a retry still finds it.
      if not st[2] then
        t[6] = ''; t[10] = true
        redis.call('SET', P..'m:'..id, repack(t, count(v)))
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
  local v = redis.call('GET', P..'m:'..id)
  if v then drop(id, state(cmsgpack.unpack(v))) else redis.call('ZREM', revs, id) end
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

# The account scripts serve the nodes and the offline commands alike (`chatd user add|delete
# --redis`, admin.py), so the two cannot drift. `told` is "1" from an offline command: it
# also moves `P meta users_version`, which every node polls (Store.users_version), as
# SQLiteAdmin's writes do; a node's own change leaves it (every node would reload every
# account). Either way the change goes on the stream, and the other nodes read the account.

# ARGV: P, name, name key, pw hash, admin, created_at, node, told. Reply: {id} created;
# {0} the name is an account; {-1} a guest holds it while connected; {-2, held_until} a
# guest holds it until then (names are one namespace; decided here, so across nodes too).
# A hold that lapsed by created_at is removed in the same step (no server may be running
# to release it).
CREATE_USER = _NOTIFY + r"""
local P = ARGV[1]
if redis.call('HEXISTS', P..'users', ARGV[3]) == 1 then return {0} end
local held = redis.call('HGET', P..'guests', ARGV[3])
if held and held ~= '' then
  local till = cjson.decode(held).held_until
  if till == nil or till == cjson.null then return {-1} end
  if till > tonumber(ARGV[6]) then return {-2, till} end
  redis.call('HDEL', P..'guests', ARGV[3])
end
local id = redis.call('HINCRBY', P..'meta', 'user_id', 1)
redis.call('HSET', P..'u:'..id, 'i', id, 'n', ARGV[2], 'h', ARGV[4], 'a', ARGV[5], 'tv', 0, 'c', ARGV[6])
redis.call('HSET', P..'users', ARGV[3], id)
if ARGV[8] == '1' then redis.call('HINCRBY', P..'meta', 'users_version', 1) end
notify('kind', 'user', 'node', ARGV[7] or '', 'key', ARGV[3])
return {id}
"""

# ARGV: P, name key, node, told. Reply: 1 deleted, 0 none (then nothing changes).
DELETE_USER = _NOTIFY + r"""
local P = ARGV[1]
local id = redis.call('HGET', P..'users', ARGV[2])
if not id then return 0 end
redis.call('HDEL', P..'users', ARGV[2])
redis.call('DEL', P..'u:'..id)
if ARGV[4] == '1' then redis.call('HINCRBY', P..'meta', 'users_version', 1) end
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
# Newest first without `after`, oldest first with it. Reply: {more, message...}.
PAGE = _PRELUDE + r"""
local index, before, after, limit = P..ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local ids
local hi = '+inf'
if before ~= '' then hi = '('..before end
if after ~= '' then
  ids = redis.call('ZRANGEBYSCORE', index, '('..after, hi, 'LIMIT', 0, limit + 1)
else
  ids = redis.call('ZREVRANGEBYSCORE', index, hi, '-inf', 'LIMIT', 0, limit + 1)
end
local more = 0
if #ids > limit then more = 1; ids[#ids] = nil end
return fetch(ids, {more})
"""

# Sync. ARGV: P, rev, limit, then the rev-index keys (without P). The limit+1 lowest
# revisions above `rev` over all of them, in one consistent view.
# Reply: {more, message...} in revision order.
CHANGES = _PRELUDE + r"""
local rev, limit = ARGV[2], tonumber(ARGV[3])
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
local more = 0
if #found > limit then more = 1 end
local ids = {}
for i = 1, math.min(#found, limit) do ids[i] = found[i][2] end
return fetch(ids, {more})
"""

# `chatd copy` into Redis: stored messages with their own ids and revisions, indexed as
# SEND and CHANGE index them (no stream entry: the stream is for live changes).
# ARGV: P, then one MESSAGE per message, as the store packed it.
IMPORT = _PRELUDE + r"""
for i = 2, #ARGV do
  local v = ARGV[i]
  local t = cmsgpack.unpack(v)
  local st = state(t)
  local id, rev, room, sk, tk, sl, tl, pair = t[1], t[2], st[3], st[4], st[5], st[6], st[7], st[8]
  if not room then
    redis.call('SADD', P..'pairs', pair)
    redis.call('SADD', P..'d:{'..sk..'}:with', tl)
    redis.call('SADD', P..'d:{'..tk..'}:with', sl)
  end
  if st[9] then redis.call('HSET', P..'nonce', sk..'\n'..st[9], id) end
  redis.call('SET', P..'m:'..id, v)
  redis.call('ZADD', P..'all', id, id)
  if st[2] then
    redis.call('ZADD', dead_key(st), id, id)
  else
    for _, k in ipairs(live_keys(room, sk, tk, sl, tl, pair)) do redis.call('ZADD', k, id, id) end
  end
  for _, k in ipairs(rev_keys(room, sk, tk)) do redis.call('ZADD', k, rev, id) end
end
return 1
"""

# A new guest hold, decided here so that a name is one guest's across nodes. ARGV: P, name
# key, hold JSON, now, node. Reply: 1 held; 0 the name is an account's; {2} another guest's
# hold while that guest is connected, {2, held_until} one whose grace has not ended.
HOLD_NEW = _NOTIFY + r"""
local P = ARGV[1]
if redis.call('HEXISTS', P..'users', ARGV[2]) == 1 then return 0 end
local old = redis.call('HGET', P..'guests', ARGV[2])
if old then
  local o = cjson.decode(old)
  local new = cjson.decode(ARGV[3])
  local lapsed = o.held_until ~= nil and o.held_until ~= cjson.null and o.held_until <= tonumber(ARGV[4])
  if o.jti ~= new.jti and not lapsed then
    if o.held_until == nil or o.held_until == cjson.null then return {2} end
    return {2, o.held_until}
  end
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
