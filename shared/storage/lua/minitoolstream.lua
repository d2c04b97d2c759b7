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
local uuid = require('uuid')

local SCHEMA_VERSION = 10
local MAP = {__serialize = 'map'}
local ARRAY = {__serialize = 'array'}

-- Error codes the procedures raise or answer with; store.rs gives the same
-- numbers the same names (a test keeps the two in step).
local ABANDONED = 10001
local LATE = 10002
local FENCED = 10003

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

-- DDL yields (WAL writes) between an if_not_exists check and its insert, so
-- two services applying this file at once could both try to create the same
-- space. A lock kept in a global, taken without yielding, runs one
-- application at a time.
local function with_schema_lock(apply)
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
    }
    box.schema.space.create('mts_messages', {if_not_exists = true, format = MESSAGE_FORMAT})
    box.space.mts_messages:format(MESSAGE_FORMAT)
    box.space.mts_messages:create_index('primary', {parts = {'subject', 'seq'}, if_not_exists = true})
    box.space.mts_messages:create_index('ts', {
        parts = {'subject', 'ts_ns'}, unique = false, if_not_exists = true,
    })
    box.space.mts_messages:create_index('object_key', {
        parts = {{field = 'object_key', type = 'string', is_nullable = true}},
        unique = false,
        if_not_exists = true,
    })

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
    }
    box.schema.space.create('mts_consumers', {if_not_exists = true, format = CONSUMER_FORMAT})
    box.space.mts_consumers:format(CONSUMER_FORMAT)
    box.space.mts_consumers:create_index('primary', {parts = {'subject', 'durable'}, if_not_exists = true})

    -- One row per message handed out and not yet acknowledged: leased until
    -- deadline_ns, or (after a nack) waiting until deadline_ns to be redelivered.
    box.schema.space.create('mts_pending', {
        if_not_exists = true,
        format = {
            {name = 'subject', type = 'string'},
            {name = 'durable', type = 'string'},
            {name = 'seq', type = 'unsigned'},
            {name = 'deliveries', type = 'unsigned'},
            {name = 'deadline_ns', type = 'unsigned'},
            {name = 'first_delivered_ns', type = 'unsigned'},
        },
    })
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
    end
end

rawset(_G, 'mts_schema_version', function()
    return SCHEMA_VERSION
end)

-- A subject's last sequence and counts while a transaction adds messages to
-- it; `close_subject` writes them back, once however many were added.
local function open_subject(subject)
    local row = box.space.mts_subjects:get(subject)
    return {name = subject, seq = row ~= nil and row.last_seq or 0, count = 0, bytes = 0, exists = row ~= nil}
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
end

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
    if dedup then
        local savepoint = box.savepoint()
        local ok, err = pcall(function()
            box.space.mts_messages:insert(row)
            box.space.mts_dedup:replace({s.name, message_id, seq, after_ms(now, window_ms or 0)})
        end)
        if not ok then
            box.rollback_to_savepoint(savepoint)
            error(err)
        end
    else
        box.space.mts_messages:insert(row)
    end
    s.seq, s.count, s.bytes = seq, s.count + 1, s.bytes + size
    return seq, false
end

-- Inside a transaction: stores a message under the next sequence of
-- `subject`; returns the sequence.
local function store_message(subject, headers, data, object_key, size, sha256)
    local s = open_subject(subject)
    local seq = add_message(now_ns(), s, headers, data, object_key, size, sha256)
    close_subject(s)
    return seq
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
-- With `dedup` = {message_id, window_ms}, a second publish of the same id on
-- the same subject within the window stores nothing and returns the first
-- one's sequence; the second return value says whether that happened.
rawset(_G, 'mts_publish', function(subject, headers, data, object_key, size, deadline_ns, sha256, dedup)
    local message_id, window_ms = nil, 0
    if dedup ~= nil then
        -- {message_id, window_ms}
        message_id, window_ms = dedup[1], dedup[2]
    end
    if late(deadline_ns, now_ns()) then
        box.error({reason = LATE_REASON, code = LATE})
    end
    if object_key ~= nil and box.space.mts_abandoned:get(object_key) ~= nil then
        box.error({reason = 'object ' .. object_key .. ' was abandoned; publish again', code = ABANDONED})
    end
    local seq, duplicate
    box.atomic(function()
        local s = open_subject(subject)
        seq, duplicate = add_message(now_ns(), s, headers, data, object_key, size, sha256, message_id, window_ms)
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

-- Group commit: stores inline messages from many publishers in one
-- transaction, so one WAL write serves them all, and each subject's row is
-- written once. Each message is {subject, headers, data, size, sha256,
-- message_id ('' for none), window_ms, deadline_ns} and is handled as
-- mts_publish would; one that fails is left out and answered in its place.
-- Returns one {seq, duplicate} or {0, false, error_code, reason} per
-- message, in order; messages to the same subject get consecutive sequences
-- in that order.
--
-- `attempt` (optional) names this call: its verdicts are kept under that
-- name in the same transaction, for mts_settle_attempt. An attempt already
-- settled as fenced stores nothing; one already committed answers its
-- verdicts again. `forget` lists earlier attempts whose answers arrived.
rawset(_G, 'mts_publish_batch', function(messages, attempt, forget)
    local results = setmetatable({}, ARRAY)
    local subjects = {}
    if attempt == '' then
        attempt = nil
    end
    local replayed = false
    box.atomic(function()
        local now = now_ns()
        for _, id in ipairs(forget or {}) do
            box.space.mts_attempts:delete(id)
        end
        if attempt ~= nil then
            local seen = box.space.mts_attempts:get(attempt)
            if seen ~= nil then
                replayed = true
                if seen.fenced then
                    for i = 1, #messages do
                        results[i] = {0, false, FENCED, FENCED_REASON}
                    end
                else
                    results = seen.verdicts
                end
                return
            end
        end
        for i, m in ipairs(messages) do
            if late(m[IN.deadline_ns], now) then
                results[i] = {0, false, LATE, LATE_REASON}
            else
                local s = subjects[m[IN.subject]]
                if s == nil then
                    s = open_subject(m[IN.subject])
                    subjects[m[IN.subject]] = s
                end
                local ok, seq, duplicate = pcall(add_message, now, s, m[IN.headers], m[IN.data], nil,
                    m[IN.size], m[IN.sha256], m[IN.message_id], m[IN.window_ms])
                if ok then
                    results[i] = {seq, duplicate}
                else
                    local err = seq
                    local code = type(err) == 'cdata' and err.code or 0
                    results[i] = {0, false, code, tostring(err)}
                end
            end
        end
        for _, s in pairs(subjects) do
            close_subject(s)
        end
        if attempt ~= nil then
            box.space.mts_attempts:insert({attempt, now, false, results})
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

-- One stored message, or nil.
rawset(_G, 'mts_message', function(subject, seq)
    local message = box.space.mts_messages:get({subject, seq})
    if message == nil then
        return box.NULL
    end
    return message
end)

rawset(_G, 'mts_last_seq', function(subject)
    return last_seq(subject)
end)

-- Waits up to `seconds` for a commit on `subject` (or any other wake-up).
local function wait_commit(subject, seconds)
    local waiting = conds[subject]
    if waiting == nil then
        waiting = {cond = fiber.cond(), waiters = 0}
        conds[subject] = waiting
    end
    waiting.waiters = waiting.waiters + 1
    waiting.cond:wait(seconds)
    waiting.waiters = waiting.waiters - 1
    if waiting.waiters == 0 and conds[subject] == waiting then
        conds[subject] = nil
    end
end

-- Blocks until the subject's last sequence exceeds `after` or `timeout`
-- seconds pass; returns the last sequence either way.
rawset(_G, 'mts_wait', function(subject, after, timeout)
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
-- sequence <= floor is acked, every one in (floor, delivered] is acked or has
-- a row in mts_pending, every one > delivered was never handed out.
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
    }
end

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
        local first = box.space.mts_messages.index.ts:select(
            {subject, start_time_ns or 0}, {iterator = 'GE', limit = 1})[1]
        if first ~= nil and first.subject == subject then
            return first.seq - 1
        end
        return last_seq(subject)
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
    local start = start_point(subject, policy, cfg.start_seq, cfg.start_time_ns)
    row = box.space.mts_consumers:insert({
        subject, durable, start, now_ns(), start,
        cfg.ack_wait_ms or CONSUMER_DEFAULTS.ack_wait_ms,
        cfg.max_deliver or CONSUMER_DEFAULTS.max_deliver,
        cfg.max_ack_pending or CONSUMER_DEFAULTS.max_ack_pending,
        policy, cfg.start_seq or 0, cfg.start_time_ns or 0,
        cfg.dlq_subject or (subject .. '.dlq'),
    })
    return consumer_view(row)
end

-- Moves the floor up to just below the lowest pending sequence (or to
-- `delivered` when nothing is pending), and stores `delivered`.
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

local function pending_count(c)
    return box.space.mts_pending.index.primary:count({c.subject, c.durable})
end

-- Inside a transaction: publishes a copy of `message` to the consumer's
-- dead-letter subject (sharing its object, never copying it) and drops the
-- lease. Returns the dead-letter subject to notify, or nil.
local function dead_letter(c, message, deliveries)
    box.space.mts_pending:delete({c.subject, c.durable, message.seq})
    if c.dlq_subject == '' then
        return nil
    end
    local headers = {}
    for k, v in pairs(message.headers) do
        headers[k] = v
    end
    headers['mts-origin-subject'] = c.subject
    headers['mts-origin-sequence'] = decimal(message.seq)
    headers['mts-origin-durable'] = c.durable
    headers['mts-origin-delivery-count'] = decimal(deliveries)
    store_message(c.dlq_subject, headers, message.data, message.object_key, message.size, message.sha256)
    return c.dlq_subject
end

-- Inside a transaction: hands out up to `limit` messages to the consumer:
-- first those whose lease ran out or whose nack delay passed (dead-lettering
-- any that reached max_deliver), then new ones, never more than
-- max_ack_pending leased. Returns a list of {message tuple, delivery count,
-- lease deadline}, the earliest deadline still ahead (0 if none): when
-- redeliveries can next be due, and the dead-letter subjects to notify.
local function hand_out(subject, durable, limit)
    local out = {}
    local notify_subjects = {}
    local next_deadline = 0
    local c = ensure_consumer(subject, durable)
    local now = now_ns()
    local lease_end = after_ms(now, c.ack_wait_ms)
    local due = {}
    for _, p in box.space.mts_pending.index.deadline:pairs({subject, durable}, {iterator = 'GE'}) do
        if p.subject ~= subject or p.durable ~= durable then
            break
        end
        local deadline_ns = p.deadline_ns
        if deadline_ns > now then
            next_deadline = deadline_ns
            break
        end
        if #due >= limit then
            break
        end
        due[#due + 1] = p
    end
    for _, p in ipairs(due) do
        -- Each field read by name costs a lookup: once per row here.
        local seq, deliveries = p.seq, p.deliveries
        local message = box.space.mts_messages:get({subject, seq})
        if message == nil then
            -- Removed by retention while pending: nothing left to deliver.
            box.space.mts_pending:delete({subject, durable, seq})
        elseif c.max_deliver > 0 and deliveries >= c.max_deliver then
            local dlq = dead_letter(c, message, deliveries)
            if dlq ~= nil then
                notify_subjects[#notify_subjects + 1] = dlq
            end
        else
            box.space.mts_pending:update({subject, durable, seq}, {
                {'=', 'deliveries', deliveries + 1}, {'=', 'deadline_ns', lease_end},
            })
            out[#out + 1] = {message, deliveries + 1, lease_end}
        end
    end
    local room = limit - #out
    if c.max_ack_pending > 0 then
        room = min(room, c.max_ack_pending - pending_count(c))
    end
    if room > 0 then
        for _, message in box.space.mts_messages.index.primary:pairs({subject, c.delivered}, {iterator = 'GT'}) do
            if message.subject ~= subject or room <= 0 then
                break
            end
            local seq = message.seq
            box.space.mts_pending:insert({subject, durable, seq, 1, lease_end, now})
            out[#out + 1] = {message, 1, lease_end}
            c.delivered = seq
            room = room - 1
        end
    end
    if #out > 0 and (next_deadline == 0 or next_deadline > lease_end) then
        next_deadline = lease_end
    end
    settle_floor(c)
    return out, next_deadline, notify_subjects
end

-- Leases in one transaction, so competing fetchers get disjoint messages.
-- Returns what `hand_out` hands out and when redeliveries can next be due.
rawset(_G, 'mts_fetch', function(subject, durable, limit)
    local out, next_deadline, notify_subjects
    box.atomic(function()
        out, next_deadline, notify_subjects = hand_out(subject, durable, limit)
    end)
    for _, dlq in ipairs(notify_subjects) do
        notify(dlq)
    end
    return out, next_deadline
end)

-- Inside a transaction: the sequences of `seqs` that the consumer does not
-- hold; when there are none, they are all acknowledged (not yet settled).
local function ack_held(subject, durable, seqs)
    local missing = {}
    local exists = box.space.mts_consumers:get({subject, durable}) ~= nil
    for _, seq in ipairs(seqs) do
        if not exists or box.space.mts_pending:get({subject, durable, seq}) == nil then
            missing[#missing + 1] = seq
        end
    end
    if #missing == 0 then
        for _, seq in ipairs(seqs) do
            box.space.mts_pending:delete({subject, durable, seq})
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
local function consume(subject, durable, acks, limit, wait_ms)
    local missing, out, next_deadline, notify_subjects
    box.atomic(function()
        missing = ack_held(subject, durable, acks)
        if #missing == 0 then
            out, next_deadline, notify_subjects = hand_out(subject, durable, limit)
        end
    end)
    if #missing > 0 then
        return 'not_held', {}, 0, missing
    end
    local deadline = fiber.clock() + (wait_ms or 0) / 1000
    while #out == 0 do
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
        local more
        box.atomic(function()
            out, next_deadline, more = hand_out(subject, durable, limit)
        end)
        for _, dlq in ipairs(more) do
            notify_subjects[#notify_subjects + 1] = dlq
        end
    end
    for _, dlq in ipairs(notify_subjects) do
        notify(dlq)
    end
    return 'ok', out, next_deadline, {}
end

-- The Consume RPC's procedure. Schema 9 services call this name for Fetch,
-- as mts_consume(subject, durable, limit): a number where Consume passes
-- its acks, answered as mts_fetch would until schema 11 drops that form.
rawset(_G, 'mts_consume', function(subject, durable, acks, limit, wait_ms)
    if type(acks) ~= 'table' then
        return rawget(_G, 'mts_fetch')(subject, durable, acks)
    end
    return consume(subject, durable, acks, limit, wait_ms)
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
        floor = c.floor
    end)
    if #missing > 0 then
        return 'not_held', missing
    end
    return 'ok', floor
end)

-- Nacks: every sequence must be pending; each becomes deliverable again
-- after `delay_ms`. Returns 'ok' or 'not_held' and the missing sequences.
rawset(_G, 'mts_nack', function(subject, durable, seqs, delay_ms)
    local missing = {}
    box.atomic(function()
        for _, seq in ipairs(seqs) do
            if box.space.mts_pending:get({subject, durable, seq}) == nil then
                missing[#missing + 1] = seq
            end
        end
        if #missing > 0 then
            return
        end
        local at = after_ms(now_ns(), delay_ms)
        for _, seq in ipairs(seqs) do
            box.space.mts_pending:update({subject, durable, seq}, {{'=', 'deadline_ns', at}})
        end
    end)
    if #missing > 0 then
        return 'not_held', missing
    end
    return 'ok', {}
end)

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
        local held = {}
        for _, p in box.space.mts_pending.index.primary:pairs({subject, durable}, {iterator = 'GE'}) do
            if p.subject ~= subject or p.durable ~= durable or p.seq > seq then
                break
            end
            held[#held + 1] = p.seq
        end
        for _, s in ipairs(held) do
            box.space.mts_pending:delete({subject, durable, s})
        end
        c.delivered = max(c.delivered, seq)
        c.floor = max(c.floor, seq)
        settle_floor(c)
        floor = c.floor
    end)
    return 'ok', floor
end)

-- Gives back leases early (a consume stream that ended): the messages are
-- deliverable again at once, with their delivery count kept.
rawset(_G, 'mts_release', function(subject, durable, seqs)
    local now = now_ns()
    box.atomic(function()
        for _, seq in ipairs(seqs) do
            if box.space.mts_pending:get({subject, durable, seq}) ~= nil then
                box.space.mts_pending:update({subject, durable, seq}, {{'=', 'deadline_ns', now}})
            end
        end
    end)
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
        local ops = {}
        for _, field in ipairs({'ack_wait_ms', 'max_deliver', 'max_ack_pending', 'dlq_subject'}) do
            if cfg[field] ~= nil then
                ops[#ops + 1] = {'=', field, cfg[field]}
            end
        end
        if #ops > 0 then
            -- Rows from schema 1 lack the trailing fields; fill them first.
            local view = consumer_view(row)
            box.space.mts_consumers:update({subject, durable}, {
                {'=', 'delivered_seq', view.delivered}, {'=', 'ack_wait_ms', view.ack_wait_ms},
                {'=', 'max_deliver', view.max_deliver}, {'=', 'max_ack_pending', view.max_ack_pending},
                {'=', 'deliver_policy', view.deliver_policy}, {'=', 'start_seq', view.start_seq},
                {'=', 'start_time_ns', view.start_time_ns}, {'=', 'dlq_subject', view.dlq_subject},
            })
            box.space.mts_consumers:update({subject, durable}, ops)
        end
    end)
    return outcome
end)

-- Messages published and never delivered to consumer `c`, and the age in ns
-- of its oldest unacknowledged message (0 if none). Messages after the
-- first one still stored are contiguous: retention only removes the oldest.
local function backlog(c, last, now)
    local pending, age_ns = 0, 0
    local next_new = box.space.mts_messages.index.primary:select(
        {c.subject, c.delivered}, {iterator = 'GT', limit = 1})[1]
    if next_new ~= nil and next_new.subject == c.subject then
        pending = last - next_new.seq + 1
    end
    local oldest = box.space.mts_messages.index.primary:select(
        {c.subject, c.floor}, {iterator = 'GT', limit = 1})[1]
    if oldest ~= nil and oldest.subject == c.subject and now > oldest.ts_ns then
        age_ns = now - oldest.ts_ns
    end
    return pending, age_ns
end

-- The consumer's settings and state, exact at one instant; nil if it does
-- not exist.
rawset(_G, 'mts_consumer_info', function(subject, durable)
    local row = box.space.mts_consumers:get({subject, durable})
    if row == nil then
        return box.NULL
    end
    local c = consumer_view(row)
    local now = now_ns()
    local last = last_seq(subject)
    local ack_pending, redelivered = 0, 0
    for _, p in box.space.mts_pending.index.primary:pairs({subject, durable}, {iterator = 'GE'}) do
        if p.subject ~= subject or p.durable ~= durable then
            break
        end
        ack_pending = ack_pending + 1
        if p.deliveries > 1 then
            redelivered = redelivered + 1
        end
    end
    local num_pending, oldest_unacked_age_ns = backlog(c, last, now)
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
        oldest_unacked_age_ns = oldest_unacked_age_ns,
        last_seq = last,
    }
end)

-- Lag of up to `limit` consumers, for gauges: {subject, durable, pending
-- (never delivered), ack_pending (delivered, not acked), oldest unacked age
-- in ms}.
rawset(_G, 'mts_consumers_lag', function(limit)
    local out = {}
    local now = now_ns()
    for _, row in box.space.mts_consumers:pairs() do
        if #out >= limit then
            break
        end
        local c = consumer_view(row)
        local last = last_seq(c.subject)
        local pending, age_ns = backlog(c, last, now)
        out[#out + 1] = {c.subject, c.durable, pending, pending_count(c), tonumber(age_ns / 1000000)}
    end
    return out
end)

-- Deletes a consumer and its leases. Returns whether it existed.
rawset(_G, 'mts_delete_consumer', function(subject, durable)
    local existed = false
    box.atomic(function()
        existed = box.space.mts_consumers:delete({subject, durable}) ~= nil
        local seqs = {}
        for _, p in box.space.mts_pending.index.primary:pairs({subject, durable}, {iterator = 'GE'}) do
            if p.subject ~= subject or p.durable ~= durable then
                break
            end
            seqs[#seqs + 1] = p.seq
        end
        for _, seq in ipairs(seqs) do
            box.space.mts_pending:delete({subject, durable, seq})
        end
    end)
    return existed
end)

------------------------------------------------------------------------------
-- Retention: per-subject limits on age, count and bytes, enforced from the
-- oldest message forward in bounded steps.
------------------------------------------------------------------------------

-- Sets a subject's limits (a map of max_age_ms, max_messages, max_bytes; 0 =
-- unlimited), creating the subject row if it has never been published to.
rawset(_G, 'mts_set_subject_limits', function(subject, limits)
    box.atomic(function()
        if box.space.mts_subjects:get(subject) == nil then
            box.space.mts_subjects:insert({subject, 0, 0, 0})
        end
        local ops = {}
        for _, field in ipairs({'max_age_ms', 'max_messages', 'max_bytes'}) do
            if limits[field] ~= nil then
                ops[#ops + 1] = {'=', field, limits[field]}
            end
        end
        if #ops > 0 then
            -- Later fields can only be set once the earlier ones exist.
            local row = box.space.mts_subjects:get(subject)
            box.space.mts_subjects:update({subject}, {
                {'=', 'max_age_ms', row.max_age_ms or box.NULL},
                {'=', 'max_messages', row.max_messages or box.NULL},
                {'=', 'max_bytes', row.max_bytes or box.NULL},
            })
            box.space.mts_subjects:update({subject}, ops)
        end
    end)
    return true
end)

-- What is stored for a subject, and its limits (nil = the service default).
rawset(_G, 'mts_subject_info', function(subject)
    local row = box.space.mts_subjects:get(subject)
    if row == nil then
        return {subject = subject, first_seq = 0, last_seq = 0, count = 0, bytes = 0}
    end
    local first = box.space.mts_messages.index.primary:select({subject}, {iterator = 'EQ', limit = 1})[1]
    return {
        subject = subject,
        first_seq = first and first.seq or 0,
        last_seq = row.last_seq,
        count = row.count or 0,
        bytes = row.bytes or 0,
        max_age_ms = row.max_age_ms,
        max_messages = row.max_messages,
        max_bytes = row.max_bytes,
    }
end)

-- Inside a transaction: removes a message's metadata and, when no other
-- message shares its object, queues the object for deletion.
local function remove_message(m)
    box.space.mts_messages:delete({m.subject, m.seq})
    box.space.mts_subjects:update({m.subject}, {{'-', 'count', 1}, {'-', 'bytes', m.size}})
    local key = m.object_key
    if key ~= nil and box.space.mts_messages.index.object_key:select({key}, {limit = 1})[1] == nil then
        box.space.mts_gc:replace({key, now_ns()})
    end
end

-- nil for both nil and box.NULL (which is truthy in Lua).
local function present(value)
    if value == nil then
        return nil
    end
    return value
end

-- Whether the oldest message `m` of a subject with these limits must go.
local function expired(m, row, limits, now)
    local max_age = present(row.max_age_ms) or limits.max_age_ms or 0
    local max_messages = present(row.max_messages) or limits.max_messages or 0
    local max_bytes = present(row.max_bytes) or limits.max_bytes or 0
    return (max_messages > 0 and row.count > max_messages)
        or (max_bytes > 0 and row.bytes > max_bytes)
        or (max_age > 0 and older_than(m.ts_ns, now, max_age))
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
                local oldest = box.space.mts_messages.index.primary:select({subject}, {iterator = 'EQ', limit = 1})[1]
                if oldest == nil or not expired(oldest, row, limits, now) then
                    break
                end
                remove_message(oldest)
                deleted = deleted + 1
                row = box.space.mts_subjects:get(subject)
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
    local found = box.space.mts_messages.index.object_key:select({object_key}, {limit = 1})
    if #found > 0 then
        return found[1].seq
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
            if box.space.mts_messages.index.object_key:select({key}, {limit = 1})[1] == nil then
                box.space.mts_abandoned:replace({key, now_ns()})
                orphans[#orphans + 1] = key
            end
        end
    end)
    return orphans
end)

-- Backups. mts_backup_start holds object deletions for `hold_ms`, takes a
-- checkpoint and pins its files (box.backup.start) until mts_backup_stop;
-- mts_backup_read hands them out in base64 chunks, so a backup needs no
-- access to Tarantool's disk; mts_backup_keys pages through every object key
-- the checkpoint may name: those of stored messages and those deleted since
-- (waiting in mts_gc, which the hold keeps).
local backup_files = rawget(_G, 'mts_backup_files') or {}
rawset(_G, 'mts_backup_files', backup_files)

rawset(_G, 'mts_backup_start', function(hold_ms)
    box.space.mts_leases:replace({BACKUP_HOLD, 'backup', after_ms(now_ns(), hold_ms)})
    for attempt = 1, 100 do
        local ok, err = pcall(box.snapshot)
        if ok then
            break
        end
        -- Another checkpoint (the periodic one) is running: wait it out.
        if attempt == 100 or not tostring(err):find('in progress') then
            box.space.mts_leases:delete(BACKUP_HOLD)
            error(err)
        end
        fiber.sleep(0.1)
    end
    local ok, paths = pcall(box.backup.start)
    if not ok then
        box.space.mts_leases:delete(BACKUP_HOLD)
        error(paths)
    end
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

rawset(_G, 'mts_backup_renew', function(hold_ms)
    box.space.mts_leases:replace({BACKUP_HOLD, 'backup', after_ms(now_ns(), hold_ms)})
    return true
end)

rawset(_G, 'mts_backup_read', function(name, offset, length)
    local path = backup_files[name]
    if path == nil then
        box.error(box.error.PROC_LUA, 'no backup file ' .. tostring(name) .. ' (call mts_backup_start first)')
    end
    local file, err = fio.open(path, {'O_RDONLY'})
    if file == nil then
        box.error(box.error.PROC_LUA, 'cannot open ' .. path .. ': ' .. tostring(err))
    end
    local chunk = file:pread(length, offset)
    file:close()
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
    local last = after
    for _, m in box.space.mts_messages.index.object_key:pairs({after}, {iterator = 'GT'}) do
        if #keys >= limit then
            break
        end
        -- The index is not unique; a key shows once.
        if m.object_key ~= last then
            keys[#keys + 1] = {m.object_key, m.size}
            last = m.object_key
        end
    end
    return keys
end)

rawset(_G, 'mts_backup_stop', function()
    for k in pairs(backup_files) do
        backup_files[k] = nil
    end
    pcall(box.backup.stop)
    box.space.mts_leases:delete(BACKUP_HOLD)
    return true
end)

-- The names schema 9 gave procedures that are now named after their RPC, for
-- services of that version during a rolling upgrade; each means exactly what
-- its new name does (and mts_consume still answers schema 9's Fetch calls).
-- To go in schema 11.
local SCHEMA_9_NAMES = {
    mts_ack_consume = 'mts_consume',
    mts_ack = 'mts_ack_message',
    mts_ack_each = 'mts_ack_sequences',
    mts_consumer_put = 'mts_create_or_update_consumer',
    mts_consumer_delete = 'mts_delete_consumer',
    mts_subject_limits = 'mts_set_subject_limits',
}
for old, new in pairs(SCHEMA_9_NAMES) do
    rawset(_G, old, rawget(_G, new))
end

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
        'mts_settle_attempt', 'mts_identity',
        'mts_backup_start', 'mts_backup_renew', 'mts_backup_read', 'mts_backup_keys', 'mts_backup_stop',
    }
    for old in pairs(SCHEMA_9_NAMES) do
        PROCEDURES[#PROCEDURES + 1] = old
    end
    box.schema.role.create('minitoolstream', {if_not_exists = true})
    for _, name in ipairs(PROCEDURES) do
        box.schema.func.create(name, {if_not_exists = true})
        box.schema.role.grant('minitoolstream', 'execute', 'function', name, {if_not_exists = true})
    end
    for _, space in ipairs({
        'mts_subjects', 'mts_messages', 'mts_consumers', 'mts_pending', 'mts_abandoned', 'mts_gc', 'mts_leases',
        'mts_dedup', 'mts_attempts', 'mts_identity',
    }) do
        box.schema.role.grant('minitoolstream', 'read,write', 'space', space, {if_not_exists = true})
    end
end)

return SCHEMA_VERSION
