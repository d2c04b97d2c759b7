-- The Tarantool instance init, the one every deployment uses: Kubernetes,
-- docker-compose, scripts/up.sh and the tests. WAL and snapshots in the work
-- directory, the MiniToolStream schema loaded from minitoolstream.lua (the
-- file the services carry), the service user created with the
-- `minitoolstream` role only, and the port opened last, so that a client
-- that can connect finds the procedures and its user in place.
--
-- Environment: TARANTOOL_PASSWORD (required), TARANTOOL_USER, TARANTOOL_LISTEN,
-- TARANTOOL_WORK_DIR, TARANTOOL_MEMTX_MEMORY (bytes), TARANTOOL_LOG (a file;
-- unset = stderr), MTS_SCHEMA_FILE (the schema's path) and
-- TARANTOOL_INIT_EXTRA: a Lua file of the operator's own, run just before the
-- port opens (extra users, say).
--
-- A replica set (see "High availability" in the README): TARANTOOL_REPLICATION,
-- the members' addresses (host:port, comma-separated, this one's included);
-- TARANTOOL_REPLICATION_PASSWORD, the `replicator` user's; TARANTOOL_READ_ONLY
-- = true on every member but the one that takes writes; and
-- TARANTOOL_SYNCHRO_QUORUM, how many members (this one included) must have a
-- write before it commits (2 of 3): then every write of the schema is a
-- synchronous transaction (mts_make_sync), and no publish is answered before
-- the quorum has it. A member of a replica set opens its port first, as its
-- peers need it to join; the services wait for the schema version before they
-- use a member.
-- TARANTOOL_ELECTION_MODE (Tarantool 2.11+, Kubernetes): 'candidate' lets the
-- members elect the one that takes writes (TARANTOOL_READ_ONLY is then
-- ignored); whichever is elected applies the schema's DDL and users.
local schema = os.getenv('MTS_SCHEMA_FILE') or '/opt/minitoolstream/minitoolstream.lua'
local password = os.getenv('TARANTOOL_PASSWORD')
if password == nil or password == '' then
    error('TARANTOOL_PASSWORD must be set')
end
local user = os.getenv('TARANTOOL_USER') or 'minitoolstream_connector'

local listen = os.getenv('TARANTOOL_LISTEN') or '0.0.0.0:3301'
local replication, peers = nil, os.getenv('TARANTOOL_REPLICATION')
local replicator_password = os.getenv('TARANTOOL_REPLICATION_PASSWORD')
if peers ~= nil and peers ~= '' then
    if replicator_password == nil or replicator_password == '' then
        error('TARANTOOL_REPLICATION_PASSWORD must be set with TARANTOOL_REPLICATION')
    end
    replication = {}
    for peer in peers:gmatch('[^,%s]+') do
        replication[#replication + 1] = 'replicator:' .. replicator_password .. '@' .. peer
    end
end
local synchro_quorum = tonumber(os.getenv('TARANTOOL_SYNCHRO_QUORUM')) or 1
local election_mode = os.getenv('TARANTOOL_ELECTION_MODE')
if election_mode == '' then
    election_mode = nil
end

local function version_before(major, minor, patch)
    local a, b, c = _TARANTOOL:match('^(%d+)%.(%d+)%.(%d+)')
    local have, want = {tonumber(a), tonumber(b), tonumber(c)}, {major, minor, patch}
    for i = 1, 3 do
        if have[i] ~= want[i] then
            return have[i] < want[i]
        end
    end
    return false
end

-- Tarantool 2.6.0 cannot recover a snapshot holding rows of a synchronous
-- space (tarantool#5298, fixed in 2.6.1); schema 16 made every space of the
-- schema synchronous, and its members' snapshots have such rows. While the
-- files are read, the schema's spaces other than mts_sync are taken as
-- asynchronous, as the schema has them since (mts_make_sync).
local recovering = nil
if version_before(2, 6, 1) then
    recovering = function(_, new)
        local name, flags = new ~= nil and new[3], new ~= nil and new[6]
        if type(name) == 'string' and name:sub(1, 4) == 'mts_' and name ~= 'mts_sync'
            and type(flags) == 'table' and flags.is_sync then
            local async = {}
            for k, v in pairs(flags) do
                async[k] = v
            end
            async.is_sync = nil
            return new:update({{'=', 6, setmetatable(async, {__serialize = 'map'})}})
        end
    end
    box.ctl.on_schema_init(function()
        box.space._space:before_replace(recovering)
    end)
end

box.cfg({
    work_dir = os.getenv('TARANTOOL_WORK_DIR') or '/var/lib/tarantool',
    memtx_memory = tonumber(os.getenv('TARANTOOL_MEMTX_MEMORY')) or 512 * 1024 * 1024,
    log = os.getenv('TARANTOOL_LOG'),
    listen = replication ~= nil and listen or nil,
    replication = replication,
    read_only = election_mode == nil and os.getenv('TARANTOOL_READ_ONLY') == 'true',
    election_mode = election_mode,
    replication_synchro_quorum = synchro_quorum,
    -- A write the quorum has not confirmed in this long is rolled back and
    -- its publish answered UNAVAILABLE (not stored).
    replication_synchro_timeout = tonumber(os.getenv('TARANTOOL_SYNCHRO_TIMEOUT')) or 5,
    -- A member starts with the peers it can reach; one that is down is
    -- caught up when it is back.
    replication_connect_quorum = replication ~= nil and 1 or nil,
    replication_connect_timeout = 5,
    -- Every commit reaches the WAL file before a publish is answered.
    wal_mode = 'write',
    -- Requests in flight at once. Commit waits (subject watchers, busy Consume
    -- streams) each hold one until a commit or their timeout; the default of
    -- 768 is tight with ten egress replicas.
    net_msg_max = 4096,
    checkpoint_interval = 3600,
    checkpoint_count = 2,
    log_format = 'json',
})

if recovering ~= nil then
    box.space._space:before_replace(nil, recovering)
end

-- On a read-only member the schema only defines the procedures: its spaces,
-- users and grants come from the member that takes writes.
dofile(schema)

-- What the member that takes writes sets up: users, and synchronous spaces.
local function set_up()
    box.schema.user.create(user, {password = password, if_not_exists = true})
    -- Follow the Secret when it changes.
    box.schema.user.passwd(user, password)
    box.schema.user.grant(user, 'execute', 'role', 'minitoolstream', {if_not_exists = true})
    if replication ~= nil then
        box.schema.user.create('replicator', {password = replicator_password, if_not_exists = true})
        box.schema.user.passwd('replicator', replicator_password)
        box.schema.user.grant('replicator', 'replication', nil, nil, {if_not_exists = true})
    end
    if synchro_quorum > 1 then
        mts_make_sync()
    end
end

if not box.info.ro then
    set_up()
elseif election_mode ~= nil then
    -- Elected later (or after a failover): the new leader makes sure of the
    -- schema and users then, as the first one did.
    require('fiber').create(function()
        while true do
            box.ctl.wait_rw()
            local ok, err = pcall(function()
                dofile(schema)
                set_up()
            end)
            if not ok then
                require('log').error('setting up after the election failed: %s', tostring(err))
            end
            box.ctl.wait_ro()
        end
    end)
end

-- Tarantool before 2.6.1 writes a second CONFIRM for a write when the member
-- acknowledging it after the quorum does (tarantool#5144, fixed in 2.6.1),
-- and that CONFIRM wakes every waiting transaction, some still in their WAL
-- write: those never count an acknowledgement, wait out the synchro timeout
-- and are rolled back, and under load a rollback after a CONFIRM stops the
-- followers. There, the member that takes writes keeps the quorum at every
-- member in step with it (never below TARANTOOL_SYNCHRO_QUORUM), so that the
-- last acknowledgement of a write is the one that confirms it. A follower
-- counts once it has what the leader had when it appeared, and stops counting
-- when its connection ends; a read-only member goes back to the configured
-- quorum, which a failover's clear_synchro_queue() uses.
local function keep_quorum(floor)
    local fiber, log = require('fiber'), require('log')
    local joined = {} -- follower uuid -> the leader's LSN when it appeared
    local counted = {} -- follower uuid -> true once it has that LSN
    while true do
        local ok, err = pcall(function()
            local want = floor
            if box.info.ro then
                joined, counted = {}, {}
            else
                local me, lsn, members = box.info.id, box.info.lsn, 1
                for _, member in pairs(box.info.replication) do
                    local down = member.downstream
                    if member.id ~= me and down ~= nil and down.status == 'follow' then
                        joined[member.uuid] = joined[member.uuid] or lsn
                        local acked = down.vclock ~= nil and down.vclock[me] or 0
                        if acked >= joined[member.uuid] then
                            counted[member.uuid] = true
                        end
                        if counted[member.uuid] then
                            members = members + 1
                        end
                    else
                        joined[member.uuid], counted[member.uuid] = nil, nil
                    end
                end
                want = math.max(floor, members)
            end
            if box.cfg.replication_synchro_quorum ~= want then
                log.info('synchronous quorum %d (members in step with the leader)', want)
                box.cfg({replication_synchro_quorum = want})
            end
        end)
        if not ok then
            log.error('keeping the synchronous quorum failed: %s', tostring(err))
        end
        fiber.sleep(0.02)
    end
end

if synchro_quorum > 1 and election_mode == nil and version_before(2, 6, 1) then
    require('fiber').create(keep_quorum, synchro_quorum)
end

local extra = os.getenv('TARANTOOL_INIT_EXTRA')
if extra ~= nil and extra ~= '' then
    dofile(extra)
end

box.cfg({listen = listen})
