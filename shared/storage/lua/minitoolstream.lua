-- MiniToolStream schema and stored procedures: the one source of truth for
-- what lives in Tarantool. Idempotent: Tarantool's init (init.lua, beside
-- this file) loads it at every start, before the port opens; a service
-- whose SCHEMA_VERSION differs applies it with `eval` (global Lua functions
-- do not survive a restart, spaces do). Tuple fields are read and updated
-- by their names in the space formats below, never by position.
-- Written for Tarantool 2.6 and later (no MVCC, streams or box.watch needed):
-- every multi-step write runs inside one stored procedure, in one transaction.

local fiber = require('fiber')
local clock = require('clock')
local digest = require('digest')
local fio = require('fio')
local ffi = require('ffi')
local buffer = require('buffer')
local uuid = require('uuid')
local log = require('log')
local msgpack = require('msgpack')

local SCHEMA_VERSION = 17
local MAP = {__serialize = 'map'}
local ARRAY = {__serialize = 'array'}

-- Error codes the procedures raise or answer with; store.rs gives the same
-- numbers the same names (a test keeps the two in step).
local ABANDONED = 10001
local LATE = 10002
local FENCED = 10003
local HOT_FULL = 10004
-- Tarantool's ER_MEMORY_ISSUE, which an OutOfMemory error (memtx full) does
-- not carry in Lua.
local MEMORY_ISSUE = 2

-- The code to answer a refused message with.
local function error_code(err)
    if type(err) ~= 'cdata' then
        return 0
    end
    if err.type == 'OutOfMemory' then
        return MEMORY_ISSUE
    end
    return err.code or 0
end

-- Integers arrive from requests and tuples as Lua numbers or, from about 2^47
-- on, as uint64_t cdata. The two mix in comparisons and + - * /, but not in
-- math.max/min or tostring, and cdata arithmetic wraps at 2^64. Integer work
-- that can meet large values goes through these helpers.
local U64_MAX = 18446744073709551615ULL
local NS_PER_MS = 1000000ULL

local function u64(value)
    return ffi.cast('uint64_t', value)
end

local function max(a, b)
    if a > b then
        return a
    end
    return b
end

local function min(a, b)
    if a < b then
        return a
    end
    return b
end

-- nil for both nil and box.NULL (which is truthy in Lua).
local function present(value)
    if value == nil then
        return nil
    end
    return value
end

-- The decimal digits of an unsigned integer (tostring adds 'ULL' to cdata).
local function decimal(value)
    return (tostring(u64(value)):gsub('ULL$', ''))
end

-- `t_ns` plus `ms` milliseconds, in nanoseconds, saturating at 2^64-1
-- (which every deadline and expiry reads as "never").
local function after_ms(t_ns, ms)
    local t, m = u64(t_ns), u64(ms)
    if m > (U64_MAX - t) / NS_PER_MS then
        return U64_MAX
    end
    return t + m * NS_PER_MS
end

-- Whether more than `ms` milliseconds lie between `t_ns` and `now`; computed
-- on the difference, so no limit however large can wrap around.
local function older_than(t_ns, now, ms)
    local t, n = u64(t_ns), u64(now)
    return n > t and (n - t) / NS_PER_MS > u64(ms)
end

-- A replica set's writes: every transaction that writes a space of the
-- schema also writes (and deletes) a row of mts_sync, the one synchronous
-- space, which makes the whole transaction synchronous: it commits only once
-- replication_synchro_quorum members have it. The data spaces themselves stay
-- asynchronous and mts_sync stays empty, because a snapshot holding rows of a
-- synchronous space cannot be recovered by Tarantool 2.6.0 (tarantool#5298,
-- fixed in 2.6.1): a member restarted from one would stop at its start.
-- mark_sync_writes (at the end) turns this on where mts_sync is synchronous.
-- Writes applied from the leader (the applier's session) carry its mts_sync
-- rows already. One pair per transaction: its first write marks it, and the
-- mark is forgotten when it commits or rolls back. A rollback to a savepoint
-- would take the pair with it if the first write came after the savepoint,
-- so savepoints are taken through marked_savepoint.
local sync_writes = false

local function sync_write()
    if not sync_writes then
        return
    end
    -- The transaction's later writes find it marked: the cheapest test first.
    local storage = fiber.self().storage
    if storage.mts_synced or box.session.type() == 'applier' then
        return
    end
    storage.mts_synced = true
    local function forget()
        storage.mts_synced = nil
    end
    box.on_commit(forget)
    box.on_rollback(forget)
    box.space.mts_sync:replace({1})
    box.space.mts_sync:delete({1})
end

-- A savepoint of a transaction already marked synchronous.
local function marked_savepoint()
    sync_write()
    return box.savepoint()
end

-- DDL yields (WAL writes) between an if_not_exists check and its insert, so
-- two services applying this file at once could both try to create the same
-- space. A lock kept in a global, taken without yielding, runs one
-- application at a time. A read-only member of a replica set applies no
-- DDL: it gets the spaces and grants from the member that takes writes, and
-- defines the procedures only.
local function with_schema_lock(apply)
    if box.info.ro then
        return
    end
    local lock = rawget(_G, 'mts_schema_lock')
    if lock == nil then
        lock = fiber.channel(1)
        rawset(_G, 'mts_schema_lock', lock)
    end
    lock:put(true)
    local ok, err = pcall(apply)
    lock:get()
    if not ok then
        error(err)
    end
end

-- Inside a transaction: gives the row of `space` under `key` every field of
-- its format, so that any of them can be updated (an update cannot skip
-- over absent fields); returns the row.
local function pad_row(space, key)
    local row = space:get(key)
    local fields = #space:format()
    if #row < fields then
        local padded = row:totable()
        for i = #row + 1, fields do
            padded[i] = box.NULL
        end
        row = space:replace(padded)
    end
    return row
end

local function pad_subject(subject)
    return pad_row(box.space.mts_subjects, subject)
end

with_schema_lock(function()
    local SUBJECT_FORMAT = {
        {name = 'name', type = 'string'},
        -- Highest sequence ever assigned; never lowered, so never reused.
        {name = 'last_seq', type = 'unsigned'},
        -- Messages stored and their payload bytes (nil only before schema 3's backfill).
        {name = 'count', type = 'unsigned', is_nullable = true},
        {name = 'bytes', type = 'unsigned', is_nullable = true},
        -- Retention limits of this subject; nil = the service default, 0 = unlimited.
        {name = 'max_age_ms', type = 'unsigned', is_nullable = true},
        {name = 'max_messages', type = 'unsigned', is_nullable = true},
        {name = 'max_bytes', type = 'unsigned', is_nullable = true},
        -- Of `count` and `bytes`, those in segments (the cold tier); nil = 0.
        {name = 'cold_count', type = 'unsigned', is_nullable = true},
        {name = 'cold_bytes', type = 'unsigned', is_nullable = true},
        -- What a publish meets when the hot tier is full: 'new' refuses it,
        -- 'old' evicts the subject's oldest hot messages; nil = the default.
        {name = 'discard', type = 'string', is_nullable = true},
        -- Bytes of this subject's segment objects; nil = none.
        {name = 'segment_bytes', type = 'unsigned', is_nullable = true},
        -- When DeleteSubject removed it (since schema 16): the row stays,
        -- keeping last_seq, so that its sequences are never used again.
        {name = 'deleted_ns', type = 'unsigned', is_nullable = true},
        -- Since schema 16: true once a message with an ordering key was
        -- published to it; only then does delivery look keys up.
        {name = 'keyed', type = 'boolean', is_nullable = true},
    }
    box.schema.space.create('mts_subjects', {if_not_exists = true, format = SUBJECT_FORMAT})
    box.space.mts_subjects:format(SUBJECT_FORMAT)
    box.space.mts_subjects:create_index('primary', {parts = {'name'}, if_not_exists = true})

    local MESSAGE_FORMAT = {
        {name = 'subject', type = 'string'},
        {name = 'seq', type = 'unsigned'},
        {name = 'ts_ns', type = 'unsigned'},
        {name = 'headers', type = 'map'},
        -- Inline payload; nil when the payload lives in the object store.
        {name = 'data', type = 'any', is_nullable = true},
        {name = 'object_key', type = 'string', is_nullable = true},
        {name = 'size', type = 'unsigned'},
        -- Hex SHA-256 of the payload; nil on messages stored before schema 4.
        {name = 'sha256', type = 'string', is_nullable = true},
        -- Since schema 15 a row may hold a run of inline messages stored by
        -- one group commit (a block row): seq to last_seq, all committed at
        -- ts_ns, `size` their payload bytes, `batch` their
        -- {headers, data, sha256} in order, as one MessagePack array (the
        -- ingress encodes it, so that Tarantool handles one value, not one
        -- per message); headers, data, object_key and sha256 are empty.
        -- nil on a row of one message.
        {name = 'last_seq', type = 'unsigned', is_nullable = true},
        {name = 'batch', type = 'any', is_nullable = true},
    }
    box.schema.space.create('mts_messages', {if_not_exists = true, format = MESSAGE_FORMAT})
    box.space.mts_messages:format(MESSAGE_FORMAT)
    -- One index only: every index entry is paid for by every publish.
    box.space.mts_messages:create_index('primary', {parts = {'subject', 'seq'}, if_not_exists = true})

    local CONSUMER_FORMAT = {
        {name = 'subject', type = 'string'},
        {name = 'durable', type = 'string'},
        -- The ack floor: everything up to and including it is acknowledged.
        {name = 'ack_seq', type = 'unsigned'},
        {name = 'created_ns', type = 'unsigned'},
        -- Highest sequence ever handed out; nil on rows from schema 1 (= ack_seq).
        {name = 'delivered_seq', type = 'unsigned', is_nullable = true},
        {name = 'ack_wait_ms', type = 'unsigned', is_nullable = true},
        -- 0 = unlimited.
        {name = 'max_deliver', type = 'unsigned', is_nullable = true},
        -- 0 = unlimited.
        {name = 'max_ack_pending', type = 'unsigned', is_nullable = true},
        {name = 'deliver_policy', type = 'string', is_nullable = true},
        {name = 'start_seq', type = 'unsigned', is_nullable = true},
        {name = 'start_time_ns', type = 'unsigned', is_nullable = true},
        -- Dead-letter subject; '' = none.
        {name = 'dlq_subject', type = 'string', is_nullable = true},
        -- Messages given up by terminal rejection (mts_reject); nil = 0.
        {name = 'rejected', type = 'unsigned', is_nullable = true},
        -- Since schema 16: removed after this long unused; nil or 0 = never.
        {name = 'inactive_threshold_ms', type = 'unsigned', is_nullable = true},
        -- Last use (a lease call, an ack, an open stream), to ACTIVE_GRAIN_MS; nil = created_ns.
        {name = 'active_ns', type = 'unsigned', is_nullable = true},
    }
    box.schema.space.create('mts_consumers', {if_not_exists = true, format = CONSUMER_FORMAT})
    box.space.mts_consumers:format(CONSUMER_FORMAT)
    box.space.mts_consumers:create_index('primary', {parts = {'subject', 'durable'}, if_not_exists = true})

    -- One row per run of messages handed out together and not all
    -- acknowledged (see "Leases are kept in runs"): leased until deadline_ns,
    -- or (after a nack) waiting until deadline_ns to be redelivered.
    local PENDING_FORMAT = {
        {name = 'subject', type = 'string'},
        {name = 'durable', type = 'string'},
        -- The run's first sequence (always held).
        {name = 'seq', type = 'unsigned'},
        {name = 'deliveries', type = 'unsigned'},
        {name = 'deadline_ns', type = 'unsigned'},
        {name = 'first_delivered_ns', type = 'unsigned'},
        -- Since schema 13; rows before are runs of one (seq).
        {name = 'last_seq', type = 'unsigned', is_nullable = true},
        -- '1' held, '0' not, one per sequence from seq; nil = all held.
        {name = 'held', type = 'string', is_nullable = true},
        {name = 'held_count', type = 'unsigned', is_nullable = true},
    }
    box.schema.space.create('mts_pending', {if_not_exists = true, format = PENDING_FORMAT})
    box.space.mts_pending:format(PENDING_FORMAT)
    box.space.mts_pending:create_index('primary', {parts = {'subject', 'durable', 'seq'}, if_not_exists = true})
    box.space.mts_pending:create_index('deadline', {
        parts = {'subject', 'durable', 'deadline_ns', 'seq'}, if_not_exists = true,
    })

    -- Object keys whose publish was given up on: a late commit naming one of them
    -- is refused, so an object deleted after an ambiguous failure is never
    -- referenced by metadata.
    box.schema.space.create('mts_abandoned', {
        if_not_exists = true,
        format = {
            {name = 'object_key', type = 'string'},
            {name = 'ts_ns', type = 'unsigned'},
        },
    })
    box.space.mts_abandoned:create_index('primary', {parts = {'object_key'}, if_not_exists = true})

    -- Idempotent publish: a message id seen on a subject within its window maps
    -- to the sequence it was stored under.
    box.schema.space.create('mts_dedup', {
        if_not_exists = true,
        format = {
            {name = 'subject', type = 'string'},
            {name = 'message_id', type = 'string'},
            {name = 'seq', type = 'unsigned'},
            {name = 'expires_ns', type = 'unsigned'},
        },
    })
    box.space.mts_dedup:create_index('primary', {parts = {'subject', 'message_id'}, if_not_exists = true})
    box.space.mts_dedup:create_index('expiry', {parts = {'expires_ns', 'subject', 'message_id'}, if_not_exists = true})

    -- Object keys whose last message is gone: the maintenance worker deletes
    -- the object, then the row. Written in the transaction that removes the
    -- metadata, so an object is never deleted while metadata still names it.
    box.schema.space.create('mts_gc', {
        if_not_exists = true,
        format = {
            {name = 'object_key', type = 'string'},
            {name = 'ts_ns', type = 'unsigned'},
        },
    })
    box.space.mts_gc:create_index('primary', {parts = {'object_key'}, if_not_exists = true})

    -- Named leases, so that one replica at a time runs maintenance.
    box.schema.space.create('mts_leases', {
        if_not_exists = true,
        format = {
            {name = 'name', type = 'string'},
            {name = 'holder', type = 'string'},
            {name = 'expires_ns', type = 'unsigned'},
        },
    })
    box.space.mts_leases:create_index('primary', {parts = {'name'}, if_not_exists = true})

    -- Group-commit attempts: each mts_publish_batch call carries an attempt id
    -- and leaves its verdicts here in the same transaction, so that a caller
    -- whose connection broke before the answer can learn what happened
    -- (mts_settle_attempt) instead of guessing. Settling an attempt that never
    -- arrived fences it: if it arrives later, it stores nothing. The caller
    -- forgets answered attempts on its next call; the rest expire.
    box.schema.space.create('mts_attempts', {
        if_not_exists = true,
        format = {
            {name = 'attempt', type = 'string'},
            {name = 'ts_ns', type = 'unsigned'},
            -- True when settled before it arrived: it must never be stored.
            {name = 'fenced', type = 'boolean'},
            -- What mts_publish_batch answered, one verdict per message.
            {name = 'verdicts', type = 'array', is_nullable = true},
        },
    })
    box.space.mts_attempts:create_index('primary', {parts = {'attempt'}, if_not_exists = true})
    box.space.mts_attempts:create_index('ts', {parts = {'ts_ns', 'attempt'}, if_not_exists = true})

    -- Who this store is: an id drawn when the schema is first applied, and
    -- when. Object keys carry the id, so the orphan sweep only ever deletes
    -- objects this store wrote, never those of another store or application
    -- sharing the bucket, nor a restored bucket's when Tarantool comes back
    -- empty (that is a new store with a new id).
    box.schema.space.create('mts_identity', {
        if_not_exists = true,
        format = {
            {name = 'store_id', type = 'string'},
            {name = 'created_ns', type = 'unsigned'},
        },
    })
    box.space.mts_identity:create_index('primary', {parts = {'store_id'}, if_not_exists = true})
    if box.space.mts_identity:len() == 0 then
        box.space.mts_identity:insert({uuid.str(), clock.realtime64()})
    end

    -- The cold tier: sealed runs of a subject's oldest messages, packed into
    -- one object each (shared/storage/src/segment.rs writes and reads the
    -- format). A segment holds every message from first_seq to last_seq;
    -- `blocks` locates them: {first_seq, first_ts_ns, offset, length} per
    -- block, in order. Hot rows (mts_messages) are newer than a subject's
    -- segments, but for the rows a swap has yet to trim (see mts_tier_commit):
    -- copies of messages a segment holds, never read in its place.
    local SEGMENT_FORMAT = {
        {name = 'subject', type = 'string'},
        {name = 'first_seq', type = 'unsigned'},
        {name = 'last_seq', type = 'unsigned'},
        {name = 'first_ts_ns', type = 'unsigned'},
        {name = 'last_ts_ns', type = 'unsigned'},
        {name = 'count', type = 'unsigned'},
        {name = 'bytes', type = 'unsigned'},
        {name = 'object_key', type = 'string'},
        {name = 'object_size', type = 'unsigned'},
        {name = 'blocks', type = 'array'},
        {name = 'created_ns', type = 'unsigned'},
    }
    box.schema.space.create('mts_segments', {if_not_exists = true, format = SEGMENT_FORMAT})
    box.space.mts_segments:create_index('primary', {parts = {'subject', 'first_seq'}, if_not_exists = true})
    box.space.mts_segments:create_index('last', {parts = {'subject', 'last_seq'}, if_not_exists = true})
    box.space.mts_segments:create_index('object_key', {parts = {'object_key'}, if_not_exists = true})

    -- Offloaded payloads and the stored messages (hot or in a segment) that
    -- name them: an object stays while one of these names it. Kept apart
    -- from mts_messages so that inline messages, nearly all of them, pay for
    -- no index of object keys.
    box.schema.space.create('mts_object_refs', {
        if_not_exists = true,
        format = {
            {name = 'object_key', type = 'string'},
            {name = 'subject', type = 'string'},
            {name = 'seq', type = 'unsigned'},
            {name = 'size', type = 'unsigned'},
        },
    })
    box.space.mts_object_refs:create_index('primary', {
        parts = {'object_key', 'subject', 'seq'}, if_not_exists = true,
    })
    box.space.mts_object_refs:create_index('message', {parts = {'subject', 'seq'}, if_not_exists = true})

    -- Since schema 16: the ordering key of each message published with one
    -- (header mts-ordering-key), in either tier: a segment's messages are
    -- read only by the service, and delivery decides by key in here. Rows
    -- of messages retention removed are trimmed after them (trim_keys).
    box.schema.space.create('mts_keys', {
        if_not_exists = true,
        format = {
            {name = 'subject', type = 'string'},
            {name = 'seq', type = 'unsigned'},
            {name = 'key', type = 'string'},
        },
    })
    box.space.mts_keys:create_index('primary', {parts = {'subject', 'seq'}, if_not_exists = true})

    -- Per consumer and ordering key, the messages with that key it has
    -- taken on and not finished, in sequence order: the first is delivered
    -- (leased, or due again), the rest wait behind it as parked runs of
    -- mts_pending (deliveries 0, never due by time) until it is acked,
    -- dead-lettered or rejected.
    box.schema.space.create('mts_key_waits', {
        if_not_exists = true,
        format = {
            {name = 'subject', type = 'string'},
            {name = 'durable', type = 'string'},
            {name = 'key', type = 'string'},
            {name = 'seq', type = 'unsigned'},
        },
    })
    box.space.mts_key_waits:create_index('primary', {
        parts = {'subject', 'durable', 'key', 'seq'}, if_not_exists = true,
    })
    box.space.mts_key_waits:create_index('seq', {parts = {'subject', 'durable', 'seq'}, if_not_exists = true})

    -- Since schema 17: the synchronous space of a replica set (see
    -- sync_write); always empty.
    box.schema.space.create('mts_sync', {if_not_exists = true, format = {{name = 'id', type = 'unsigned'}}})
    box.space.mts_sync:create_index('primary', {if_not_exists = true})

    -- Schema 12 keeps each subject's segment object bytes, so that the
    -- gauges need not walk every segment: add up those written before.
    do
        local unsummed = {}
        for _, row in box.space.mts_subjects:pairs() do
            if (row.cold_count or 0) > 0 and row.segment_bytes == nil then
                unsummed[#unsummed + 1] = row.name
            end
        end
        for _, name in ipairs(unsummed) do
            local bytes = 0
            for _, seg in box.space.mts_segments.index.primary:pairs({name}, {iterator = 'EQ'}) do
                bytes = bytes + seg.object_size
            end
            pad_subject(name)
            box.space.mts_subjects:update({name}, {{'=', 'segment_bytes', bytes}})
        end
    end

    -- Before schema 11 mts_messages indexed object keys and commit times
    -- itself: move the keys over, then drop both indexes.
    local messages = box.space.mts_messages
    if messages.index.object_key ~= nil then
        local refs = {}
        for _, m in messages.index.object_key:pairs({box.NULL}, {iterator = 'GT'}) do
            refs[#refs + 1] = {m.object_key, m.subject, m.seq, m.size}
        end
        box.atomic(function()
            for _, ref in ipairs(refs) do
                box.space.mts_object_refs:replace(ref)
            end
        end)
        messages.index.object_key:drop()
    end
    if messages.index.ts ~= nil then
        messages.index.ts:drop()
    end

    -- Schema 3 counts messages and bytes per subject; fill in rows written before.
    do
        local uncounted = {}
        for _, row in box.space.mts_subjects:pairs() do
            if row.count == nil then
                uncounted[#uncounted + 1] = row.name
            end
        end
        for _, name in ipairs(uncounted) do
            local count, bytes = 0, 0
            for _, m in box.space.mts_messages.index.primary:pairs({name}, {iterator = 'EQ'}) do
                count = count + 1
                bytes = bytes + m.size
            end
            box.space.mts_subjects:update({name}, {{'=', 'count', count}, {'=', 'bytes', bytes}})
        end
    end
end)


-- Per-subject condition variables for long-polling waiters. Kept in a global
-- so that re-applying this file does not orphan fibers already waiting.
local conds = rawget(_G, 'mts_conds')
if conds == nil then
    conds = {}
    rawset(_G, 'mts_conds', conds)
end

local function last_seq(subject)
    local row = box.space.mts_subjects:get(subject)
    if row == nil then
        return 0
    end
    return row.last_seq
end

local function now_ns()
    return clock.realtime64()
end

local function notify(subject)
    local waiting = conds[subject]
    if waiting ~= nil then
        waiting.cond:broadcast()
        if waiting.watchers ~= nil then
            waiting.watchers:broadcast()
        end
    end
end

-- Per-subject release epochs, bumped whenever a consumer of the subject can
-- be handed messages that no commit brought: a nack, a release, a seek, or
-- room freed for a consumer found at max_ack_pending. Watchers (mts_wait
-- with `seen`) return on a bump, so the service wakes its idle streams at
-- once rather than when their timers run out. In memory: after a restart
-- they start again at 0, which a watcher sees as one more change.
local releases = rawget(_G, 'mts_releases')
if releases == nil then
    releases = {}
    rawset(_G, 'mts_releases', releases)
end

-- Consumers that a look found at max_ack_pending, by subject then durable:
-- only for them does an ack bump the epoch.
local starved = rawget(_G, 'mts_starved')
if starved == nil then
    starved = {}
    rawset(_G, 'mts_starved', starved)
end

local function released(subject)
    releases[subject] = (releases[subject] or 0) + 1
    notify(subject)
end

-- The consumer gave up leases (acked, rejected, dead-lettered): if a look
-- found it without room, its other streams may now take more.
local function room_freed(subject, durable)
    local by_durable = starved[subject]
    if by_durable == nil or by_durable[durable] == nil then
        return
    end
    by_durable[durable] = nil
    if next(by_durable) == nil then
        starved[subject] = nil
    end
    released(subject)
end

local function mark_starved(subject, durable)
    local by_durable = starved[subject]
    if by_durable == nil then
        by_durable = {}
        starved[subject] = by_durable
    end
    by_durable[durable] = true
end

-- A lease of the subject now runs out at `at`: watchers sleeping until a
-- later lease end are woken to sleep until this one instead.
local function lease_ends_at(subject, at)
    local waiting = conds[subject]
    if waiting == nil or waiting.dues == nil then
        return
    end
    for _, due in pairs(waiting.dues) do
        if at < due then
            -- Watchers only: a consume call waiting here has its own deadline.
            if waiting.watchers ~= nil then
                waiting.watchers:broadcast()
            end
            return
        end
    end
end

------------------------------------------------------------------------------
-- Hot rows. A row of mts_messages holds one message, its fields its own, or
-- (a block row) the run seq..last_seq that one group commit stored for a
-- subject (see MESSAGE_FORMAT). Readers get each message of a block row as
-- a message tuple would be: an array of the same eight fields, also
-- readable by their names.
------------------------------------------------------------------------------

local MESSAGE_FIELDS = {subject = 1, seq = 2, ts_ns = 3, headers = 4, data = 5, object_key = 6, size = 7, sha256 = 8}
local MESSAGE = {
    __serialize = 'array',
    __index = function(t, name)
        local i = MESSAGE_FIELDS[name]
        if i ~= nil then
            return rawget(t, i)
        end
        return nil
    end,
}

-- The last sequence row `m` holds, and how many it holds.
local function row_last(m)
    return m.last_seq or m.seq
end

local function row_count(m)
    return row_last(m) - m.seq + 1
end

-- A block row's {headers, data, sha256} per message, in order.
local function block_items(m)
    return msgpack.decode(m.batch)
end

-- Message `seq` of block row `m`, whose item it is.
local function block_message(m, item, seq)
    local data = item[2]
    return setmetatable({
        m.subject, seq, m.ts_ns, setmetatable(item[1], MAP), data, box.NULL, #data, item[3] or box.NULL,
    }, MESSAGE)
end

-- Message `seq` of row `m`, which holds it.
local function row_message(m, seq)
    if m.batch == nil then
        return m
    end
    return block_message(m, block_items(m)[seq - m.seq + 1], seq)
end

-- Calls visit(message) for the messages of row `m` after `after`, in
-- order, until visit returns false; returns false then, else true.
local function each_in_row(m, after, visit)
    if m.batch == nil then
        return m.seq <= after or visit(m)
    end
    local items = block_items(m)
    for i = max(1, after - m.seq + 2), #items do
        if not visit(block_message(m, items[i], m.seq + i - 1)) then
            return false
        end
    end
    return true
end

-- The hot row of `subject` holding `seq`, or nil.
local function hot_at(subject, seq)
    local m = box.space.mts_messages:get({subject, seq})
    if m ~= nil then
        return m
    end
    m = box.space.mts_messages.index.primary:select({subject, seq}, {iterator = 'LE', limit = 1})[1]
    if m ~= nil and m.subject == subject and row_last(m) >= seq then
        return m
    end
    return nil
end

-- The first hot row of `subject` holding a message after `after`, or nil.
local function hot_row_after(subject, after)
    local m = hot_at(subject, after + 1)
    if m ~= nil then
        return m
    end
    m = box.space.mts_messages.index.primary:select({subject, after}, {iterator = 'GT', limit = 1})[1]
    if m ~= nil and m.subject == subject then
        return m
    end
    return nil
end

-- Calls visit(message) for the hot messages of `subject` after `after`, in
-- order, until visit returns false.
local function each_hot_after(subject, after, visit)
    local first = hot_at(subject, after + 1)
    if first ~= nil then
        if not each_in_row(first, after, visit) then
            return
        end
        after = row_last(first)
    end
    for _, m in box.space.mts_messages.index.primary:pairs({subject, after}, {iterator = 'GT'}) do
        if m.subject ~= subject or not each_in_row(m, after, visit) then
            return
        end
    end
end

-- Inside a transaction: cuts the first `k` messages (fewer than it holds)
-- off block row `m`; `counted`: they leave the subject's counts too (not
-- so for copies of messages a segment holds). Returns their payload bytes.
local function drop_front(m, k, counted)
    local tail, dropped = setmetatable({}, ARRAY), 0
    for i, item in ipairs(block_items(m)) do
        if i <= k then
            dropped = dropped + #item[2]
        else
            setmetatable(item[1], MAP)
            tail[#tail + 1] = item
        end
    end
    box.space.mts_messages:delete({m.subject, m.seq})
    box.space.mts_messages:insert({
        m.subject, m.seq + k, m.ts_ns, setmetatable({}, MAP), box.NULL, box.NULL, m.size - dropped, box.NULL,
        m.last_seq, msgpack.encode(tail),
    })
    if counted then
        box.space.mts_subjects:update({m.subject}, {{'-', 'count', k}, {'-', 'bytes', dropped}})
    end
    return dropped
end

-- Inside a transaction: deletes the hot copies of `subject`'s messages up
-- to `through` that row `m` (its oldest) holds, which a segment holds too.
local function drop_copies(m, through)
    if row_last(m) <= through then
        box.space.mts_messages:delete({m.subject, m.seq})
    else
        drop_front(m, through - m.seq + 1, false)
    end
end

------------------------------------------------------------------------------
-- Reading across the tiers. A subject's stored messages run gap-free from its
-- first to its last stored sequence (only the oldest are ever removed):
-- first through its segments, in order, then through its hot rows. A message
-- in a segment is answered as a reference the service resolves from the
-- object store: the message's fields with only subject and seq filled in,
-- and a ninth field {segment object key, block offset, block length} (and,
-- for a consumer that takes spans, the object's size).
------------------------------------------------------------------------------

-- What a reader needs of a segment row, its fields read once: reading
-- `blocks` off the tuple builds a Lua table per block every time, which
-- per message handed out cost a replay most of its time.
local function segment_view(seg)
    return {subject = seg.subject, object_key = seg.object_key, object_size = seg.object_size, blocks = seg.blocks}
end

-- The block of segment view `view` that holds `seq` (a binary search), and
-- its index in the view's blocks.
local function block_of(view, seq)
    local blocks = view.blocks
    local lo, hi = 1, #blocks
    while lo < hi do
        local mid = math.floor((lo + hi + 1) / 2)
        if blocks[mid][1] <= seq then
            lo = mid
        else
            hi = mid - 1
        end
    end
    return blocks[lo], lo
end

-- A reference to message `seq` in `block` of segment view `view`; `sized`:
-- with the object's size after the block (for callers that take it).
local function block_ref(view, block, seq, sized)
    local at = {view.object_key, block[3], block[4]}
    if sized then
        at[4] = view.object_size
    end
    return setmetatable({
        view.subject, seq, block[2], setmetatable({}, MAP), box.NULL, box.NULL, 0, box.NULL,
        setmetatable(at, ARRAY),
    }, ARRAY)
end

local function cold_ref(view, seq)
    return block_ref(view, block_of(view, seq), seq)
end

-- The segment holding `seq` of `subject`, or nil.
local function segment_of(subject, seq)
    local seg = box.space.mts_segments.index.last:select({subject, seq}, {iterator = 'GE', limit = 1})[1]
    if seg ~= nil and seg.subject == subject and seg.first_seq <= seq then
        return seg
    end
    return nil
end

-- The last sequence of `subject` held in a segment, or 0. Hot rows at or
-- below it are a swap's leftovers (see mts_tier_commit).
local function tiered_through(subject)
    local seg = box.space.mts_segments.index.last:select({subject}, {iterator = 'REQ', limit = 1})[1]
    if seg ~= nil then
        return seg.last_seq
    end
    return 0
end

-- The first hot message of `subject` that no segment holds: its sequence
-- and its row, or nil; `through` is tiered_through(subject) when the caller
-- has it.
local function first_hot(subject, through)
    through = through or tiered_through(subject)
    local m = hot_row_after(subject, through)
    if m ~= nil then
        return max(m.seq, through + 1), m
    end
    return nil
end

-- Message `seq` of `subject`: its hot tuple, a reference into its segment,
-- or nil when it is not stored. (A leftover hot row of a segment's message
-- is the same message.)
local function locate(subject, seq)
    local hot = hot_at(subject, seq)
    if hot ~= nil then
        return row_message(hot, seq)
    end
    local seg = segment_of(subject, seq)
    if seg ~= nil then
        return cold_ref(segment_view(seg), seq)
    end
    return nil
end

-- Calls visit(first, last, message) for the stored messages of `subject`
-- after `after`, in order, until visit returns false: a hot message alone
-- (first == last, `message` its tuple), or the messages from first to last
-- of one block of a segment, `message` a reference to `first` (the block
-- holds them all; `sized`: it names the object's size too).
local function each_span_after(subject, after, sized, visit)
    for _, seg in box.space.mts_segments.index.last:pairs({subject, after}, {iterator = 'GT'}) do
        if seg.subject ~= subject then
            break
        end
        local view = segment_view(seg)
        local blocks = view.blocks
        local seq = max(seg.first_seq, after + 1)
        local block, i = block_of(view, seq)
        while block ~= nil do
            local next_block = blocks[i + 1]
            local last = seg.last_seq
            if next_block ~= nil then
                last = next_block[1] - 1
            end
            if not visit(seq, last, block_ref(view, block, seq, sized)) then
                return
            end
            seq, block, i = last + 1, next_block, i + 1
        end
        after = seg.last_seq
    end
    each_hot_after(subject, after, function(m)
        return visit(m.seq, m.seq, m)
    end)
end

-- The first stored sequence of `subject` after `after` and its commit time
-- (for a message in a segment, its block's first commit time: at most that
-- old), or nil.
local function first_after(subject, after)
    local seg = box.space.mts_segments.index.last:select({subject, after}, {iterator = 'GT', limit = 1})[1]
    if seg ~= nil and seg.subject == subject then
        local seq = max(seg.first_seq, after + 1)
        return seq, block_of(segment_view(seg), seq)[2]
    end
    local m = hot_row_after(subject, after)
    if m ~= nil then
        return max(m.seq, after + 1), m.ts_ns
    end
    return nil
end

-- Defined with retention below; publishing evicts with it too.
local remove_row

-- Whether a stored message, hot or in a segment, or a segment itself names
-- object `key`.
local function object_referenced(key)
    return box.space.mts_object_refs:select({key}, {limit = 1})[1] ~= nil
        or box.space.mts_segments.index.object_key:get(key) ~= nil
end

rawset(_G, 'mts_schema_version', function()
    return SCHEMA_VERSION
end)

-- A subject's last sequence and counts while a transaction adds messages to
-- it; `close_subject` writes them back, once however many were added.
local function open_subject(subject)
    local row = box.space.mts_subjects:get(subject)
    return {
        name = subject, seq = row ~= nil and row.last_seq or 0, count = 0, bytes = 0, exists = row ~= nil,
        keyed = row ~= nil and row.keyed == true, newly_keyed = false,
        deleted = row ~= nil and row.deleted_ns ~= nil,
    }
end

local function close_subject(s)
    if s.count == 0 then
        return
    end
    if s.exists then
        box.space.mts_subjects:update({s.name}, {
            {'=', 'last_seq', s.seq}, {'+', 'count', s.count}, {'+', 'bytes', s.bytes},
        })
    else
        box.space.mts_subjects:insert({s.name, s.seq, s.count, s.bytes})
    end
    if s.newly_keyed then
        pad_subject(s.name)
        box.space.mts_subjects:update({s.name}, {{'=', 'keyed', true}})
    end
    if s.deleted then
        -- Published to again after DeleteSubject: a subject like any other.
        box.space.mts_subjects:update({s.name}, {{'=', 'deleted_ns', box.NULL}})
    end
end

-- The header that carries a message's ordering key (set by the ingress from
-- the publish's ordering_key field; the mts- prefix is the service's own).
local ORDERING_KEY_HEADER = 'mts-ordering-key'

-- Inside a transaction: stores the message under the next sequence of the
-- open subject `s`, unless `message_id` was seen on it within its window.
-- Returns the sequence and whether it was a duplicate (then the first one's
-- sequence, and nothing stored). Raises, having written nothing, when the
-- message cannot be stored.
local function add_message(now, s, headers, data, object_key, size, sha256, message_id, window_ms)
    local dedup = message_id ~= nil and message_id ~= ''
    if dedup then
        local seen = box.space.mts_dedup:get({s.name, message_id})
        if seen ~= nil and seen.expires_ns > now then
            return seen.seq, true
        end
    end
    local seq = s.seq + 1
    if data == nil then
        data = box.NULL
    end
    if object_key == nil then
        object_key = box.NULL
    end
    local row = {s.name, seq, now, setmetatable(headers or {}, MAP), data, object_key, size, sha256}
    local key = headers ~= nil and headers[ORDERING_KEY_HEADER] or nil
    if dedup or object_key ~= nil or key ~= nil then
        local savepoint = marked_savepoint()
        local ok, err = pcall(function()
            box.space.mts_messages:insert(row)
            if object_key ~= nil then
                box.space.mts_object_refs:replace({object_key, s.name, seq, size})
            end
            if dedup then
                box.space.mts_dedup:replace({s.name, message_id, seq, after_ms(now, window_ms or 0)})
            end
            if key ~= nil then
                box.space.mts_keys:replace({s.name, seq, key})
            end
        end)
        if not ok then
            box.rollback_to_savepoint(savepoint)
            error(err)
        end
    else
        box.space.mts_messages:insert(row)
    end
    s.seq, s.count, s.bytes = seq, s.count + 1, s.bytes + size
    if key ~= nil and not s.keyed then
        s.keyed, s.newly_keyed = true, true
    end
    return seq, false
end

-- Inside a transaction: stores `count` inline messages (`bytes` of payload,
-- `batch` their {headers, data, sha256}, MessagePack-encoded) as one block
-- row under the next sequences of the open subject `s`; returns the first.
local function add_block(now, s, count, bytes, batch)
    local first = s.seq + 1
    box.space.mts_messages:insert({
        s.name, first, now, setmetatable({}, MAP), box.NULL, box.NULL, bytes, box.NULL, s.seq + count, batch,
    })
    s.seq, s.count, s.bytes = s.seq + count, s.count + count, s.bytes + bytes
    return first
end

-- Inside a transaction: stores a message under the next sequence of
-- `subject`; returns the sequence.
local function store_message(subject, headers, data, object_key, size, sha256)
    local s = open_subject(subject)
    local seq = add_message(now_ns(), s, headers, data, object_key, size, sha256)
    close_subject(s)
    return seq
end

------------------------------------------------------------------------------
-- The hot tier's budget. Hot rows, and the message ids remembered for
-- deduplication (which no tiering can move), are bounded in bytes (of
-- tuples) and in rows; the service passes its configured budget with every
-- publish as {max_bytes, max_rows, discard} (0 = derived from memtx_memory:
-- a quarter of it for bytes, one row per 2 KiB of it: the allocator, the
-- indexes, consumers and segment rows need the rest). Once over, each
-- subject's discard policy decides: 'new' refuses the publish, 'old' evicts
-- the subject's oldest hot message for each new one.
------------------------------------------------------------------------------

local function hot_budget(hot)
    if hot == nil then
        return nil
    end
    local memtx = box.cfg.memtx_memory or (256 * 1024 * 1024)
    local max_bytes = hot.max_bytes or 0
    local max_rows = hot.max_rows or 0
    if max_bytes == 0 then
        max_bytes = math.floor(memtx / 4)
    end
    if max_rows == 0 then
        max_rows = math.floor(memtx / 2048)
    end
    return {max_bytes = max_bytes, max_rows = max_rows, discard = hot.discard or 'new'}
end

-- Bytes and rows counted against the budget.
local function hot_size()
    local messages, ids = box.space.mts_messages, box.space.mts_dedup
    return messages:bsize() + ids:bsize(), messages:len() + ids:len()
end

-- Whether the hot tier is over `budget`, with its size measured now
-- unless given.
local function hot_full(budget, bytes, rows)
    if bytes == nil then
        bytes, rows = hot_size()
    end
    return bytes >= budget.max_bytes or rows >= budget.max_rows
end

-- Whether message `message_id` on subject `s` would be a duplicate (which
-- stores nothing, so is never refused for room).
local function seen_recently(s, message_id, now)
    if message_id == nil or message_id == '' then
        return false
    end
    local seen = box.space.mts_dedup:get({s.name, message_id})
    return seen ~= nil and seen.expires_ns > now
end

-- Why a message of open subject `s` is refused for room.
local function refusal(s, budget)
    local bytes, rows = hot_size()
    return string.format(
        'the hot tier is full (%s of %s bytes, %s of %s rows of messages not yet moved to the object store'
            .. ' and of remembered message ids), and subject %s discards new messages: publish again once'
            .. ' tiering catches up (is the object store reachable?), or set the subject\'s discard policy to old',
        decimal(bytes), decimal(budget.max_bytes), decimal(rows), decimal(budget.max_rows), s.name)
end

-- Inside a transaction, with the hot tier over `budget`: makes room for `n`
-- messages (nil = 1) of open subject `s` as its discard policy says: 'old'
-- removes the subject's oldest hot rows, as many messages as it adds at
-- least (a row holds up to one group commit's). Returns nil when there is
-- room now, or the reason the messages are refused. The policy and the
-- reason are worked out once per subject and call.
local function make_room(s, budget, n)
    if s.discard == nil then
        local row = box.space.mts_subjects:get(s.name)
        s.discard = budget.discard
        if row ~= nil and row.discard ~= nil then
            s.discard = row.discard
        end
    end
    n = n or 1
    s.room = s.room or 0
    while s.discard == 'old' and s.room < n do
        local oldest = box.space.mts_messages.index.primary:select({s.name}, {iterator = 'EQ', limit = 1})[1]
        if oldest == nil then
            break
        end
        local through = tiered_through(s.name)
        if oldest.seq <= through then
            -- A swap's leftover: its messages stay, in their segment.
            s.room = s.room + min(row_last(oldest), through) - oldest.seq + 1
            drop_copies(oldest, through)
        else
            s.room = s.room + row_count(oldest)
            remove_row(oldest)
        end
    end
    if s.room >= n then
        s.room = s.room - n
        return nil
    end
    if s.refused == nil then
        s.refused = refusal(s, budget)
    end
    return s.refused
end

local LATE_REASON = 'publish reached Tarantool after its deadline; nothing was stored'
    .. ' (if this persists, check clock sync between the services and Tarantool)'

local function late(deadline_ns, now)
    return deadline_ns ~= nil and deadline_ns > 0 and now > deadline_ns
end

-- Assigns the next sequence of `subject` and stores the message in the same
-- transaction, so sequences are gap-free and in commit order. `deadline_ns`
-- (wall clock) is when the caller stops waiting: a request that arrives later
-- (held back by a reconnecting client, say) is refused rather than stored
-- behind the back of a publisher that was told it failed.
--
-- `options` is a map: with message_id and window_ms, a second publish of the
-- same id on the same subject within the window stores nothing and returns
-- the first one's sequence (the second return value says whether that
-- happened); `hot` is the hot tier's budget (see hot_budget). Schema 10
-- services pass {message_id, window_ms} instead.
rawset(_G, 'mts_publish', function(subject, headers, data, object_key, size, deadline_ns, sha256, options)
    local message_id, window_ms, hot = nil, 0, nil
    if options ~= nil and options[1] ~= nil then
        message_id, window_ms = options[1], options[2]
    elseif options ~= nil then
        message_id, window_ms, hot = options.message_id, options.window_ms or 0, options.hot
    end
    if late(deadline_ns, now_ns()) then
        box.error({reason = LATE_REASON, code = LATE})
    end
    if object_key ~= nil and box.space.mts_abandoned:get(object_key) ~= nil then
        box.error({reason = 'object ' .. object_key .. ' was abandoned; publish again', code = ABANDONED})
    end
    local budget = hot_budget(hot)
    local seq, duplicate
    box.atomic(function()
        local now = now_ns()
        local s = open_subject(subject)
        if budget ~= nil and hot_full(budget) and not seen_recently(s, message_id, now) then
            local refused = make_room(s, budget)
            if refused ~= nil then
                box.error({reason = refused, code = HOT_FULL})
            end
        end
        seq, duplicate = add_message(now, s, headers, data, object_key, size, sha256, message_id, window_ms)
        close_subject(s)
    end)
    if not duplicate then
        notify(subject)
    end
    return seq, duplicate
end)

local FENCED_REASON = 'this publish attempt was settled as not stored before it reached Tarantool;'
    .. ' nothing was stored'

-- The fields of each message mts_publish_batch takes, in this order.
local IN = {
    subject = 1, headers = 2, data = 3, size = 4, sha256 = 5, message_id = 6, window_ms = 7, deadline_ns = 8,
}

-- The fields of each block mts_publish_batch takes, in this order: a run of
-- inline messages without message ids to one subject, `batch` as a block
-- row keeps it, `deadline_ns` the earliest of theirs.
local BLOCK = {subject = 1, count = 2, bytes = 3, deadline_ns = 4, batch = 5}

-- The verdicts an attempt keeps: without refusal reasons, which would make
-- its row large, and rows of many large sizes strand memtx memory in
-- nearly empty slabs of their own.
local function kept_verdicts(results)
    local kept = setmetatable({}, ARRAY)
    for i, verdict in ipairs(results) do
        if verdict[3] ~= nil then
            kept[i] = {0, false, verdict[3]}
        else
            kept[i] = verdict
        end
    end
    return kept
end

-- Group commit: stores inline messages from many publishers in one
-- transaction, so one WAL write serves them all, and each subject's row is
-- written once. Each message is {subject, headers, data, size, sha256,
-- message_id ('' for none), window_ms, deadline_ns} and is handled as
-- mts_publish would; one that fails is left out and answered in its place.
-- Returns one {seq, duplicate} or {0, false, error_code, reason} per
-- message, in order; messages to the same subject get consecutive sequences
-- in that order.
--
-- `blocks` (optional, since schema 15) are runs of messages each stored
-- whole as one block row, or refused whole, after `messages`: each gets
-- one more verdict, {first seq, false} or {0, false, error_code, reason};
-- its messages have the sequences from the first on, in order. A subject
-- with a block in a call has no message in `messages`.
--
-- `attempt` (optional) names this call: its verdicts are kept under that
-- name in the same transaction, for mts_settle_attempt. An attempt already
-- settled as fenced stores nothing; one already committed answers its
-- verdicts again. `forget` lists earlier attempts whose answers arrived.
-- `hot` is the hot tier's budget (see hot_budget).
rawset(_G, 'mts_publish_batch', function(messages, attempt, forget, hot, blocks)
    local results = setmetatable({}, ARRAY)
    local subjects = {}
    if attempt == '' then
        attempt = nil
    end
    local replayed = false
    local budget = hot_budget(hot)
    box.atomic(function()
        local now = now_ns()
        local full = budget ~= nil and hot_full(budget)
        for _, id in ipairs(forget or {}) do
            box.space.mts_attempts:delete(id)
        end
        if attempt ~= nil then
            local seen = box.space.mts_attempts:get(attempt)
            if seen ~= nil then
                replayed = true
                if seen.fenced then
                    for i = 1, #messages + #(blocks or {}) do
                        results[i] = {0, false, FENCED, FENCED_REASON}
                    end
                else
                    results = seen.verdicts
                end
                return
            end
        end
        -- One message or block: its verdict; `add(s)` stores it in open
        -- subject `s` and returns its (first) sequence and whether it was
        -- a duplicate.
        local function verdict(subject, deadline_ns, message_id, count, add)
            if late(deadline_ns, now) then
                return {0, false, LATE, LATE_REASON}
            end
            local s = subjects[subject]
            if s == nil then
                s = open_subject(subject)
                subjects[subject] = s
            end
            if full and not seen_recently(s, message_id, now) then
                local refused = make_room(s, budget, count)
                if refused ~= nil then
                    return {0, false, HOT_FULL, refused}
                end
            end
            local ok, seq, duplicate = pcall(add, s)
            if not ok then
                return {0, false, error_code(seq), tostring(seq)}
            end
            return {seq, duplicate or false}
        end
        for i, m in ipairs(messages) do
            results[i] = verdict(m[IN.subject], m[IN.deadline_ns], m[IN.message_id], 1, function(s)
                return add_message(now, s, m[IN.headers], m[IN.data], nil, m[IN.size], m[IN.sha256],
                    m[IN.message_id], m[IN.window_ms])
            end)
        end
        for _, b in ipairs(blocks or {}) do
            results[#results + 1] = verdict(b[BLOCK.subject], b[BLOCK.deadline_ns], nil, b[BLOCK.count],
                function(s)
                    return add_block(now, s, b[BLOCK.count], b[BLOCK.bytes], b[BLOCK.batch])
                end)
        end
        for _, s in pairs(subjects) do
            close_subject(s)
        end
        if attempt ~= nil then
            box.space.mts_attempts:insert({attempt, now, false, kept_verdicts(results)})
        end
    end)
    if replayed then
        return results
    end
    for subject, s in pairs(subjects) do
        if s.count > 0 then
            notify(subject)
        end
    end
    return results
end)

-- The sequence a message id was stored under within its window, or 0: lets
-- a streamed publish skip uploading a payload it would throw away.
rawset(_G, 'mts_dedup_lookup', function(subject, message_id)
    local seen = box.space.mts_dedup:get({subject, message_id})
    if seen ~= nil and seen.expires_ns > now_ns() then
        return seen.seq
    end
    return 0
end)

-- One stored message (a hot tuple or a reference into its segment), or nil.
rawset(_G, 'mts_message', function(subject, seq)
    local message = locate(subject, seq)
    if message == nil then
        return box.NULL
    end
    return message
end)

rawset(_G, 'mts_last_seq', function(subject)
    return last_seq(subject)
end)

-- Waits up to `seconds` for a commit on `subject` (or any other wake-up).
-- A watcher names `due`, the lease end it sleeps until (U64_MAX: none), and
-- waits on a condition of the watchers' own, so that an earlier lease end
-- (lease_ends_at) wakes it and nobody else.
local function wait_commit(subject, seconds, due)
    local waiting = conds[subject]
    if waiting == nil then
        waiting = {cond = fiber.cond(), watchers = fiber.cond(), waiters = 0}
        conds[subject] = waiting
    end
    -- One made by an older version of this file has no watchers' condition.
    waiting.watchers = waiting.watchers or fiber.cond()
    waiting.waiters = waiting.waiters + 1
    local id = fiber.id()
    if due ~= nil then
        waiting.dues = waiting.dues or {}
        waiting.dues[id] = due
        waiting.watchers:wait(seconds)
    else
        waiting.cond:wait(seconds)
    end
    if due ~= nil then
        waiting.dues[id] = nil
    end
    waiting.waiters = waiting.waiters - 1
    if waiting.waiters == 0 and conds[subject] == waiting then
        conds[subject] = nil
    end
end

-- The earliest lease end (or nack delay) after `since` among the subject's
-- consumers, or nil.
local function next_lease_end(subject, since)
    local earliest = nil
    local deadlines = box.space.mts_pending.index.deadline
    for _, c in box.space.mts_consumers:pairs({subject}) do
        local p = deadlines:select({subject, c.durable, since}, {iterator = 'GT', limit = 1})[1]
        -- A message parked behind its key (U64_MAX) never falls due by time.
        if p ~= nil and p.subject == subject and p.durable == c.durable and p.deadline_ns ~= U64_MAX
            and (earliest == nil or p.deadline_ns < earliest) then
            earliest = p.deadline_ns
        end
    end
    return earliest
end

-- A watcher's wait (mts_wait with `seen`): returns when the last sequence
-- exceeds `after`, the release epoch differs from `seen.epoch`, a lease of
-- the subject ended after `seen.since_ns`, or `timeout` seconds pass.
-- Returns the last sequence, the epoch, whether a lease ended, and the time
-- up to which lease ends are accounted for (the next call's since_ns).
local function watch(subject, after, timeout, seen)
    local deadline = fiber.clock() + timeout
    local since = seen.since_ns or 0
    while true do
        local now = now_ns()
        local last = last_seq(subject)
        local epoch = releases[subject] or 0
        local due = next_lease_end(subject, since)
        local lapsed = due ~= nil and due <= now
        local remaining = deadline - fiber.clock()
        if last > after or epoch ~= seen.epoch or lapsed or remaining <= 0 then
            return last, epoch, lapsed, u64(now)
        end
        if due ~= nil then
            remaining = min(remaining, tonumber(due - now) / 1e9)
        end
        wait_commit(subject, remaining, due or U64_MAX)
    end
end

-- Blocks until the subject's last sequence exceeds `after` or `timeout`
-- seconds pass; returns the last sequence either way. With `seen` (a map of
-- epoch and since_ns; since schema 16), a watcher's wait: see `watch`.
rawset(_G, 'mts_wait', function(subject, after, timeout, seen)
    if seen ~= nil then
        return watch(subject, after, timeout, seen)
    end
    local deadline = fiber.clock() + timeout
    while true do
        local last = last_seq(subject)
        if last > after then
            return last
        end
        local remaining = deadline - fiber.clock()
        if remaining <= 0 then
            return last
        end
        wait_commit(subject, remaining)
    end
end)

------------------------------------------------------------------------------
-- Durable consumers. A consumer hands out messages under leases: a message is
-- delivered, then acknowledged, or its lease (ack_wait) runs out, or it is
-- nacked, and then it is delivered again with its delivery count increased.
-- At max_deliver deliveries it goes to the dead-letter subject instead.
-- `ack_seq` (the floor) and `delivered_seq` bound what is in flight: every
-- sequence <= floor is acked, every one in (floor, delivered] is acked or is
-- held by a run in mts_pending, every one > delivered was never handed out.
------------------------------------------------------------------------------

local CONSUMER_DEFAULTS = {
    ack_wait_ms = 30000,
    max_deliver = 5,
    max_ack_pending = 1000,
    deliver_policy = 'all',
}


-- A consumer row as a table with every setting filled in.
local function consumer_view(row)
    local dlq = row.dlq_subject
    if dlq == nil then
        dlq = row.subject .. '.dlq'
    end
    return {
        subject = row.subject,
        durable = row.durable,
        stored_floor = row.ack_seq,
        stored_delivered = row.delivered_seq,
        floor = row.ack_seq,
        created_ns = row.created_ns,
        delivered = row.delivered_seq or row.ack_seq,
        ack_wait_ms = row.ack_wait_ms or CONSUMER_DEFAULTS.ack_wait_ms,
        max_deliver = row.max_deliver or CONSUMER_DEFAULTS.max_deliver,
        max_ack_pending = row.max_ack_pending or CONSUMER_DEFAULTS.max_ack_pending,
        deliver_policy = row.deliver_policy or CONSUMER_DEFAULTS.deliver_policy,
        start_seq = row.start_seq or 0,
        start_time_ns = row.start_time_ns or 0,
        dlq_subject = dlq,
        inactive_threshold_ms = present(row.inactive_threshold_ms) or 0,
        active_ns = present(row.active_ns) or row.created_ns,
    }
end

-- How finely a consumer's last use is kept: a busy consumer writes it at
-- most once per this long.
local ACTIVE_GRAIN_MS = 10000

-- Inside a transaction: records that consumer `c` (a consumer_view) was
-- used at `now`.
local function touch(c, now)
    if older_than(c.active_ns, now, ACTIVE_GRAIN_MS) then
        pad_row(box.space.mts_consumers, {c.subject, c.durable})
        box.space.mts_consumers:update({c.subject, c.durable}, {{'=', 'active_ns', now}})
        c.active_ns = now
    end
end

-- Inside a transaction: as touch, for consumer `durable` of `subject` if it
-- exists.
local function touch_named(subject, durable)
    local row = box.space.mts_consumers:get({subject, durable})
    if row ~= nil then
        touch(consumer_view(row), now_ns())
    end
end

-- The sequence before the first hot message of `subject` committed at or
-- after `t` (the last sequence when none is): a binary search over the hot
-- rows, which run gap-free and were committed in sequence order.
local function hot_time_point(subject, t)
    local first = box.space.mts_messages:select({subject}, {iterator = 'EQ', limit = 1})[1]
    local last = box.space.mts_messages:select({subject}, {iterator = 'REQ', limit = 1})[1]
    if first == nil or last.ts_ns < t then
        return last_seq(subject)
    end
    local lo, hi = first.seq, row_last(last)
    while lo < hi do
        local mid = lo + math.floor(tonumber(hi - lo) / 2)
        local m = hot_at(subject, mid)
        if m == nil or m.ts_ns >= t then
            hi = mid
        else
            lo = mid + 1
        end
    end
    return lo - 1
end

-- The segment and block where the first message of `subject` committed at
-- or after `t` is, if it is in a segment: the last block that begins before
-- t (or the first block) of the first segment that ends at or after t.
local function time_block(subject, t)
    for _, seg in box.space.mts_segments.index.primary:pairs({subject}, {iterator = 'EQ'}) do
        if seg.last_ts_ns >= t then
            local blocks = seg.blocks
            local start = blocks[1]
            for i = 2, #blocks do
                if blocks[i][2] >= t then
                    break
                end
                start = blocks[i]
            end
            return seg, start
        end
    end
    return nil
end

-- Where the first message of `subject` committed at or after `t` is when it
-- lies in a segment: a reference to the first message of the block to read
-- (the message is in it, or is the first one after it); nil when the hot
-- tier answers exactly.
rawset(_G, 'mts_locate_time', function(subject, t)
    local seg, block = time_block(subject, t)
    if seg == nil then
        return box.NULL
    end
    return cold_ref(segment_view(seg), block[1])
end)

-- The segment that follows the one stored as object `key`, for a reader
-- reading ahead across segments: {object key, offset, length} of its first
-- block and the object's size; nil when there is none (yet), or `key` is no segment.
rawset(_G, 'mts_segment_next', function(key)
    local seg = box.space.mts_segments.index.object_key:get(key)
    if seg == nil then
        return box.NULL
    end
    local after = box.space.mts_segments.index.last:select(
        {seg.subject, seg.last_seq}, {iterator = 'GT', limit = 1})[1]
    if after == nil or after.subject ~= seg.subject then
        return box.NULL
    end
    local first = after.blocks[1]
    return setmetatable({after.object_key, first[3], first[4], after.object_size}, ARRAY)
end)

-- Where a new consumer starts: everything at or below it counts as acked.
local function start_point(subject, policy, start_seq, start_time_ns)
    if policy == 'new' then
        return last_seq(subject)
    elseif policy == 'by_start_sequence' then
        if start_seq == nil or start_seq == 0 then
            return 0
        end
        return start_seq - 1
    elseif policy == 'by_start_time' then
        local t = start_time_ns or 0
        -- In a segment, to its block (the service passes the exact point,
        -- start_after, having read the block: see mts_locate_time).
        local _, block = time_block(subject, t)
        if block ~= nil then
            return block[1] - 1
        end
        return hot_time_point(subject, t)
    end
    return 0
end

-- Creates the consumer with `cfg` (a map; missing settings take defaults)
-- unless it exists; returns its view.
local function ensure_consumer(subject, durable, cfg)
    local row = box.space.mts_consumers:get({subject, durable})
    if row ~= nil then
        return consumer_view(row)
    end
    cfg = cfg or {}
    local policy = cfg.deliver_policy or CONSUMER_DEFAULTS.deliver_policy
    -- start_after: the start point the service worked out (by_start_time in
    -- a segment).
    local start = cfg.start_after or start_point(subject, policy, cfg.start_seq, cfg.start_time_ns)
    local now = now_ns()
    row = box.space.mts_consumers:insert({
        subject, durable, start, now, start,
        cfg.ack_wait_ms or CONSUMER_DEFAULTS.ack_wait_ms,
        cfg.max_deliver or CONSUMER_DEFAULTS.max_deliver,
        cfg.max_ack_pending or CONSUMER_DEFAULTS.max_ack_pending,
        policy, cfg.start_seq or 0, cfg.start_time_ns or 0,
        cfg.dlq_subject or (subject .. '.dlq'), box.NULL, cfg.inactive_threshold_ms or 0, now,
    })
    return consumer_view(row)
end

-- Leases are kept in runs: one mts_pending row holds the consecutive
-- sequences handed out together, with one delivery count and deadline, and
-- `held` marks which of them are still held ('1') and which were acked or
-- went elsewhere ('0'); nil means all of them. A run starts and ends on a
-- held sequence and runs never overlap, so the run holding a sequence is
-- the last one starting at or before it. A lease costs a row per batch,
-- not per message; an ack rewrites the run's marks. Rows written before
-- runs (no last_seq) are runs of one.

local HELD, FREE = 49, 48 -- '1', '0'

local function run_last(p)
    return present(p.last_seq) or p.seq
end

local function run_marks(p)
    return present(p.held) or string.rep('1', run_last(p) - p.seq + 1)
end

local function run_count(p)
    return present(p.held_count) or (run_last(p) - p.seq + 1)
end

-- Whether run `p` still holds `seq` (within its range).
local function holds(p, seq)
    local held = present(p.held)
    return held == nil or held:byte(seq - p.seq + 1) == HELD
end

-- The attributes a run's held sequences share.
local function run_attrs(p)
    return {deliveries = p.deliveries, deadline_ns = p.deadline_ns, first_ns = p.first_delivered_ns}
end

-- Writes marks (a string, the first one for sequence `first`) as one run,
-- trimmed to its held ends; nothing when none is held. Returns how many are.
local function put_run(subject, durable, first, marks, attrs)
    local from = marks:find('1', 1, true)
    if from == nil then
        return 0
    end
    local to = marks:match('.*()1')
    marks = marks:sub(from, to)
    local count = #marks
    local held = box.NULL
    if marks:find('0', 1, true) ~= nil then
        count = select(2, marks:gsub('1', '1'))
        held = marks
    end
    box.space.mts_pending:replace({
        subject, durable, first + from - 1, attrs.deliveries, attrs.deadline_ns, attrs.first_ns,
        first + to - 1, held, count,
    })
    return count
end

-- The run holding `seq` for the consumer, or nil.
local function run_of(subject, durable, seq)
    local p = box.space.mts_pending.index.primary:select({subject, durable, seq}, {iterator = 'LE', limit = 1})[1]
    if p == nil or p.subject ~= subject or p.durable ~= durable
            or run_last(p) < seq or not holds(p, seq) then
        return nil
    end
    return p
end

-- Gone from a run: acked, dead-lettered or removed.
local GONE = {}

-- Rewrites run `p` after `fate` (sequence -> GONE, or the attributes that
-- sequence takes on) into runs of held sequences sharing attributes, in
-- order and not overlapping. Sequences without a fate keep the run's.
local function recut(p, fate)
    local subject, durable, first = p.subject, p.durable, p.seq
    local marks = run_marks(p)
    local old = run_attrs(p)
    box.space.mts_pending:delete({subject, durable, first})
    local start, attrs, piece = nil, nil, {}
    local function flush()
        if start ~= nil then
            put_run(subject, durable, start, table.concat(piece), attrs)
        end
        start, attrs, piece = nil, nil, {}
    end
    for i = 1, #marks do
        local seq = first + i - 1
        local mine = nil
        if marks:byte(i) == HELD then
            mine = fate[seq]
            if mine == nil then
                mine = old
            elseif mine == GONE then
                mine = nil
            end
        end
        if mine ~= nil and start ~= nil and mine ~= attrs then
            flush()
        end
        if mine ~= nil and start == nil then
            start, attrs = seq, mine
        end
        if start ~= nil then
            piece[#piece + 1] = mine ~= nil and '1' or '0'
        end
    end
    flush()
end

-- Drops `seqs` (sorted, all held by run `p`) from it.
local function drop_from_run(p, seqs)
    if #seqs == run_count(p) then
        box.space.mts_pending:delete({p.subject, p.durable, p.seq})
        return
    end
    local marks = run_marks(p)
    local n = #marks
    local buf = ffi.new('char[?]', n)
    ffi.copy(buf, marks, n)
    for _, seq in ipairs(seqs) do
        buf[seq - p.seq] = FREE
    end
    box.space.mts_pending:delete({p.subject, p.durable, p.seq})
    put_run(p.subject, p.durable, p.seq, ffi.string(buf, n), run_attrs(p))
end

-- Groups `seqs` by the run holding each. Returns a list of {run, sorted
-- seqs} and the sequences no run holds.
-- Ordering keys. A message published with one (its key in mts_keys) goes
-- to a consumer only once the consumer is done with the one before it of
-- the same key (acked, dead-lettered, rejected, or removed): until then it
-- waits in a parked run — deliveries 0, never due by time, held by nobody —
-- and mts_key_waits lists it behind that one. Messages of other keys, and
-- those without a key, pass it by.

-- Whether messages with ordering keys were ever published to `subject`.
local function keyed(subject)
    local row = box.space.mts_subjects:get(subject)
    return row ~= nil and row.keyed == true
end

-- Message `seq`'s ordering key, or nil.
local function key_of(subject, seq)
    local k = box.space.mts_keys:get({subject, seq})
    if k == nil then
        return nil
    end
    return k.key
end

-- Whether run `p` is a message parked behind its key, not handed out.
local function parked(p)
    return p.deliveries == 0
end

-- Inside a transaction: for each key of `keys` (a set), the consumer's next
-- message of that key, if parked, is due at once (deadline 0, so that a
-- look already under way takes it too). Returns whether one was.
local function promote(subject, durable, keys)
    local woke = false
    for key in pairs(keys) do
        local head = box.space.mts_key_waits:select({subject, durable, key}, {iterator = 'EQ', limit = 1})[1]
        if head ~= nil then
            local p = box.space.mts_pending:get({subject, durable, head.seq})
            if p ~= nil and parked(p) then
                box.space.mts_pending:update({subject, durable, head.seq}, {{'=', 'deadline_ns', 0}})
                woke = true
            end
        end
    end
    if woke then
        released(subject)
    end
    return woke
end

-- Inside a transaction: the consumer is done with `seqs` (on a keyed
-- subject): the keys they led go on with their next messages. Returns
-- whether one did.
local function keys_done(subject, durable, seqs)
    local waits, keys = box.space.mts_key_waits, {}
    for _, seq in ipairs(seqs) do
        local w = waits.index.seq:get({subject, durable, seq})
        if w ~= nil then
            waits:delete({subject, durable, w.key, seq})
            keys[w.key] = true
        end
    end
    return promote(subject, durable, keys)
end

-- As keys_done, for every message of the consumer up to `through`.
local function keys_done_through(subject, durable, through)
    local seqs = {}
    for _, w in box.space.mts_key_waits.index.seq:pairs({subject, durable}, {iterator = 'EQ'}) do
        if w.seq > through then
            break
        end
        seqs[#seqs + 1] = w.seq
    end
    keys_done(subject, durable, seqs)
end

-- Inside a transaction: forgets the consumer's keys (its leases are gone).
local function keys_dropped(subject, durable)
    local waits = box.space.mts_key_waits
    for _, w in ipairs(waits.index.seq:select({subject, durable}, {iterator = 'EQ'})) do
        waits:delete({subject, durable, w.key, w.seq})
    end
end

local function runs_holding(subject, durable, seqs)
    local sorted = {}
    for i, seq in ipairs(seqs) do
        sorted[i] = seq
    end
    table.sort(sorted)
    local groups, missing = {}, {}
    local current = nil
    local previous = nil
    for _, seq in ipairs(sorted) do
        if seq == previous then
            -- Named twice: held once.
            goto next
        end
        previous = seq
        if current ~= nil and seq <= run_last(current[1]) then
            if holds(current[1], seq) then
                table.insert(current[2], seq)
            else
                missing[#missing + 1] = seq
            end
        else
            local p = run_of(subject, durable, seq)
            if p == nil or parked(p) then
                missing[#missing + 1] = seq
            else
                current = {p, {seq}}
                groups[#groups + 1] = current
            end
        end
        ::next::
    end
    return groups, missing
end

-- Moves the floor up to just below the lowest held sequence (or to
-- `delivered` when nothing is held), and stores `delivered`.
local function settle_floor(c)
    local lowest = box.space.mts_pending.index.primary:select(
        {c.subject, c.durable}, {iterator = 'GE', limit = 1})[1]
    local floor = c.delivered
    if lowest ~= nil and lowest.subject == c.subject and lowest.durable == c.durable then
        floor = lowest.seq - 1
    end
    floor = max(floor, c.floor)
    if floor ~= c.stored_floor or c.delivered ~= c.stored_delivered then
        box.space.mts_consumers:update({c.subject, c.durable}, {
            {'=', 'ack_seq', floor}, {'=', 'delivered_seq', c.delivered},
        })
        c.stored_floor, c.stored_delivered = floor, c.delivered
    end
    c.floor = floor
end

-- Calls visit(run) for each of the consumer's runs, in sequence order,
-- until visit returns false.
local function each_run(subject, durable, visit)
    for _, p in box.space.mts_pending.index.primary:pairs({subject, durable}, {iterator = 'GE'}) do
        if p.subject ~= subject or p.durable ~= durable or visit(p) == false then
            break
        end
    end
end

-- How many messages the consumer holds.
-- (By lease deadline: runs parked behind their keys, never due by time,
-- come last, and are not visited.)
local function pending_count(c)
    local held = 0
    for _, p in box.space.mts_pending.index.deadline:pairs({c.subject, c.durable}, {iterator = 'GE'}) do
        if p.subject ~= c.subject or p.durable ~= c.durable or p.deadline_ns == U64_MAX then
            break
        end
        if not parked(p) then
            held = held + run_count(p)
        end
    end
    return held
end

-- How many of the consumer's messages wait parked behind their keys (at
-- most KEYED_WINDOW).
local function parked_count(c)
    local n = 0
    if keyed(c.subject) then
        for _, p in box.space.mts_pending.index.deadline:pairs({c.subject, c.durable}, {iterator = 'LE'}) do
            if p.subject ~= c.subject or p.durable ~= c.durable or not parked(p) then
                break
            end
            n = n + 1
        end
    end
    return n
end

-- Inside a transaction: publishes a copy of `message` to the consumer's
-- dead-letter subject (sharing its object, never copying it), with the
-- headers `extra` too. Returns the dead-letter subject to notify, or nil.
-- The caller drops the lease.
local function dead_letter(c, message, deliveries, extra)
    if c.dlq_subject == '' then
        return nil
    end
    local headers = {}
    for k, v in pairs(message.headers) do
        headers[k] = v
    end
    for k, v in pairs(extra or {}) do
        headers[k] = v
    end
    headers['mts-origin-subject'] = c.subject
    headers['mts-origin-sequence'] = decimal(message.seq)
    headers['mts-origin-durable'] = c.durable
    headers['mts-origin-delivery-count'] = decimal(deliveries)
    store_message(c.dlq_subject, headers, message.data, message.object_key, message.size, message.sha256)
    return c.dlq_subject
end

-- The held sequences of run `p`, in order.
local function held_seqs(p)
    local out = {}
    for seq = p.seq, run_last(p) do
        if holds(p, seq) then
            out[#out + 1] = seq
        end
    end
    return out
end

-- Marks for the sorted, disjoint spans `spans` ({first, last} each), with
-- `count` sequences in all: nil when they run without a gap.
local function marks_of_spans(spans, count)
    local first, last = spans[1][1], spans[#spans][2]
    local n = last - first + 1
    if n == count then
        return nil
    end
    local buf = ffi.new('char[?]', n)
    ffi.fill(buf, n, FREE)
    for _, span in ipairs(spans) do
        ffi.fill(buf + (span[1] - first), span[2] - span[1] + 1, HELD)
    end
    return ffi.string(buf, n)
end

-- Messages of a keyed subject one look passes over at most, parked or
-- handed out: one transaction stays short however long a key's backlog.
local KEYED_SCAN = 1024
-- How far past its ack floor a consumer of a keyed subject takes messages
-- on: messages parked behind their keys stay within this window, so that a
-- key stuck at one message costs at most this many rows.
local KEYED_WINDOW = 10000

-- Inside a transaction: hand_out's new messages on a subject with ordering
-- keys (consumer `c`, up to `room`, appended to `out`), one by one: a
-- message whose key the consumer is still at waits behind it, parked; the
-- rest go out, each becoming the one its key waits for. Returns whether it
-- stopped at KEYED_SCAN with room left: a look again at once goes on.
local function hand_out_keyed(c, room, lease_end, now, out)
    local subject, durable = c.subject, c.durable
    local waits, pending = box.space.mts_key_waits, box.space.mts_pending
    local runs, scanned, more = {}, 0, false
    local horizon = c.floor + KEYED_WINDOW
    each_span_after(subject, c.delivered, false, function(first, last, message)
        for seq = first, last do
            if seq > horizon then
                -- Only acks move the window on: theirs must wake the streams.
                mark_starved(subject, durable)
                return false
            end
            local ref = message
            if seq ~= first then
                ref = setmetatable(table.copy(message), ARRAY)
                ref[2] = seq
            end
            local key = key_of(subject, seq)
            if key ~= nil and waits:select({subject, durable, key}, {iterator = 'EQ', limit = 1})[1] ~= nil then
                waits:insert({subject, durable, key, seq})
                pending:insert({subject, durable, seq, 0, U64_MAX, 0, seq, box.NULL, 1})
            else
                if key ~= nil then
                    waits:insert({subject, durable, key, seq})
                end
                out[#out + 1] = {ref, 1, lease_end}
                local run = runs[#runs]
                if run ~= nil and run[2] + 1 == seq then
                    run[2] = seq
                else
                    runs[#runs + 1] = {seq, seq}
                end
                room = room - 1
            end
            c.delivered = seq
            scanned = scanned + 1
            if room == 0 then
                return false
            end
            if scanned >= KEYED_SCAN then
                more = true
                return false
            end
        end
        return true
    end)
    for _, run in ipairs(runs) do
        pending:insert({subject, durable, run[1], 1, lease_end, now, run[2], box.NULL, run[2] - run[1] + 1})
    end
    return more
end

-- Inside a transaction: hands out up to `limit` messages to the consumer:
-- first those whose lease ran out or whose nack delay passed (dead-lettering
-- any that reached max_deliver), then new ones, never more than
-- max_ack_pending leased. Returns a list of {message tuple, delivery count,
-- lease deadline[, last sequence of a span of a segment's block]}, the earliest deadline still ahead (0 if none): when
-- redeliveries can next be due, the dead-letter subjects to notify, and
-- whether the consumer holds max_ack_pending (only acks make room then).
local function hand_out(subject, durable, limit, spans)
    local out = {}
    local notify_subjects = {}
    local next_deadline = 0
    local c = ensure_consumer(subject, durable)
    local now = now_ns()
    touch(c, now)
    local lease_end = after_ms(now, c.ack_wait_ms)
    local has_keys = keyed(subject)
    local lettered = 0
    -- Segment messages left to the service to dead-letter: still due, so
    -- a second pass must not answer them twice.
    local left_to_service = {}
    -- A second pass takes messages whose keys' turn came in the first.
    for _ = 1, 2 do
        next_deadline = 0
        local due, due_count = {}, 0
        for _, p in box.space.mts_pending.index.deadline:pairs({subject, durable}, {iterator = 'GE'}) do
            if p.subject ~= subject or p.durable ~= durable then
                break
            end
            local deadline_ns = p.deadline_ns
            if deadline_ns > now then
                -- Parked messages (never due by time) set no deadline.
                if deadline_ns ~= U64_MAX then
                    next_deadline = deadline_ns
                end
                break
            end
            if due_count >= limit then
                break
            end
            due[#due + 1] = p
            due_count = due_count + run_count(p)
        end
        local finished = {}
        for _, p in ipairs(due) do
            local deliveries = p.deliveries
            local dead = c.max_deliver > 0 and deliveries >= c.max_deliver
            -- A parked message, due now that its key's turn came, goes out the
            -- first time.
            local first_ns = parked(p) and now or p.first_delivered_ns
            local again = {deliveries = deliveries + 1, deadline_ns = lease_end, first_ns = first_ns}
            local fate, changed = {}, false
            for _, seq in ipairs(held_seqs(p)) do
                -- Dead letters count: each is a publish in this transaction.
                if #out + lettered >= limit then
                    break
                end
                local message = locate(subject, seq)
                if message == nil then
                    -- Removed by retention while pending: nothing left to deliver.
                    fate[seq], changed = GONE, true
                    finished[#finished + 1] = seq
                elseif dead and message[9] ~= nil then
                    -- In a segment: the service reads it and dead-letters it with
                    -- mts_dead_letter. A lease deadline of 0 says so.
                    if not left_to_service[seq] then
                        left_to_service[seq] = true
                        out[#out + 1] = {message, deliveries, 0}
                    end
                elseif dead then
                    local dlq = dead_letter(c, message, deliveries)
                    if dlq ~= nil then
                        notify_subjects[#notify_subjects + 1] = dlq
                    end
                    lettered = lettered + 1
                    fate[seq], changed = GONE, true
                    finished[#finished + 1] = seq
                else
                    out[#out + 1] = {message, deliveries + 1, lease_end}
                    fate[seq], changed = again, true
                end
            end
            if changed then
                recut(p, fate)
            end
        end
        if not (has_keys and #finished > 0 and keys_done(subject, durable, finished)) then
            break
        end
        if #out + lettered >= limit then
            -- A key's next message is due and this look is full: the caller
            -- looks again at once.
            next_deadline = now
            break
        end
    end
    local room = limit - #out
    local full = false
    if c.max_ack_pending > 0 then
        local free = c.max_ack_pending - pending_count(c)
        full = free <= 0
        if free < room then
            -- Only acks make room now: theirs must wake this consumer's streams.
            mark_starved(subject, durable)
        end
        room = min(room, free)
    end
    local more = false
    if room > 0 and has_keys then
        more = hand_out_keyed(c, room, lease_end, now, out)
    elseif room > 0 then
        -- For a caller that takes spans, a block's messages in a segment go
        -- out as one entry: its first message's reference (naming the
        -- object's size) and, fourth, the last sequence it stands for; for
        -- others, a reference each, as before spans.
        local taken, count = {}, 0
        each_span_after(subject, c.delivered, spans, function(first, last, message)
            last = min(last, first + room - 1)
            if last == first then
                out[#out + 1] = {message, 1, lease_end}
            elseif spans then
                out[#out + 1] = {message, 1, lease_end, last}
            else
                for seq = first, last do
                    local ref = table.copy(message)
                    ref[2] = seq
                    out[#out + 1] = {setmetatable(ref, ARRAY), 1, lease_end}
                end
            end
            -- Hot messages come one at a time: each joins the span before it
            -- when it follows on, rather than costing a table of its own.
            local previous = taken[#taken]
            if previous ~= nil and previous[2] + 1 == first then
                previous[2] = last
            else
                taken[#taken + 1] = {first, last}
            end
            count = count + (last - first + 1)
            room = room - (last - first + 1)
            return room > 0
        end)
        if count > 0 then
            local first, last = taken[1][1], taken[#taken][2]
            box.space.mts_pending:insert({
                subject, durable, first, 1, lease_end, now, last, marks_of_spans(taken, count) or box.NULL, count,
            })
            c.delivered = last
        end
    end
    if #out > 0 then
        if next_deadline == 0 or next_deadline > lease_end then
            next_deadline = lease_end
        end
        lease_ends_at(subject, lease_end)
    end
    settle_floor(c)
    return out, next_deadline, notify_subjects, full, more
end

-- Dead-letters a message that hand_out answered with a lease deadline of 0
-- (it lives in a segment, which only the service can read): if the consumer
-- still holds it due after `deliveries` deliveries, drops the lease and
-- publishes `message` ({headers, data, object_key, size, sha256}, read from
-- the segment) to the dead-letter subject. Returns whether it did.
rawset(_G, 'mts_dead_letter', function(subject, durable, seq, deliveries, message)
    local dlq, done = nil, false
    box.atomic(function()
        local p = run_of(subject, durable, seq)
        local row = box.space.mts_consumers:get({subject, durable})
        if p == nil or row == nil or p.deliveries ~= deliveries or p.deadline_ns > now_ns() then
            return
        end
        local c = consumer_view(row)
        dlq = dead_letter(c, {
            seq = seq, headers = message.headers or {}, data = message.data, object_key = message.object_key,
            size = message.size, sha256 = message.sha256,
        }, deliveries)
        drop_from_run(p, {seq})
        if keyed(subject) then
            keys_done(subject, durable, {seq})
        end
        settle_floor(c)
        room_freed(subject, durable)
        done = true
    end)
    if dlq ~= nil then
        notify(dlq)
    end
    return done
end)

-- Leases in one transaction, so competing fetchers get disjoint messages.
-- Returns what `hand_out` hands out and when redeliveries can next be due.
-- Looks past more of a keyed subject's backlog than one transaction takes
-- (see KEYED_SCAN) when nothing was found yet: at most this many times.
local KEYED_LOOKS = 16

rawset(_G, 'mts_fetch', function(subject, durable, limit, spans)
    local out, next_deadline, notify_subjects, more
    for _ = 1, KEYED_LOOKS do
        box.atomic(function()
            out, next_deadline, notify_subjects, _, more = hand_out(subject, durable, limit, spans)
        end)
        for _, dlq in ipairs(notify_subjects) do
            notify(dlq)
        end
        if #out > 0 or not more then
            break
        end
    end
    return out, next_deadline
end)

-- Inside a transaction: the sequences of `seqs` that the consumer does not
-- hold; when there are none, or `tolerant`, the others are acknowledged
-- (not yet settled).
local function ack_held(subject, durable, seqs, tolerant)
    if #seqs == 0 then
        return {}
    end
    if box.space.mts_consumers:get({subject, durable}) == nil then
        return seqs
    end
    local groups, missing = runs_holding(subject, durable, seqs)
    if #missing == 0 or tolerant then
        for _, group in ipairs(groups) do
            drop_from_run(group[1], group[2])
        end
        if #groups > 0 then
            room_freed(subject, durable)
            if keyed(subject) then
                local acked = {}
                for _, group in ipairs(groups) do
                    for _, seq in ipairs(group[2]) do
                        acked[#acked + 1] = seq
                    end
                end
                keys_done(subject, durable, acked)
            end
        end
    end
    return missing
end

-- A consume stream's acks and its next lease in one transaction and one WAL
-- write: acks ride along instead of costing a call of their own. The acks
-- apply first (all held, or nothing happens), so the room they free counts.
-- With nothing to hand out, waits up to `wait_ms` for a commit (or for a
-- lease or nack delay to run out) and looks again: a busy stream's next
-- messages come back on the same call, without a separate wake-up.
-- Returns 'ok', the leased list and the next deadline (as mts_fetch) and
-- an empty list, or 'not_held', nothing leased, 0 and the sequences not held.
-- `tolerant` (since schema 15): acks the consumer does not hold are left
-- out, the rest apply, and the answer is 'ok' with those left out last.
local function consume(subject, durable, acks, limit, wait_ms, spans, tolerant)
    local missing, out, next_deadline, notify_subjects, full, more
    box.atomic(function()
        missing = ack_held(subject, durable, acks, tolerant)
        if #missing == 0 or tolerant then
            out, next_deadline, notify_subjects, full, more = hand_out(subject, durable, limit, spans)
        end
    end)
    if #missing > 0 and not tolerant then
        return 'not_held', {}, 0, missing
    end
    local deadline = fiber.clock() + (wait_ms or 0) / 1000
    local looks = 1
    -- At max_ack_pending no commit makes room: only acks, which come on
    -- calls of their own, so there is nothing to wait for here.
    while #out == 0 and not full do
        -- A keyed backlog longer than one look: look on at once (a few
        -- times), not after a commit.
        local again = more and looks < KEYED_LOOKS
        if not again then
            local remaining = deadline - fiber.clock()
            if next_deadline > 0 then
                -- A deadline already passed must not wrap around into a long wait.
                local now = now_ns()
                local until_due = 0
                if next_deadline > now then
                    until_due = tonumber(next_deadline - now) / 1e9
                end
                remaining = min(remaining, until_due)
            end
            if remaining <= 0 then
                break
            end
            wait_commit(subject, remaining)
        end
        looks = looks + 1
        local lettered
        box.atomic(function()
            out, next_deadline, lettered, full, more = hand_out(subject, durable, limit, spans)
        end)
        for _, dlq in ipairs(lettered) do
            notify_subjects[#notify_subjects + 1] = dlq
        end
    end
    for _, dlq in ipairs(notify_subjects) do
        notify(dlq)
    end
    return 'ok', out, next_deadline, setmetatable(missing, ARRAY)
end

-- The Consume RPC's procedure.
rawset(_G, 'mts_consume', function(subject, durable, acks, limit, wait_ms, spans, tolerant)
    return consume(subject, durable, acks, limit, wait_ms, spans, tolerant)
end)

-- Per-message acks: every sequence must be pending for this consumer, or
-- nothing is acked. Returns 'ok' and the new floor, or 'not_held' and the
-- sequences that are not pending.
rawset(_G, 'mts_ack_sequences', function(subject, durable, seqs)
    local missing
    local floor = 0
    box.atomic(function()
        missing = ack_held(subject, durable, seqs)
        if #missing > 0 then
            return
        end
        local c = consumer_view(box.space.mts_consumers:get({subject, durable}))
        settle_floor(c)
        touch(c, now_ns())
        floor = c.floor
    end)
    if #missing > 0 then
        return 'not_held', missing
    end
    return 'ok', floor
end)

-- Gives `seqs` (sorted, held by run `p`) the attributes `attrs`.
local function retime(p, seqs, attrs)
    if #seqs == run_count(p) then
        box.space.mts_pending:update({p.subject, p.durable, p.seq}, {{'=', 'deadline_ns', attrs.deadline_ns}})
        return
    end
    local fate = {}
    for _, seq in ipairs(seqs) do
        fate[seq] = attrs
    end
    recut(p, fate)
end

-- Nacks: every sequence must be pending; each becomes deliverable again
-- after `delay_ms`. Returns 'ok' or 'not_held' and the missing sequences.
-- Inside a transaction: moves the deadline of held `seqs` to `at`, their
-- delivery counts kept. Returns the sequences the consumer does not hold
-- (then nothing changes).
local function retime_held(subject, durable, seqs, at)
    local groups, missing = runs_holding(subject, durable, seqs)
    if #missing > 0 then
        return missing
    end
    for _, group in ipairs(groups) do
        local p = group[1]
        retime(p, group[2], {deliveries = p.deliveries, deadline_ns = at, first_ns = p.first_delivered_ns})
    end
    return missing
end

rawset(_G, 'mts_nack', function(subject, durable, seqs, delay_ms)
    local missing = {}
    box.atomic(function()
        missing = retime_held(subject, durable, seqs, after_ms(now_ns(), delay_ms))
        touch_named(subject, durable)
    end)
    if #missing > 0 then
        return 'not_held', missing
    end
    -- Due now, or (with a delay) earlier than the leases watchers wait for.
    released(subject)
    return 'ok', {}
end)

-- Lease extension, for a worker still at its messages: the leases of held
-- `seqs` now run out `extend_ms` from now (0: the consumer's ack_wait),
-- sooner or later than they did; delivery counts stay. Returns 'ok' and
-- the new deadline (ns), or 'not_held' and the sequences the consumer does
-- not hold (then nothing changes).
rawset(_G, 'mts_extend_lease', function(subject, durable, seqs, extend_ms)
    local missing, at = {}, 0
    box.atomic(function()
        local row = box.space.mts_consumers:get({subject, durable})
        if row == nil then
            missing = seqs
            return
        end
        if extend_ms == nil or extend_ms == 0 then
            extend_ms = consumer_view(row).ack_wait_ms
        end
        at = after_ms(now_ns(), extend_ms)
        missing = retime_held(subject, durable, seqs, at)
        -- A worker extending a lease is using its consumer.
        touch(consumer_view(row), now_ns())
    end)
    if #missing > 0 then
        return 'not_held', missing
    end
    lease_ends_at(subject, at)
    return 'ok', at
end)

-- Terminal rejection: held `seqs` are given up for good. Each goes to the
-- consumer's dead-letter subject now, with the header mts-reject-reason, or
-- is dropped when the consumer has none; it then counts as acked, and in the
-- consumer's `rejected`. One that lives in a segment (which only the service
-- reads) stays held and is returned, for the service to reject again with
-- `copies`: its {headers, data, object_key, size, sha256}, one per sequence
-- in `seqs`' order. Returns 'ok', the ack floor and the sequences left to
-- the service; or 'not_held' and the sequences the consumer does not hold
-- (then nothing changes).
rawset(_G, 'mts_reject', function(subject, durable, seqs, reason, copies)
    local missing, left, floor, dlq = {}, setmetatable({}, ARRAY), 0, nil
    box.atomic(function()
        local row = box.space.mts_consumers:get({subject, durable})
        if row == nil then
            missing = seqs
            return
        end
        local groups
        groups, missing = runs_holding(subject, durable, seqs)
        if #missing > 0 then
            return
        end
        local c = consumer_view(row)
        touch(c, now_ns())
        local copy_of = {}
        for i, seq in ipairs(seqs) do
            local copy = copies ~= nil and copies[i] or nil
            if copy ~= nil then
                copy_of[seq] = {
                    seq = seq, headers = copy.headers or {}, data = copy.data, object_key = copy.object_key,
                    size = copy.size, sha256 = copy.sha256,
                }
            end
        end
        local rejected = 0
        for _, group in ipairs(groups) do
            local p, done = group[1], {}
            for _, seq in ipairs(group[2]) do
                local message = copy_of[seq]
                if message == nil and c.dlq_subject ~= '' then
                    message = locate(subject, seq)
                end
                if message ~= nil and message[9] ~= nil then
                    left[#left + 1] = seq
                else
                    -- Gone already (retention) or nowhere to go: dropped.
                    if message ~= nil then
                        dlq = dead_letter(c, message, p.deliveries, {['mts-reject-reason'] = reason}) or dlq
                    end
                    done[#done + 1] = seq
                end
            end
            if #done > 0 then
                drop_from_run(p, done)
                rejected = rejected + #done
                if keyed(subject) then
                    keys_done(subject, durable, done)
                end
            end
        end
        if rejected > 0 then
            local counted = pad_row(box.space.mts_consumers, {subject, durable})
            box.space.mts_consumers:update({subject, durable}, {{'=', 'rejected', (counted.rejected or 0) + rejected}})
            room_freed(subject, durable)
        end
        settle_floor(c)
        floor = c.floor
    end)
    if #missing > 0 then
        return 'not_held', missing, left
    end
    if dlq ~= nil then
        notify(dlq)
    end
    return 'ok', floor, left
end)

-- Inside a transaction: consumer `c` is done with every message up to
-- `through`, delivered, waiting or not: its leases of them go, and its
-- floor and delivery point move past them (never back). Returns whether it
-- held any of them.
local function ack_through(c, through)
    local runs = {}
    each_run(c.subject, c.durable, function(p)
        if p.seq > through then
            return false
        end
        runs[#runs + 1] = p
    end)
    for _, p in ipairs(runs) do
        if run_last(p) <= through then
            box.space.mts_pending:delete({c.subject, c.durable, p.seq})
        else
            local fate = {}
            for seq = p.seq, through do
                fate[seq] = GONE
            end
            recut(p, fate)
        end
    end
    c.delivered = max(c.delivered, through)
    c.floor = max(c.floor, through)
    settle_floor(c)
    return #runs > 0
end

-- The original cumulative ack: acknowledges every message <= seq, delivered
-- or not (an old client may ack ahead to skip), and never moves back.
-- Returns 'ok' and the floor, or 'beyond_last' and the last sequence.
rawset(_G, 'mts_ack_message', function(subject, durable, seq)
    local last = last_seq(subject)
    if seq > last then
        return 'beyond_last', last
    end
    local floor
    box.atomic(function()
        local c = ensure_consumer(subject, durable)
        touch(c, now_ns())
        local dropped = ack_through(c, seq)
        floor = c.floor
        if dropped then
            room_freed(subject, durable)
            if keyed(subject) then
                keys_done_through(subject, durable, seq)
            end
        end
    end)
    return 'ok', floor
end)

-- Gives back leases early (a consume stream that ended): the messages are
-- deliverable again at once, with their delivery count kept. Sequences not
-- held are passed over.
rawset(_G, 'mts_release', function(subject, durable, seqs)
    local now = now_ns()
    box.atomic(function()
        local groups = runs_holding(subject, durable, seqs)
        for _, group in ipairs(groups) do
            local p = group[1]
            retime(p, group[2], {deliveries = p.deliveries, deadline_ns = now, first_ns = p.first_delivered_ns})
        end
    end)
    released(subject)
    return true
end)

-- Registers a subscription: creates the durable on first use (a new durable
-- starts at start_seq - 1 when given) and returns the point after which the
-- subscriber has not been told of messages, and the subject's last sequence.
rawset(_G, 'mts_subscribe', function(subject, durable, start_seq)
    local from = 0
    if start_seq > 0 then
        from = start_seq - 1
    end
    local c
    box.atomic(function()
        local cfg = nil
        if start_seq > 0 then
            cfg = {deliver_policy = 'by_start_sequence', start_seq = start_seq}
        end
        c = ensure_consumer(subject, durable, cfg)
    end)
    return max(c.floor, from), last_seq(subject)
end)

-- Creates a consumer, or updates the settings of an existing one (the deliver
-- policy and start point apply at creation only). Returns 'created' or
-- 'updated'.
rawset(_G, 'mts_create_or_update_consumer', function(subject, durable, cfg)
    local outcome = 'updated'
    box.atomic(function()
        local row = box.space.mts_consumers:get({subject, durable})
        if row == nil then
            ensure_consumer(subject, durable, cfg)
            outcome = 'created'
            return
        end
        local ops = {{'=', 'active_ns', now_ns()}}
        for _, field in ipairs({
            'ack_wait_ms', 'max_deliver', 'max_ack_pending', 'dlq_subject', 'inactive_threshold_ms',
        }) do
            if cfg[field] ~= nil then
                ops[#ops + 1] = {'=', field, cfg[field]}
            end
        end
        -- Rows from schema 1 lack the trailing fields; fill them first.
        local view = consumer_view(row)
        box.space.mts_consumers:update({subject, durable}, {
            {'=', 'delivered_seq', view.delivered}, {'=', 'ack_wait_ms', view.ack_wait_ms},
            {'=', 'max_deliver', view.max_deliver}, {'=', 'max_ack_pending', view.max_ack_pending},
            {'=', 'deliver_policy', view.deliver_policy}, {'=', 'start_seq', view.start_seq},
            {'=', 'start_time_ns', view.start_time_ns}, {'=', 'dlq_subject', view.dlq_subject},
        })
        pad_row(box.space.mts_consumers, {subject, durable})
        box.space.mts_consumers:update({subject, durable}, ops)
    end)
    if outcome == 'updated' then
        -- A larger max_ack_pending, say, may give its streams room.
        released(subject)
    end
    return outcome
end)

-- Messages published and never delivered to consumer `c`, and the age in ns
-- of its oldest unacknowledged message (0 if none). Messages after the
-- first one still stored are contiguous: retention only removes the oldest.
local function backlog(c, last, now)
    local pending, age_ns = 0, 0
    local next_new = first_after(c.subject, c.delivered)
    if next_new ~= nil then
        pending = last - next_new + 1
    end
    local _, oldest_ts = first_after(c.subject, c.floor)
    if oldest_ts ~= nil and now > oldest_ts then
        age_ns = now - oldest_ts
    end
    return pending, age_ns
end

-- The consumer's settings and state, exact at one instant; nil if it does
-- not exist.
local function consumer_info(row)
    local subject, durable = row.subject, row.durable
    local c = consumer_view(row)
    local now = now_ns()
    local last = last_seq(subject)
    local ack_pending, redelivered, waiting = 0, 0, 0
    each_run(subject, durable, function(p)
        local held = run_count(p)
        if parked(p) then
            waiting = waiting + held
        else
            ack_pending = ack_pending + held
        end
        if p.deliveries > 1 then
            redelivered = redelivered + held
        end
    end)
    local num_pending, oldest_unacked_age_ns = backlog(c, last, now)
    -- Parked behind their keys: never delivered yet.
    num_pending = num_pending + waiting
    return {
        subject = subject,
        durable = durable,
        created_ns = c.created_ns,
        ack_wait_ms = c.ack_wait_ms,
        max_deliver = c.max_deliver,
        max_ack_pending = c.max_ack_pending,
        deliver_policy = c.deliver_policy,
        start_seq = c.start_seq,
        start_time_ns = c.start_time_ns,
        dlq_subject = c.dlq_subject,
        ack_floor = c.floor,
        last_delivered = c.delivered,
        num_pending = num_pending,
        num_ack_pending = ack_pending,
        num_redelivered = redelivered,
        num_rejected = row.rejected or 0,
        oldest_unacked_age_ns = oldest_unacked_age_ns,
        last_seq = last,
        inactive_threshold_ms = c.inactive_threshold_ms,
        active_ns = c.active_ns,
    }
end

rawset(_G, 'mts_consumer_info', function(subject, durable)
    local row = box.space.mts_consumers:get({subject, durable})
    if row == nil then
        return box.NULL
    end
    return consumer_info(row)
end)

-- Lag of up to `limit` consumers after (`after_subject`, `after_durable`)
-- in (subject, durable) order (from the first without them), for gauges:
-- {subject, durable, pending (never delivered), ack_pending (delivered, not
-- acked), oldest unacked age in ms}.
rawset(_G, 'mts_consumers_lag', function(limit, after_subject, after_durable)
    local out = {}
    local now = now_ns()
    for _, row in box.space.mts_consumers:pairs({after_subject or '', after_durable or ''}, {iterator = 'GT'}) do
        if #out >= limit then
            break
        end
        local c = consumer_view(row)
        local last = last_seq(c.subject)
        local pending, age_ns = backlog(c, last, now)
        out[#out + 1] = {
            c.subject, c.durable, pending + parked_count(c), pending_count(c), tonumber(age_ns / 1000000),
        }
    end
    return out
end)

-- Deletes a consumer and its leases. Returns whether it existed.
-- Inside a transaction: drops every lease of the consumer.
local function drop_leases(subject, durable)
    local seqs = {}
    each_run(subject, durable, function(p)
        seqs[#seqs + 1] = p.seq
    end)
    for _, seq in ipairs(seqs) do
        box.space.mts_pending:delete({subject, durable, seq})
    end
    keys_dropped(subject, durable)
end

rawset(_G, 'mts_delete_consumer', function(subject, durable)
    local existed = false
    box.atomic(function()
        existed = box.space.mts_consumers:delete({subject, durable}) ~= nil
        drop_leases(subject, durable)
    end)
    return existed
end)

-- Moves an existing consumer to a new start: every lease it holds is
-- dropped, and delivery goes on from the first stored message after
-- `to.after`, or (without it) from the first committed at or after
-- `to.time_ns` (see start_point), as for a new consumer; later messages are
-- delivered anew, earlier ones never again. Returns the new ack floor, or
-- nil when the consumer does not exist.
rawset(_G, 'mts_seek', function(subject, durable, to)
    local floor, moved = box.NULL, false
    box.atomic(function()
        if box.space.mts_consumers:get({subject, durable}) == nil then
            return
        end
        moved = true
        floor = to.after or start_point(subject, 'by_start_time', nil, to.time_ns)
        drop_leases(subject, durable)
        box.space.mts_consumers:update({subject, durable}, {{'=', 'ack_seq', floor}, {'=', 'delivered_seq', floor}})
    end)
    if moved then
        released(subject)
    end
    return floor
end)

------------------------------------------------------------------------------
-- Retention: per-subject limits on age, count and bytes, enforced from the
-- oldest message forward in bounded steps.
------------------------------------------------------------------------------


-- Sets a subject's limits (a map of max_age_ms, max_messages, max_bytes; 0 =
-- unlimited) and discard policy ('new' or 'old'), creating the subject row if
-- it has never been published to.
rawset(_G, 'mts_set_subject_limits', function(subject, limits)
    box.atomic(function()
        if box.space.mts_subjects:get(subject) == nil then
            box.space.mts_subjects:insert({subject, 0, 0, 0})
        end
        local ops = {}
        for _, field in ipairs({'max_age_ms', 'max_messages', 'max_bytes', 'discard'}) do
            if limits[field] ~= nil then
                ops[#ops + 1] = {'=', field, limits[field]}
            end
        end
        if #ops > 0 then
            pad_subject(subject)
            box.space.mts_subjects:update({subject}, ops)
        end
    end)
    return true
end)

-- What is stored for a subject, and its limits (nil = the service default).
-- How many consumers `subject` has.
local function consumer_count(subject)
    return box.space.mts_consumers.index.primary:count({subject})
end

local function subject_info(subject)
    local row = box.space.mts_subjects:get(subject)
    if row == nil then
        return {subject = subject, first_seq = 0, last_seq = 0, count = 0, bytes = 0, consumers = consumer_count(subject)}
    end
    local first = first_after(subject, 0)
    return {
        subject = subject,
        first_seq = first or 0,
        last_seq = row.last_seq,
        count = row.count or 0,
        bytes = row.bytes or 0,
        max_age_ms = row.max_age_ms,
        max_messages = row.max_messages,
        max_bytes = row.max_bytes,
        discard = row.discard,
        cold_count = row.cold_count or 0,
        cold_bytes = row.cold_bytes or 0,
        consumers = consumer_count(subject),
    }
end

rawset(_G, 'mts_subject_info', subject_info)

-- Inside a transaction: removes a hot row's messages and, when no other
-- message shares its object, queues the object for deletion.
remove_row = function(m)
    box.space.mts_messages:delete({m.subject, m.seq})
    box.space.mts_subjects:update({m.subject}, {{'-', 'count', row_count(m)}, {'-', 'bytes', m.size}})
    local key = m.object_key
    if key ~= nil then
        box.space.mts_object_refs:delete({key, m.subject, m.seq})
        if not object_referenced(key) then
            box.space.mts_gc:replace({key, now_ns()})
        end
    end
end

-- A subject's limits: its own, or the service defaults `limits`.
local function limits_of(row, limits)
    return present(row.max_age_ms) or limits.max_age_ms or 0,
        present(row.max_messages) or limits.max_messages or 0,
        present(row.max_bytes) or limits.max_bytes or 0
end

-- How many of the first messages of block row `m` hold `bytes` or more.
local function front_holding(m, bytes)
    local n, held = 0, 0
    for _, item in ipairs(block_items(m)) do
        n, held = n + 1, held + #item[2]
        if held >= bytes then
            break
        end
    end
    return n
end

-- Inside a transaction: removes what the limits of subject `row` (its
-- mts_subjects row) take of its oldest hot row `m`: all of it, past the age
-- limit; as many of its first messages as the count and byte limits are
-- exceeded by, otherwise. Returns how many messages went.
local function expire_oldest(m, row, limits, now)
    local max_age, max_messages, max_bytes = limits_of(row, limits)
    local n, excess = row_count(m), 0
    if max_age > 0 and older_than(m.ts_ns, now, max_age) then
        excess = n
    end
    if max_messages > 0 and row.count > max_messages then
        excess = max(excess, tonumber(row.count - max_messages))
    end
    if max_bytes > 0 and row.bytes > max_bytes and excess < n then
        if m.batch == nil then
            excess = n
        else
            excess = max(excess, front_holding(m, tonumber(row.bytes - max_bytes)))
        end
    end
    if excess >= n then
        remove_row(m)
        return n
    elseif excess > 0 then
        drop_front(m, excess, true)
    end
    return excess
end

-- Whether the oldest segment `seg` of a subject must go: only once every
-- message in it is past a limit, so a subject keeps up to a segment more
-- than its count and byte limits, and a message up to its segment's age
-- longer than the age limit.
local function segment_expired(seg, row, limits, now)
    local max_age, max_messages, max_bytes = limits_of(row, limits)
    return (max_messages > 0 and row.count - seg.count >= max_messages)
        or (max_bytes > 0 and row.bytes - seg.bytes >= max_bytes)
        or (max_age > 0 and older_than(seg.last_ts_ns, now, max_age))
end

-- Inside a transaction: forgets that messages `first..last` of `subject`
-- name their offloaded payloads, queueing for deletion each object nothing
-- else names.
local function release_refs(subject, first, last)
    local named = {}
    for _, o in box.space.mts_object_refs.index.message:pairs({subject, first}, {iterator = 'GE'}) do
        if o.subject ~= subject or o.seq > last then
            break
        end
        named[#named + 1] = {o.object_key, o.subject, o.seq}
    end
    local now = now_ns()
    for _, key in ipairs(named) do
        box.space.mts_object_refs:delete(key)
        if not object_referenced(key[1]) then
            box.space.mts_gc:replace({key[1], now})
        end
    end
end

-- Inside a transaction: removes a segment's row (and hot rows a swap left
-- of its messages) and queues its object, and the offloaded payloads only it
-- named, for deletion.
local function remove_segment(seg)
    local subject, first, last = seg.subject, seg.first_seq, seg.last_seq
    box.space.mts_segments:delete({subject, first})
    local row = pad_subject(subject)
    local leftovers = {}
    for _, m in box.space.mts_messages.index.primary:pairs({subject, first}, {iterator = 'GE'}) do
        if m.subject ~= subject or m.seq > last then
            break
        end
        leftovers[#leftovers + 1] = m
    end
    for _, m in ipairs(leftovers) do
        drop_copies(m, last)
    end
    box.space.mts_subjects:update({subject}, {
        {'-', 'count', seg.count}, {'-', 'bytes', seg.bytes},
        {'-', 'cold_count', seg.count}, {'-', 'cold_bytes', seg.bytes},
        -- Written by every swap since schema 12; a swap by an older service
        -- during an upgrade may have left it short, never below zero here.
        {'=', 'segment_bytes', max(0, (present(row.segment_bytes) or 0) - seg.object_size)},
    })
    release_refs(subject, first, last)
    box.space.mts_gc:replace({seg.object_key, now_ns()})
end

-- Inside a transaction: deletes up to `budget` ordering keys of `subject`
-- of messages before `below` (removed, or being removed); how many it did.
local function trim_keys(subject, below, budget)
    local gone = {}
    for _, k in box.space.mts_keys:pairs({subject}, {iterator = 'EQ'}) do
        if k.seq >= below or #gone >= budget then
            break
        end
        gone[#gone + 1] = k.seq
    end
    for _, seq in ipairs(gone) do
        box.space.mts_keys:delete({subject, seq})
    end
    return #gone
end

-- How long an attempt's verdicts or fence is kept when nobody forgets it.
local ATTEMPT_TTL_MS = 3600 * 1000

-- One bounded step of retention, from subject `cursor` on: deletes at most
-- `budget` messages and stops after about `budget_ms` of work, looking only
-- at each subject's oldest messages. `limits` holds the service defaults.
-- Returns the subject to resume from ('' when every subject was visited) and
-- how many messages were deleted.
rawset(_G, 'mts_retention_step', function(cursor, limits, budget, budget_ms)
    local started = fiber.clock()
    local deleted = 0
    local resume = ''
    local now = now_ns()
    box.atomic(function()
        for _, row in box.space.mts_subjects:pairs({cursor}, {iterator = 'GE'}) do
            if deleted >= budget or (fiber.clock() - started) * 1000 >= budget_ms then
                resume = row.name
                return
            end
            local subject = row.name
            while deleted < budget do
                -- Segments hold a subject's oldest messages; hot rows the rest.
                local seg = box.space.mts_segments.index.primary:select({subject}, {iterator = 'EQ', limit = 1})[1]
                if seg ~= nil then
                    if not segment_expired(seg, row, limits, now) then
                        break
                    end
                    remove_segment(seg)
                    deleted = deleted + seg.count
                else
                    local oldest = box.space.mts_messages.index.primary:select(
                        {subject}, {iterator = 'EQ', limit = 1})[1]
                    local gone = 0
                    if oldest ~= nil then
                        gone = expire_oldest(oldest, row, limits, now)
                    end
                    if gone == 0 then
                        break
                    end
                    deleted = deleted + gone
                end
                row = box.space.mts_subjects:get(subject)
            end
            if row.keyed == true then
                trim_keys(subject, first_after(subject, 0) or row.last_seq + 1, budget)
            end
            if deleted >= budget then
                resume = subject
                return
            end
        end
        -- Message ids past their dedup window.
        local expired_ids = {}
        for _, d in box.space.mts_dedup.index.expiry:pairs({now}, {iterator = 'LT'}) do
            expired_ids[#expired_ids + 1] = {d.subject, d.message_id}
            if #expired_ids >= budget then
                break
            end
        end
        for _, key in ipairs(expired_ids) do
            box.space.mts_dedup:delete(key)
        end
        -- Fences of abandoned uploads only matter while a late commit could arrive.
        local stale = {}
        for _, a in box.space.mts_abandoned:pairs() do
            if older_than(a.ts_ns, now, 86400 * 1000) then
                stale[#stale + 1] = a.object_key
            end
            if #stale >= 100 then
                break
            end
        end
        for _, key in ipairs(stale) do
            box.space.mts_abandoned:delete(key)
        end
        -- Attempts nobody forgot (their caller went away, or fenced ones)
        -- only matter while a late call or a settle could still come.
        local old = {}
        for _, a in box.space.mts_attempts.index.ts:pairs() do
            if #old >= budget or not older_than(a.ts_ns, now, ATTEMPT_TTL_MS) then
                break
            end
            old[#old + 1] = a.attempt
        end
        for _, id in ipairs(old) do
            box.space.mts_attempts:delete(id)
        end
    end)
    return resume, deleted
end)

------------------------------------------------------------------------------
-- Administration: subjects and consumers listed a page at a time, subjects
-- purged or deleted in bounded steps, and consumers left unused removed.
------------------------------------------------------------------------------

-- Whether `name` starts with `prefix`.
local function has_prefix(name, prefix)
    return prefix == '' or name:sub(1, #prefix) == prefix
end

-- Whether a subject row is what DeleteSubject left and nothing used since:
-- a listing passes over it (its row only keeps its sequences from reuse).
local function deleted_and_unused(row)
    return present(row.deleted_ns) ~= nil and (row.count or 0) == 0 and consumer_count(row.name) == 0
end

-- Up to `limit` subjects named with `prefix`, in name order after `after`
-- ('' = from the first): their subject_info, and whether more may follow.
rawset(_G, 'mts_list_subjects', function(prefix, after, limit)
    local out = setmetatable({}, ARRAY)
    local key, iterator = after, 'GT'
    if after < prefix then
        key, iterator = prefix, 'GE'
    end
    for _, row in box.space.mts_subjects:pairs({key}, {iterator = iterator}) do
        if not has_prefix(row.name, prefix) then
            return out, false
        end
        if not deleted_and_unused(row) then
            if #out >= limit then
                return out, true
            end
            out[#out + 1] = subject_info(row.name)
        end
    end
    return out, false
end)

-- Up to `limit` consumers after (`after_subject`, `after_durable`) in
-- (subject, name) order — of `subject` only, unless it is '' — as
-- consumer_info; and whether more may follow.
rawset(_G, 'mts_list_consumers', function(subject, after_subject, after_durable, limit)
    local out = setmetatable({}, ARRAY)
    local key, iterator = {after_subject, after_durable}, 'GT'
    if subject ~= '' and after_subject ~= subject then
        key, iterator = {subject}, 'GE'
    end
    for _, row in box.space.mts_consumers:pairs(key, {iterator = iterator}) do
        if subject ~= '' and row.subject ~= subject then
            return out, false
        end
        if #out >= limit then
            return out, true
        end
        out[#out + 1] = consumer_info(row)
    end
    return out, false
end)

-- Inside a transaction: what a purge through `through` does to the
-- subject's consumers: leases of purged messages are dropped, and none is
-- delivered or counted as unacknowledged again.
local function purge_consumers(subject, through)
    local consumers = {}
    for _, row in box.space.mts_consumers:pairs({subject}) do
        consumers[#consumers + 1] = consumer_view(row)
    end
    for _, c in ipairs(consumers) do
        ack_through(c, through)
        keys_done_through(subject, c.durable, through)
    end
end

-- Inside a transaction: cuts segment `seg` down to the messages after
-- `through`; `bytes`, the payload bytes of those up to it, the service read
-- from the object. The object stays (it holds the rest); offloaded payloads
-- only the purged messages named go.
local function cut_segment(seg, through, bytes)
    local subject, first = seg.subject, seg.first_seq
    local view = segment_view(seg)
    local _, i = block_of(view, through + 1)
    local blocks = setmetatable({}, ARRAY)
    for j = i, #view.blocks do
        blocks[#blocks + 1] = view.blocks[j]
    end
    local count = through - first + 1
    box.space.mts_segments:delete({subject, first})
    box.space.mts_segments:insert({
        subject, through + 1, seg.last_seq, blocks[1][2], seg.last_ts_ns, seg.count - count,
        max(0, seg.bytes - bytes), seg.object_key, seg.object_size, blocks, seg.created_ns,
    })
    pad_subject(subject)
    local row = box.space.mts_subjects:get(subject)
    box.space.mts_subjects:update({subject}, {
        {'=', 'count', max(0, row.count - count)}, {'=', 'bytes', max(0, row.bytes - bytes)},
        {'=', 'cold_count', max(0, (row.cold_count or 0) - count)},
        {'=', 'cold_bytes', max(0, (row.cold_bytes or 0) - bytes)},
    })
    local copies = {}
    for _, m in box.space.mts_messages.index.primary:pairs({subject}, {iterator = 'EQ'}) do
        if m.seq > through then
            break
        end
        copies[#copies + 1] = m
    end
    for _, m in ipairs(copies) do
        drop_copies(m, through)
    end
    release_refs(subject, first, through)
end

-- One bounded step of a purge of `subject` through sequence `through` (0 =
-- its last sequence now): removes at most about `budget` messages, oldest
-- first, in one transaction, their objects queued for deletion. A segment
-- the purge ends inside can only be cut with the payload bytes of its
-- purged messages, which the service reads: `cut` = {first_seq, bytes} of
-- that segment, once it has them. Returns the state ('more', 'done', or
-- 'cut' with the blocks to read: {first_seq, object_key, offset, length,
-- object_size} each), the messages removed, `through` as resolved, and
-- (with 'cut') the segment's first sequence, 0 otherwise.
rawset(_G, 'mts_purge_step', function(subject, through, budget, cut)
    local state, removed, blocks, cut_first = 'more', 0, setmetatable({}, ARRAY), 0
    box.atomic(function()
        local row = box.space.mts_subjects:get(subject)
        if row == nil then
            state = 'done'
            return
        end
        if through == 0 or through > row.last_seq then
            through = row.last_seq
        end
        while removed < budget do
            local seg = box.space.mts_segments.index.primary:select({subject}, {iterator = 'EQ', limit = 1})[1]
            if seg ~= nil and seg.first_seq <= through then
                if seg.last_seq <= through then
                    remove_segment(seg)
                    removed = removed + seg.count
                elseif cut ~= nil and cut.first_seq == seg.first_seq then
                    cut_segment(seg, through, cut.bytes)
                    removed = removed + (through - seg.first_seq + 1)
                    cut = nil
                else
                    state, cut_first = 'cut', seg.first_seq
                    local view = segment_view(seg)
                    local _, i = block_of(view, through)
                    for j = 1, i do
                        local b = view.blocks[j]
                        blocks[#blocks + 1] = {b[1], seg.object_key, b[3], b[4], seg.object_size}
                    end
                    return
                end
            elseif seg ~= nil then
                break
            else
                local m = box.space.mts_messages.index.primary:select({subject}, {iterator = 'EQ', limit = 1})[1]
                if m == nil or m.seq > through then
                    break
                end
                if row_last(m) <= through then
                    removed = removed + row_count(m)
                    remove_row(m)
                else
                    local k = tonumber(through - m.seq + 1)
                    drop_front(m, k, true)
                    removed = removed + k
                end
            end
        end
        local work = removed
        if work < budget and row.keyed == true then
            -- The purged messages' ordering keys go too, within the step's budget.
            work = work + trim_keys(subject, through + 1, budget - work)
        end
        if work < budget then
            purge_consumers(subject, through)
            state = 'done'
        end
    end)
    if state == 'done' then
        released(subject)
    end
    return state, removed, through, blocks, cut_first
end)

-- Finishes DeleteSubject once its messages are purged: deletes the
-- subject's consumers (and their leases), its limits and up to `budget` of
-- its message ids; the row stays, marked, keeping last_seq. Returns whether
-- it is done ('more': message ids left), and how many consumers went.
rawset(_G, 'mts_delete_subject', function(subject, budget)
    local done, consumers = false, 0
    box.atomic(function()
        local ids = box.space.mts_dedup:select({subject}, {iterator = 'EQ', limit = budget})
        for _, d in ipairs(ids) do
            box.space.mts_dedup:delete({d.subject, d.message_id})
        end
        if #ids >= budget then
            return
        end
        local durables = {}
        for _, row in box.space.mts_consumers:pairs({subject}) do
            durables[#durables + 1] = row.durable
        end
        for _, durable in ipairs(durables) do
            box.space.mts_consumers:delete({subject, durable})
            drop_leases(subject, durable)
        end
        consumers = #durables
        if box.space.mts_subjects:get(subject) ~= nil then
            pad_subject(subject)
            box.space.mts_subjects:update({subject}, {
                {'=', 'max_age_ms', box.NULL}, {'=', 'max_messages', box.NULL}, {'=', 'max_bytes', box.NULL},
                {'=', 'discard', box.NULL}, {'=', 'deleted_ns', now_ns()},
            })
        end
        done = true
    end)
    return done, consumers
end)

-- Records that the consumers {subject, durable} of `pairs` are in use (a
-- stream of theirs is open).
rawset(_G, 'mts_touch_consumers', function(pairs_)
    local now = now_ns()
    box.atomic(function()
        for _, pair in ipairs(pairs_) do
            local row = box.space.mts_consumers:get({pair[1], pair[2]})
            if row ~= nil then
                touch(consumer_view(row), now)
            end
        end
    end)
    return true
end)

-- Removes up to `limit` consumers unused for longer than their
-- inactive_threshold_ms, with their leases. Returns {subject, durable} of
-- each.
rawset(_G, 'mts_expire_consumers', function(limit)
    local now = now_ns()
    local gone = setmetatable({}, ARRAY)
    box.atomic(function()
        for _, row in box.space.mts_consumers:pairs() do
            local c = consumer_view(row)
            if c.inactive_threshold_ms > 0 and older_than(c.active_ns, now, c.inactive_threshold_ms) then
                gone[#gone + 1] = {c.subject, c.durable}
                if #gone >= limit then
                    break
                end
            end
        end
        for _, pair in ipairs(gone) do
            box.space.mts_consumers:delete(pair)
            drop_leases(pair[1], pair[2])
        end
    end)
    return gone
end)

------------------------------------------------------------------------------
-- Tiering: the service that holds the `tiering` lease moves each subject's
-- oldest hot messages into segment objects. It plans (mts_tier_plan), reads
-- the rows (mts_tier_read), uploads the segment, then swaps the rows for one
-- segment row (mts_tier_commit): one transaction inserts the segment row,
-- after which the hot rows are copies nothing reads, trimmed in slices so
-- that no publish waits behind thousands of deletions. A crash before the
-- swap leaves at most an object no row names, which the orphan sweep
-- removes; one while trimming leaves copies that the next plan trims; a
-- swap whose rows are gone (another replica, retention, eviction) changes
-- nothing, and its object is deleted by the caller.
------------------------------------------------------------------------------

-- Rows a swap reads or deletes between yields: a publish waits for at most
-- one such slice (well under a millisecond).
local SWAP_SLICE = 256

-- Deletes the hot rows of `subject` up to `through`, copies of messages a
-- segment holds, a slice per transaction, at most `max_slices` slices (nil
-- = all). Returns whether none are left. Raises when a slice fails.
local function trim_tiered(subject, through, max_slices)
    local slices = 0
    while max_slices == nil or slices < max_slices do
        slices = slices + 1
        local rows = {}
        for _, m in ipairs(box.space.mts_messages.index.primary:select(
            {subject}, {iterator = 'EQ', limit = SWAP_SLICE})) do
            if m.seq > through then
                break
            end
            rows[#rows + 1] = m
        end
        if #rows == 0 then
            return true
        end
        box.atomic(function()
            for _, m in ipairs(rows) do
                drop_copies(m, through)
            end
        end)
        fiber.yield()
    end
    return false
end

-- trim_tiered, with a failure logged instead of raised: the copies it
-- leaves are the next plan's to trim.
local function trim_tiered_or_log(subject, through, max_slices)
    local ok, err = pcall(trim_tiered, subject, through, max_slices)
    if not ok then
        log.warn('tiering: trimming the hot copies of %s failed: %s', subject, tostring(err))
    end
end

-- Slices a plan trims per subject: the rest waits for the next plan, so a
-- crash's leftovers never hold one call past its timeout.
local PLAN_TRIM_SLICES = 16

-- Hot-tier use against the budget, as a fraction of the fuller of bytes and rows.
local function hot_use(budget)
    local bytes, rows = hot_size()
    return math.max(tonumber(bytes) / budget.max_bytes, tonumber(rows) / budget.max_rows)
end

-- Subjects with hot messages due to move: `opts` = {segment_bytes,
-- segment_messages, seal_age_ms, hot (the budget, as for publishing)}. A
-- subject is due when its hot messages fill a segment, when its oldest is
-- older than seal_age_ms, or when the hot tier is half full. Returns up to
-- `limit` of {subject, first hot seq, hot messages, hot bytes}, most bytes first.
rawset(_G, 'mts_tier_plan', function(opts, limit)
    local now = now_ns()
    local budget = hot_budget(opts.hot or {})
    local pressed = hot_use(budget) >= 0.5
    local due = {}
    local untrimmed = {}
    for _, row in box.space.mts_subjects:pairs() do
        local oldest = box.space.mts_messages.index.primary:select({row.name}, {iterator = 'EQ', limit = 1})[1]
        local count = (row.count or 0) - (row.cold_count or 0)
        local first = nil
        if oldest ~= nil then
            first = oldest.seq
            local through = tiered_through(row.name)
            if oldest.seq <= through then
                -- A swap cut off while trimming.
                untrimmed[#untrimmed + 1] = {row.name, through}
                first, oldest = first_hot(row.name, through)
            end
        end
        if oldest ~= nil and count > 0 then
            local bytes = (row.bytes or 0) - (row.cold_bytes or 0)
            if pressed or bytes >= opts.segment_bytes or count >= opts.segment_messages
                or older_than(oldest.ts_ns, now, opts.seal_age_ms) then
                due[#due + 1] = {row.name, first, count, bytes}
            end
        end
    end
    for _, t in ipairs(untrimmed) do
        trim_tiered_or_log(t[1], t[2], PLAN_TRIM_SLICES)
    end
    table.sort(due, function(a, b) return a[4] > b[4] end)
    local out = setmetatable({}, ARRAY)
    for i = 1, math.min(limit, #due) do
        out[i] = due[i]
    end
    return out
end)

-- Up to `max_rows` hot messages of `subject` after `after`, in order, and
-- no more than `max_bytes` of payload (but always one). `rows` (since
-- schema 15): the hot rows themselves, whole, from the one holding the
-- message after `after` (the caller skips what it holds up to `after`),
-- until they hold `max_rows` messages or `max_bytes`, so that a segment can
-- end where a row ends; otherwise each message as a message tuple.
rawset(_G, 'mts_tier_read', function(subject, after, max_rows, max_bytes, rows)
    local out = setmetatable({}, ARRAY)
    local count, bytes = 0, 0
    if rows then
        local m = hot_row_after(subject, after)
        if m == nil then
            return out
        end
        for _, r in box.space.mts_messages.index.primary:pairs({subject, m.seq}, {iterator = 'GE'}) do
            if r.subject ~= subject or count >= max_rows or (count > 0 and bytes + r.size > max_bytes) then
                break
            end
            out[#out + 1] = r
            count = count + row_last(r) - max(r.seq, after + 1) + 1
            bytes = bytes + r.size
        end
        return out
    end
    each_hot_after(subject, after, function(m)
        if #out >= max_rows or (#out > 0 and bytes + m.size > max_bytes) then
            return false
        end
        out[#out + 1] = m
        bytes = bytes + m.size
        return true
    end)
    return out
end)

-- The payload bytes of the messages of row `m` from `lo` to `hi`.
local function bytes_between(m, lo, hi)
    if m.seq >= lo and row_last(m) <= hi then
        return m.size
    end
    local bytes = 0
    for i, item in ipairs(block_items(m)) do
        local seq = m.seq + i - 1
        if seq >= lo and seq <= hi then
            bytes = bytes + #item[2]
        end
    end
    return bytes
end

-- Swaps hot messages first_seq..last_seq of a subject for the segment that
-- now holds them: one transaction inserts the segment row, then the hot
-- rows are trimmed. `seg` is a map of the mts_segments fields (without
-- created_ns); the offloaded payloads its messages name keep their
-- mts_object_refs rows. Returns 'ok'; 'gone' when the rows are no longer
-- all hot (moved or removed meanwhile: nothing changes); or 'abandoned' when
-- the orphan sweep gave the object up.
rawset(_G, 'mts_tier_commit', function(seg)
    local subject, first, last = seg.subject, seg.first_seq, seg.last_seq
    if box.space.mts_abandoned:get(seg.object_key) ~= nil then
        return 'abandoned'
    end
    if seg.count ~= last - first + 1 then
        return 'gone'
    end
    -- The payload bytes, checked a slice at a time before the swap: stored
    -- messages never change and only a subject's oldest are ever removed,
    -- so with both ends still there at the swap, these are its rows.
    local start = hot_at(subject, first)
    if start == nil then
        return 'gone'
    end
    local bytes, seq, key = 0, first, start.seq
    while seq <= last do
        local from = seq
        for _, m in ipairs(box.space.mts_messages.index.primary:select(
            {subject, key}, {iterator = 'GE', limit = SWAP_SLICE})) do
            if m.subject ~= subject or m.seq > seq or seq > last then
                break
            end
            bytes = bytes + bytes_between(m, seq, last)
            seq = row_last(m) + 1
        end
        if seq == from then
            return 'gone'
        end
        key = seq
        fiber.yield()
    end
    if bytes ~= seg.bytes then
        box.error(box.error.PROC_LUA, string.format(
            'segment %s claims %s payload bytes; its messages hold %s',
            seg.object_key, decimal(seg.bytes), decimal(bytes)))
    end
    local outcome = 'ok'
    box.atomic(function()
        -- The run must start where the subject's segments end (leftover
        -- copies of their messages aside), and both its ends be hot.
        -- The sweep may have fenced the object while the bytes were checked.
        if box.space.mts_abandoned:get(seg.object_key) ~= nil then
            outcome = 'abandoned'
            return
        end
        local through = tiered_through(subject)
        if first <= through or hot_at(subject, first) == nil or hot_at(subject, last) == nil
            or (first - 1 > through and hot_at(subject, first - 1) ~= nil) then
            outcome = 'gone'
            return
        end
        box.space.mts_segments:insert({
            subject, first, last, seg.first_ts_ns, seg.last_ts_ns, seg.count, seg.bytes,
            seg.object_key, seg.object_size, seg.blocks, now_ns(),
        })
        local row = pad_subject(subject)
        box.space.mts_subjects:update({subject}, {
            {'=', 'cold_count', (row.cold_count or 0) + seg.count},
            {'=', 'cold_bytes', (row.cold_bytes or 0) + seg.bytes},
            {'=', 'segment_bytes', (present(row.segment_bytes) or 0) + seg.object_size},
        })
    end)
    if outcome == 'ok' then
        -- Committed: a failed slice leaves copies for the next plan, and
        -- must not make the caller think the segment was refused.
        trim_tiered_or_log(subject, last)
    end
    return outcome
end)

-- The hot tier against its budget (`hot` as for publishing): cheap enough
-- for every health check.
local function hot_tier(hot)
    local budget = hot_budget(hot or {})
    local bytes, rows = hot_size()
    return {
        hot_bytes = bytes,
        hot_messages = rows,
        budget_bytes = budget.max_bytes,
        budget_messages = budget.max_rows,
        full = hot_full(budget, bytes, rows),
    }
end

rawset(_G, 'mts_hot_tier', hot_tier)

-- The two tiers at a glance, for gauges: the hot tier, Tarantool's memory,
-- the age of the oldest message not yet in a segment, and the segments.
rawset(_G, 'mts_storage_stats', function(hot)
    local now = now_ns()
    local oldest_ns, segment_bytes = 0, 0
    for _, row in box.space.mts_subjects:pairs() do
        if (row.count or 0) > (row.cold_count or 0) then
            local _, m = first_hot(row.name)
            if m ~= nil and now > m.ts_ns and now - m.ts_ns > oldest_ns then
                oldest_ns = now - m.ts_ns
            end
        end
        segment_bytes = segment_bytes + (present(row.segment_bytes) or 0)
    end
    local slab = box.slab.info()
    local stats = hot_tier(hot)
    stats.arena_used = slab.arena_used
    stats.quota_size = slab.quota_size
    stats.quota_used = slab.quota_used
    stats.oldest_untiered_age_ms = tonumber(oldest_ns / 1000000)
    stats.segments = box.space.mts_segments:len()
    stats.segment_bytes = segment_bytes
    return stats
end)

-- A backup holds object deletions (a lease row) so that every object its
-- checkpoint names is still in the bucket when it is copied.
local BACKUP_HOLD = 'backup-hold'

local function deletions_held()
    local row = box.space.mts_leases:get(BACKUP_HOLD)
    return row ~= nil and row.expires_ns >= now_ns()
end

-- Up to `limit` object keys waiting for deletion; none while a backup runs.
rawset(_G, 'mts_gc_take', function(limit)
    if deletions_held() then
        return {}
    end
    local keys = {}
    for _, row in box.space.mts_gc:pairs() do
        if #keys >= limit then
            break
        end
        keys[#keys + 1] = row.object_key
    end
    return keys
end)

-- Forgets keys whose objects were deleted.
rawset(_G, 'mts_gc_done', function(keys)
    box.atomic(function()
        for _, key in ipairs(keys) do
            box.space.mts_gc:delete(key)
        end
    end)
    return true
end)

-- Takes or renews lease `name` for `holder` for `ttl_ms`; returns whether
-- `holder` holds it now.
rawset(_G, 'mts_lease', function(name, holder, ttl_ms)
    local now = now_ns()
    local held = false
    box.atomic(function()
        local row = box.space.mts_leases:get(name)
        if row == nil or row.holder == holder or row.expires_ns < now then
            box.space.mts_leases:replace({name, holder, after_ms(now, ttl_ms)})
            held = true
        end
    end)
    return held
end)

-- Settles a publish whose commit outcome is unknown: returns the sequence if
-- the object's metadata was committed, otherwise marks the key abandoned (so
-- a late commit is refused) and returns 0.
rawset(_G, 'mts_settle_object', function(object_key)
    local ref = box.space.mts_object_refs:select({object_key}, {limit = 1})[1]
    if ref ~= nil then
        return ref.seq
    end
    box.space.mts_abandoned:replace({object_key, now_ns()})
    return 0
end)

-- Settles a group-commit attempt whose answer was lost: 'committed' and its
-- verdicts if it was stored; otherwise 'fenced', and it will never be. Either
-- way this writes, so that its answer is only given once the attempt's own
-- WAL write (which may still be in flight) has succeeded or failed.
rawset(_G, 'mts_settle_attempt', function(attempt)
    local outcome, verdicts = 'fenced', setmetatable({}, ARRAY)
    box.atomic(function()
        local row = box.space.mts_attempts:get(attempt)
        if row == nil then
            box.space.mts_attempts:insert({attempt, now_ns(), true, box.NULL})
        elseif not row.fenced then
            box.space.mts_attempts:replace(row)
            outcome, verdicts = 'committed', row.verdicts
        end
    end)
    return outcome, verdicts
end)

-- The store's id and when it was created (ns since the Unix epoch).
-- This member's part in a replica set, for services finding the one that
-- takes writes: whether it is read-only, its id, its replication status and
-- how far its log has gone (the sum of its vclock), and per peer the lag of
-- what it applies from that peer, in seconds (0 for itself).
rawset(_G, 'mts_role', function()
    local lsn = 0
    for _, n in pairs(box.info.vclock) do
        lsn = lsn + n
    end
    local lags = setmetatable({}, MAP)
    for id, peer in pairs(box.info.replication) do
        if peer.upstream ~= nil and peer.upstream.lag ~= nil then
            lags[tostring(id)] = peer.upstream.lag
        end
    end
    return {ro = box.info.ro, id = box.info.id, status = box.info.status, lsn = lsn, lags = lags}
end)

-- Makes this member take writes, as a manual failover on Tarantool 2.6 (no
-- election) does: writable, then the synchronous writes the lost leader left
-- unconfirmed settled, confirmed where enough live members have them and
-- rolled back otherwise. clear_synchro_queue() first waits twice the synchro
-- timeout for the lost leader's own CONFIRM or ROLLBACK, which a dead leader
-- never sends: that wait is cut short. For administrators (not in the role).
rawset(_G, 'mts_promote', function()
    local timeout = box.cfg.replication_synchro_timeout
    box.cfg({read_only = false, replication_synchro_timeout = 0.05})
    local ok, err = pcall(box.ctl.clear_synchro_queue)
    box.cfg({replication_synchro_timeout = timeout})
    if not ok then
        error(err)
    end
end)

local function mark_sync_writes()
    local sync = box.space.mts_sync
    if sync == nil or not sync.is_sync then
        return
    end
    sync_writes = true
    local previous = rawget(_G, 'mts_sync_write')
    for _, space in box.space._space:pairs() do
        local name = space[3]
        local target = type(name) == 'string' and name:sub(1, 4) == 'mts_' and name ~= 'mts_sync' and box.space[name]
        if target then
            -- Replaces the trigger of an earlier load of this file.
            for _, trigger in ipairs(target:on_replace()) do
                if trigger == previous then
                    target:on_replace(nil, previous)
                end
            end
            target:on_replace(sync_write)
        end
    end
    rawset(_G, 'mts_sync_write', sync_write)
end

-- Makes the schema's writes synchronous (see sync_write); undoes the flag
-- that earlier versions set on every space. Tarantool 2.6 has no
-- space:alter, so flags are set in _space.
rawset(_G, 'mts_make_sync', function()
    local updates = {}
    for _, space in box.space._space:pairs() do
        local name, flags = space[3], space[6]
        if type(name) == 'string' and name:sub(1, 4) == 'mts_' then
            local want = name == 'mts_sync'
            if (flags and flags.is_sync or false) ~= want then
                local changed = {}
                for k, v in pairs(flags or {}) do
                    changed[k] = v
                end
                changed.is_sync = want or nil
                updates[#updates + 1] = {space[1], changed}
            end
        end
    end
    for _, update in ipairs(updates) do
        box.space._space:update(update[1], {{'=', 6, setmetatable(update[2], MAP)}})
    end
    mark_sync_writes()
end)

rawset(_G, 'mts_identity', function()
    local row = box.space.mts_identity:select({}, {limit = 1})[1]
    return row.store_id, row.created_ns
end)

-- The orphan sweep's batch form of mts_settle_object: returns the keys that
-- no message names, each now fenced against a late commit.
rawset(_G, 'mts_settle_objects', function(keys)
    if deletions_held() then
        return {}
    end
    local orphans = {}
    box.atomic(function()
        for _, key in ipairs(keys) do
            if not object_referenced(key) then
                box.space.mts_abandoned:replace({key, now_ns()})
                orphans[#orphans + 1] = key
            end
        end
    end)
    return orphans
end)

-- Backups. The hold on object deletions is a lease the leader keeps
-- (mts_backup_hold, renewed the same way, lifted by mts_backup_release). The
-- checkpoint is taken on any member, in a replica set on a follower so that
-- the leader's disk and CPU go on serving: mts_backup_checkpoint takes it and
-- pins its files (box.backup.start) until mts_backup_unpin; mts_backup_read
-- hands them out in base64 chunks, so a backup needs no access to Tarantool's
-- disk; mts_backup_keys pages through every object key the checkpoint may
-- name: those of stored messages and those deleted since (waiting in mts_gc,
-- which the hold keeps).
local backup_files = rawget(_G, 'mts_backup_files') or {}
rawset(_G, 'mts_backup_files', backup_files)

rawset(_G, 'mts_backup_hold', function(hold_ms)
    box.space.mts_leases:replace({BACKUP_HOLD, 'backup', after_ms(now_ns(), hold_ms)})
    return true
end)

rawset(_G, 'mts_backup_release', function()
    box.space.mts_leases:delete(BACKUP_HOLD)
    return true
end)

rawset(_G, 'mts_backup_checkpoint', function()
    for attempt = 1, 100 do
        local ok, err = pcall(box.snapshot)
        if ok then
            break
        end
        -- Another checkpoint (the periodic one) is running: wait it out.
        if attempt == 100 or not tostring(err):find('in progress') then
            error(err)
        end
        fiber.sleep(0.1)
    end
    local paths = box.backup.start()
    local files = setmetatable({}, ARRAY)
    for k in pairs(backup_files) do
        backup_files[k] = nil
    end
    for _, path in ipairs(paths) do
        local stat = fio.stat(path)
        backup_files[fio.basename(path)] = path
        files[#files + 1] = {fio.basename(path), stat and stat.size or 0}
    end
    return files
end)

rawset(_G, 'mts_backup_unpin', function()
    for k in pairs(backup_files) do
        backup_files[k] = nil
    end
    pcall(box.backup.stop)
    return true
end)

rawset(_G, 'mts_backup_read', function(name, offset, length)
    local path = backup_files[name]
    if path == nil then
        box.error(box.error.PROC_LUA,
            'no backup file ' .. tostring(name) .. ' on this member (call mts_backup_checkpoint first)')
    end
    local file, err = fio.open(path, {'O_RDONLY'})
    if file == nil then
        box.error(box.error.PROC_LUA, 'cannot open ' .. path .. ': ' .. tostring(err))
    end
    -- A buffer of this call's own: without one, fio reads into a buffer
    -- shared by every fiber, and the read yields while another call reuses it.
    local buf = buffer.ibuf()
    local ok, chunk = pcall(function()
        local into = buf:reserve(length)
        local got, err = file:pread(into, length, offset)
        if got == nil then
            error(err)
        end
        return ffi.string(into, got)
    end)
    buf:recycle()
    file:close()
    if not ok then
        box.error(box.error.PROC_LUA, 'cannot read ' .. path .. ': ' .. tostring(chunk))
    end
    return digest.base64_encode(chunk, {nowrap = true})
end)

rawset(_G, 'mts_backup_keys', function(source, after, limit)
    local keys = setmetatable({}, ARRAY)
    if source == 'gc' then
        for _, row in box.space.mts_gc:pairs({after}, {iterator = 'GT'}) do
            if #keys >= limit then
                break
            end
            keys[#keys + 1] = {row.object_key, 0}
        end
        return keys
    end
    if source == 'segments' then
        for _, seg in box.space.mts_segments.index.object_key:pairs({after}, {iterator = 'GT'}) do
            if #keys >= limit then
                break
            end
            keys[#keys + 1] = {seg.object_key, seg.object_size}
        end
        return keys
    end
    local last = after
    for _, ref in box.space.mts_object_refs:pairs({after}, {iterator = 'GT'}) do
        if #keys >= limit then
            break
        end
        -- Several messages may name one object; it shows once.
        if ref.object_key ~= last then
            keys[#keys + 1] = {ref.object_key, ref.size}
            last = ref.object_key
        end
    end
    return keys
end)


-- A role with exactly what the services need, so a production user can be
-- granted it instead of universe rights (init.lua does that for every
-- deployment).
with_schema_lock(function()
    local PROCEDURES = {
        'mts_schema_version', 'mts_publish', 'mts_publish_batch', 'mts_last_seq', 'mts_wait', 'mts_subscribe',
        'mts_fetch', 'mts_consume', 'mts_ack_message', 'mts_ack_sequences', 'mts_nack', 'mts_release',
        'mts_create_or_update_consumer', 'mts_consumer_info', 'mts_delete_consumer', 'mts_settle_object',
        'mts_set_subject_limits', 'mts_subject_info', 'mts_retention_step', 'mts_gc_take', 'mts_gc_done',
        'mts_lease', 'mts_settle_objects', 'mts_dedup_lookup', 'mts_message', 'mts_consumers_lag',
        'mts_settle_attempt', 'mts_identity', 'mts_dead_letter', 'mts_extend_lease', 'mts_reject', 'mts_seek',
        'mts_locate_time', 'mts_segment_next', 'mts_tier_plan', 'mts_tier_read', 'mts_tier_commit', 'mts_storage_stats', 'mts_hot_tier',
        'mts_backup_hold', 'mts_backup_release', 'mts_backup_checkpoint', 'mts_backup_read', 'mts_backup_keys',
        'mts_backup_unpin',
        'mts_list_subjects', 'mts_list_consumers', 'mts_purge_step', 'mts_delete_subject', 'mts_touch_consumers',
        'mts_expire_consumers', 'mts_role',
    }
    box.schema.role.create('minitoolstream', {if_not_exists = true})
    for _, name in ipairs(PROCEDURES) do
        box.schema.func.create(name, {if_not_exists = true})
        box.schema.role.grant('minitoolstream', 'execute', 'function', name, {if_not_exists = true})
    end
    for _, space in ipairs({
        'mts_subjects', 'mts_messages', 'mts_consumers', 'mts_pending', 'mts_abandoned', 'mts_gc', 'mts_leases',
        'mts_dedup', 'mts_attempts', 'mts_identity', 'mts_segments', 'mts_object_refs', 'mts_keys',
        'mts_key_waits', 'mts_sync',
    }) do
        box.schema.role.grant('minitoolstream', 'read,write', 'space', space, {if_not_exists = true})
    end
end)

mark_sync_writes()

return SCHEMA_VERSION
