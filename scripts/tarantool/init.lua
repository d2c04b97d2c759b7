-- Tarantool instance for local runs (scripts/up.sh) and tests
-- (scripts/test.sh, shared::testing). Listens where MTS_TARANTOOL_LISTEN
-- says, keeps its WAL and snapshots in MTS_TARANTOOL_DIR and creates the
-- user the services connect as. The schema itself is applied by the services
-- from shared/storage/lua/minitoolstream.lua.
-- Listening starts only after the user exists, so a client that sees the
-- port open can log in.
box.cfg({
    work_dir = os.getenv('MTS_TARANTOOL_DIR') or '.',
    log = 'tarantool.log',
    memtx_memory = (tonumber(os.getenv('MTS_TARANTOOL_MEMTX_MB')) or 256) * 1024 * 1024,
    -- Every commit reaches the WAL file before the publish is answered.
    wal_mode = 'write',
    -- Requests in flight at once. Commit waits (subject watchers, busy Consume
    -- streams) each hold one until a commit or their timeout; the default of
    -- 768 is tight with ten egress replicas.
    net_msg_max = 4096,
    checkpoint_interval = 600,
})

box.once('minitoolstream-local-user', function()
    box.schema.user.create('minitoolstream_connector', {
        password = os.getenv('MTS_TARANTOOL_PASSWORD') or 'minitoolstream',
        if_not_exists = true,
    })
    -- Local instances only: the services apply the schema with eval, which
    -- needs these rights. Production grants are in the Kubernetes manifests.
    box.schema.user.grant('minitoolstream_connector', 'read,write,execute,create,alter,drop',
        'universe', nil, {if_not_exists = true})
end)

box.cfg({listen = os.getenv('MTS_TARANTOOL_LISTEN') or '127.0.0.1:3301'})
