-- MiniToolStream schema and stored procedures: the one source of truth for
-- what lives in Tarantool. Idempotent: the services apply it with `eval` at
-- start-up and again whenever Tarantool restarts (global Lua functions do not
-- survive a restart, spaces do); a Tarantool init script may also `dofile` it.
-- Written for Tarantool 2.6 and later (no MVCC, streams or box.watch needed):
-- every multi-step write runs inside one stored procedure, in one transaction.

local fiber = require('fiber')
local clock = require('clock')

local SCHEMA_VERSION = 1
local MAP = {__serialize = 'map'}

box.schema.space.create('mts_subjects', {
    if_not_exists = true,
    format = {
        {name = 'name', type = 'string'},
        -- Highest sequence ever assigned; never lowered, so never reused.
        {name = 'last_seq', type = 'unsigned'},
    },
})
box.space.mts_subjects:create_index('primary', {parts = {'name'}, if_not_exists = true})

box.schema.space.create('mts_messages', {
    if_not_exists = true,
    format = {
        {name = 'subject', type = 'string'},
        {name = 'seq', type = 'unsigned'},
        {name = 'ts_ns', type = 'unsigned'},
        {name = 'headers', type = 'map'},
        -- Inline payload; nil when the payload lives in the object store.
        {name = 'data', type = 'any', is_nullable = true},
        {name = 'object_key', type = 'string', is_nullable = true},
        {name = 'size', type = 'unsigned'},
    },
})
box.space.mts_messages:create_index('primary', {parts = {'subject', 'seq'}, if_not_exists = true})
box.space.mts_messages:create_index('object_key', {
    parts = {{field = 'object_key', type = 'string', is_nullable = true}},
    unique = false,
    if_not_exists = true,
})

box.schema.space.create('mts_consumers', {
    if_not_exists = true,
    format = {
        {name = 'subject', type = 'string'},
        {name = 'durable', type = 'string'},
        -- Everything up to and including ack_seq is acknowledged.
        {name = 'ack_seq', type = 'unsigned'},
        {name = 'created_ns', type = 'unsigned'},
    },
})
box.space.mts_consumers:create_index('primary', {parts = {'subject', 'durable'}, if_not_exists = true})

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
    return row[2]
end

local function consumer_ack(subject, durable)
    local row = box.space.mts_consumers:get({subject, durable})
    if row == nil then
        return nil
    end
    return row[3]
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
    -- A role with exactly what the services need, so a production user can be
-- granted it instead of universe rights (the Kubernetes init does that).
local PROCEDURES = {
    'mts_schema_version', 'mts_publish', 'mts_last_seq', 'mts_wait', 'mts_subscribe',
    'mts_fetch', 'mts_ack', 'mts_settle_object',
}
box.schema.role.create('minitoolstream', {if_not_exists = true})
for _, name in ipairs(PROCEDURES) do
    box.schema.func.create(name, {if_not_exists = true})
    box.schema.role.grant('minitoolstream', 'execute', 'function', name, {if_not_exists = true})
end
for _, space in ipairs({'mts_subjects', 'mts_messages', 'mts_consumers', 'mts_abandoned'}) do
    box.schema.role.grant('minitoolstream', 'read,write', 'space', space, {if_not_exists = true})
end

return SCHEMA_VERSION
end)

-- Assigns the next sequence of `subject` and stores the message in the same
-- transaction, so sequences are gap-free and in commit order. `deadline_ns`
-- (wall clock) is when the caller stops waiting: a request that arrives later
-- (held back by a reconnecting client, say) is refused rather than stored
-- behind the back of a publisher that was told it failed.
rawset(_G, 'mts_publish', function(subject, headers, data, object_key, size, deadline_ns)
    if deadline_ns ~= nil and deadline_ns > 0 and now_ns() > deadline_ns then
        box.error({
            reason = 'publish reached Tarantool after its deadline; nothing was stored'
                .. ' (if this persists, check clock sync between the services and Tarantool)',
            code = 10002,
        })
    end
    if object_key ~= nil and box.space.mts_abandoned:get(object_key) ~= nil then
        box.error({reason = 'object ' .. object_key .. ' was abandoned; publish again', code = 10001})
    end
    local seq
    box.atomic(function()
        seq = last_seq(subject) + 1
        box.space.mts_subjects:replace({subject, seq})
        box.space.mts_messages:insert({
            subject, seq, now_ns(), setmetatable(headers or {}, MAP), data, object_key, size,
        })
    end)
    notify(subject)
    return seq
end)

rawset(_G, 'mts_last_seq', function(subject)
    return last_seq(subject)
end)

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
        local waiting = conds[subject]
        if waiting == nil then
            waiting = {cond = fiber.cond(), waiters = 0}
            conds[subject] = waiting
        end
        waiting.waiters = waiting.waiters + 1
        waiting.cond:wait(remaining)
        waiting.waiters = waiting.waiters - 1
        if waiting.waiters == 0 and conds[subject] == waiting then
            conds[subject] = nil
        end
    end
end)

-- Creates the durable on first use; a new durable starts at start_seq - 1.
-- Returns the point after which the subscriber has not been told of
-- messages, and the subject's last sequence.
rawset(_G, 'mts_subscribe', function(subject, durable, start_seq)
    local from = 0
    if start_seq > 0 then
        from = start_seq - 1
    end
    local ack = consumer_ack(subject, durable)
    if ack == nil then
        ack = from
        box.space.mts_consumers:insert({subject, durable, ack, now_ns()})
    end
    return math.max(ack, from), last_seq(subject)
end)

-- Up to `limit` messages after the durable's ack position, in order. Returns
-- whole tuples so binary payloads go back on the wire untouched.
rawset(_G, 'mts_fetch', function(subject, durable, limit)
    local ack = consumer_ack(subject, durable) or 0
    local out = {}
    if limit <= 0 then
        return ack, out
    end
    for _, t in box.space.mts_messages.index.primary:pairs({subject, ack}, {iterator = 'GT'}) do
        if t[1] ~= subject then
            break
        end
        out[#out + 1] = t
        if #out >= limit then
            break
        end
    end
    return ack, out
end)

-- Cumulative ack: moves the durable's position forward to `seq`, never back.
-- Returns a status ('ok' | 'beyond_last'), the position and the last sequence.
rawset(_G, 'mts_ack', function(subject, durable, seq)
    local last = last_seq(subject)
    if seq > last then
        return 'beyond_last', consumer_ack(subject, durable) or 0, last
    end
    local ack = consumer_ack(subject, durable)
    if ack == nil then
        box.space.mts_consumers:insert({subject, durable, seq, now_ns()})
        return 'ok', seq, last
    end
    if seq > ack then
        box.space.mts_consumers:update({subject, durable}, {{'=', 3, seq}})
        ack = seq
    end
    return 'ok', ack, last
end)

-- Settles a publish whose commit outcome is unknown: returns the sequence if
-- the object's metadata was committed, otherwise marks the key abandoned (so
-- a late commit is refused) and returns 0.
rawset(_G, 'mts_settle_object', function(object_key)
    local found = box.space.mts_messages.index.object_key:select({object_key}, {limit = 1})
    if #found > 0 then
        return found[1][2]
    end
    box.space.mts_abandoned:replace({object_key, now_ns()})
    return 0
end)

-- A role with exactly what the services need, so a production user can be
-- granted it instead of universe rights (the Kubernetes init does that).
local PROCEDURES = {
    'mts_schema_version', 'mts_publish', 'mts_last_seq', 'mts_wait', 'mts_subscribe',
    'mts_fetch', 'mts_ack', 'mts_settle_object',
}
box.schema.role.create('minitoolstream', {if_not_exists = true})
for _, name in ipairs(PROCEDURES) do
    box.schema.func.create(name, {if_not_exists = true})
    box.schema.role.grant('minitoolstream', 'execute', 'function', name, {if_not_exists = true})
end
for _, space in ipairs({'mts_subjects', 'mts_messages', 'mts_consumers', 'mts_abandoned'}) do
    box.schema.role.grant('minitoolstream', 'read,write', 'space', space, {if_not_exists = true})
end

return SCHEMA_VERSION
