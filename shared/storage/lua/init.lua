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
local schema = os.getenv('MTS_SCHEMA_FILE') or '/opt/minitoolstream/minitoolstream.lua'
local password = os.getenv('TARANTOOL_PASSWORD')
if password == nil or password == '' then
    error('TARANTOOL_PASSWORD must be set')
end
local user = os.getenv('TARANTOOL_USER') or 'minitoolstream_connector'

box.cfg({
    work_dir = os.getenv('TARANTOOL_WORK_DIR') or '/var/lib/tarantool',
    memtx_memory = tonumber(os.getenv('TARANTOOL_MEMTX_MEMORY')) or 512 * 1024 * 1024,
    log = os.getenv('TARANTOOL_LOG'),
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

dofile(schema)

box.schema.user.create(user, {password = password, if_not_exists = true})
-- Follow the Secret when it changes.
box.schema.user.passwd(user, password)
box.schema.user.grant(user, 'execute', 'role', 'minitoolstream', {if_not_exists = true})

local extra = os.getenv('TARANTOOL_INIT_EXTRA')
if extra ~= nil and extra ~= '' then
    dofile(extra)
end

box.cfg({listen = os.getenv('TARANTOOL_LISTEN') or '0.0.0.0:3301'})
