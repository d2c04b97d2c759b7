//! Test support: the real Tarantool and S3 server that `scripts/test.sh`
//! started, a Tarantool process a test owns (to kill and restart it), and
//! waiting for a service to report SERVING. Tests build `Config` values here;
//! they read the environment `scripts/test.sh` set but never change it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mts_config::Config;

/// The Tarantool init every deployment runs, tests included: the schema
/// loaded, the service user with the `minitoolstream` role only.
pub const TARANTOOL_INIT: &str = include_str!("../../storage/lua/init.lua");

/// A user with every right, which test Tarantools have besides the service
/// user, for tests that inspect Tarantool or break it on purpose.
pub const ADMIN_USER: &str = "mts_test_admin";

/// The admin's password in the Tarantools tests start themselves.
const OWN_ADMIN_PASSWORD: &str = "mts-test-admin";

/// The Lua that creates the admin user, run by the init before it listens.
fn admin_lua(password: &str) -> String {
    format!(
        "box.schema.user.create('{ADMIN_USER}', {{password = '{password}', if_not_exists = true}})\n\
         box.schema.user.grant('{ADMIN_USER}', 'read,write,execute,create,alter,drop', 'universe', nil, {{if_not_exists = true}})\n"
    )
}

/// An admin connection to the Tarantool at `address`.
async fn admin_at(address: &str, password: &str) -> tarant::Client {
    tarant::Client::connect(&format!("tarantool://{ADMIN_USER}:{password}@{address}"))
        .await
        .expect("connect to Tarantool as the test admin")
}

/// An admin connection to the Tarantool that `scripts/test.sh` started.
pub async fn admin_client() -> tarant::Client {
    admin_at(
        &required("MTS_TEST_TARANTOOL_ADDRESS"),
        &required("MTS_TEST_TARANTOOL_ADMIN_PASSWORD"),
    )
    .await
}

fn required(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests with scripts/test.sh, which starts Tarantool and an S3 server")
    })
}

/// A service config pointing at the test Tarantool and S3 server, listening
/// on an ephemeral port.
pub fn config() -> Config {
    let mut config = Config::defaults(0);
    config.server.host = "127.0.0.1".into();
    config.tarantool.address = required("MTS_TEST_TARANTOOL_ADDRESS");
    config.tarantool.user = required("MTS_TEST_TARANTOOL_USER");
    config.tarantool.password = required("MTS_TEST_TARANTOOL_PASSWORD");
    config.object_store.endpoint = required("MTS_TEST_S3_ENDPOINT");
    config.object_store.access_key_id = required("MTS_TEST_S3_ACCESS_KEY");
    config.object_store.secret_access_key = required("MTS_TEST_S3_SECRET_KEY");
    config.object_store.bucket_name = required("MTS_TEST_S3_BUCKET");
    config.telemetry.log_format = mts_config::LogFormat::Console;
    config.lifecycle.health_check_interval_ms = 200;
    config.server.metrics_port = 0;
    config.lifecycle.startup_timeout_seconds = 20;
    config
}

/// A subject no other test uses.
pub fn unique_subject(prefix: &str) -> String {
    format!("test.{prefix}.{}", uuid::Uuid::now_v7().simple())
}

/// Waits until the gRPC health of `service` at `addr` is SERVING.
pub async fn wait_serving(addr: SocketAddr, service: &str, within: Duration) {
    wait_status(addr, service, true, within).await;
}

/// Waits until the gRPC health of `service` at `addr` is (or is not) SERVING.
pub async fn wait_status(addr: SocketAddr, service: &str, serving: bool, within: Duration) {
    wait_status_over(addr, None, service, serving, within).await;
}

/// `wait_status` over TLS (`tls` Some) or plaintext.
pub async fn wait_status_over(
    addr: SocketAddr,
    tls: Option<&tonic::transport::ClientTlsConfig>,
    service: &str,
    serving: bool,
    within: Duration,
) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let deadline = Instant::now() + within;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        let channel = match tls {
            None => tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .expect("valid endpoint"),
            Some(tls) => tonic::transport::Endpoint::from_shared(format!(
                "https://localhost:{}",
                addr.port()
            ))
            .expect("valid endpoint")
            .tls_config(tls.clone())
            .expect("client TLS config"),
        }
        .connect()
        .await;
        if let Err(err) = &channel {
            last = format!("cannot connect: {err:?}");
        }
        if let Ok(channel) = channel {
            let mut client = HealthClient::new(channel);
            match client
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
            {
                Ok(reply) => {
                    let status = reply.into_inner().status;
                    if (status == ServingStatus::Serving as i32) == serving {
                        return;
                    }
                    last = format!("status {status}");
                }
                Err(status) => last = status.to_string(),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{service} at {addr} did not become serving={serving} within {within:?}: {last}");
}

/// Polls `check` until it holds, for at most 20 s.
pub async fn eventually<F: Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The body of `GET /metrics` on a service's admin port.
pub async fn scrape_metrics(port: u16) -> String {
    let (status, body) = http_get(port, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

/// GET `path` from 127.0.0.1:`port`: the status code and the body.
pub async fn http_get(port: u16, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the admin port");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read the response");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response}"));
    (status, body.to_owned())
}

/// A port that was free a moment ago, never handed out before by this
/// process, and below the ephemeral range (32768 on): a process a test stops
/// and starts again on its port would otherwise find it taken by another
/// test's listener or by the source port of an outgoing connection.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..10_000 {
        let port = rand::random_range(20_000..32_000);
        if handed_out.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.push(port);
            return port;
        }
    }
    panic!("no free port in 20000-32000")
}

/// A Tarantool process owned by one test, on its own port and data
/// directory, that the test can crash and start again.
pub struct TarantoolProcess {
    dir: PathBuf,
    port: u16,
    memtx_bytes: u64,
    child: Option<Child>,
    /// Environment of a replica set member (see `ReplicaSet`).
    member_env: Vec<(String, String)>,
}

impl TarantoolProcess {
    /// Starts Tarantool on a free port with its data under a new directory.
    pub fn start() -> Self {
        Self::start_with_memtx(256 << 20)
    }

    /// As `start`, with `memtx_bytes` of memory for data.
    pub fn start_with_memtx(memtx_bytes: u64) -> Self {
        let mut process = Self::prepare(memtx_bytes, free_port());
        process.spawn();
        process
    }

    /// A process on `port`, its files written, not started.
    fn prepare(memtx_bytes: u64, port: u16) -> Self {
        let dir =
            std::env::temp_dir().join(format!("mts-tarantool-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).expect("create tarantool dir");
        for (name, text) in [
            ("init.lua", TARANTOOL_INIT.to_owned()),
            (
                "minitoolstream.lua",
                mts_storage::store::SCHEMA_LUA.to_owned(),
            ),
            ("test-admin.lua", admin_lua(OWN_ADMIN_PASSWORD)),
        ] {
            std::fs::write(dir.join(name), text).expect("write the tarantool init");
        }
        Self {
            dir,
            port,
            memtx_bytes,
            child: None,
            member_env: Vec::new(),
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("stdout.log"))
            .expect("open tarantool log");
        let child = Command::new("tarantool")
            .arg(self.dir.join("init.lua"))
            .current_dir(&self.dir)
            .env("TARANTOOL_LISTEN", format!("127.0.0.1:{}", self.port))
            .env("TARANTOOL_WORK_DIR", &self.dir)
            .env("TARANTOOL_PASSWORD", "minitoolstream")
            .env("TARANTOOL_USER", "minitoolstream_connector")
            .env("TARANTOOL_MEMTX_MEMORY", self.memtx_bytes.to_string())
            .env("TARANTOOL_LOG", self.dir.join("tarantool.log"))
            .env("MTS_SCHEMA_FILE", self.dir.join("minitoolstream.lua"))
            .env("TARANTOOL_INIT_EXTRA", self.dir.join("test-admin.lua"))
            .envs(self.member_env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(log.try_clone().expect("clone log handle")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start tarantool (is it installed? scripts/test.sh installs it)");
        self.child = Some(child);
        wait_listening("tarantool", self.address(), &self.dir.join("tarantool.log"));
    }

    /// An admin connection to it.
    pub async fn admin_client(&self) -> tarant::Client {
        admin_at(&self.address(), OWN_ADMIN_PASSWORD).await
    }

    /// `host:port` it listens on.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Its data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A service config using this Tarantool and the shared S3 server.
    pub fn config(&self) -> Config {
        let mut config = config();
        config.tarantool.address = self.address();
        config.tarantool.user = "minitoolstream_connector".into();
        config.tarantool.password = "minitoolstream".into();
        config
    }

    /// Kills the process without warning, as a crash would.
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    /// Starts it again on the same port and data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for TarantoolProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Three Tarantool processes of one test as a replica set with synchronous
/// replication (a quorum of 2), as `scripts/up.sh --ha` runs them: member 0
/// takes writes at first, the others follow it read-only.
pub struct ReplicaSet {
    /// The members, in the order of their addresses.
    pub members: Vec<TarantoolProcess>,
}

impl ReplicaSet {
    /// Starts the leader, then the two others, which join it.
    pub fn start() -> Self {
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let peers = ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<TarantoolProcess> = ports
            .iter()
            .map(|port| TarantoolProcess::prepare(256 << 20, *port))
            .collect();
        for (i, member) in members.iter_mut().enumerate() {
            member.member_env = vec![
                ("TARANTOOL_REPLICATION".into(), peers.clone()),
                ("TARANTOOL_REPLICATION_PASSWORD".into(), "replicate".into()),
                ("TARANTOOL_SYNCHRO_QUORUM".into(), "2".into()),
                ("TARANTOOL_SYNCHRO_TIMEOUT".into(), "2".into()),
                ("TARANTOOL_READ_ONLY".into(), (i > 0).to_string()),
            ];
            let from = member.log_len();
            member.spawn();
            // The leader has its users and schema before anyone joins it.
            member.wait_initialized(from);
        }
        Self { members }
    }

    /// A service config naming every member.
    pub fn config(&self) -> Config {
        let mut config = self.members[0].config();
        config.tarantool.address = self
            .members
            .iter()
            .map(TarantoolProcess::address)
            .collect::<Vec<_>>()
            .join(",");
        config
    }

    /// Makes member `i` take writes, as `scripts/failover.sh` does on 2.6
    /// (which has no election): writable, then the synchronous writes the
    /// old leader left unconfirmed settled.
    pub async fn promote(&self, i: usize) {
        let admin = self.members[i].admin_client().await;
        let _: Vec<tarant::Value> = admin
            .eval("mts_promote()", ())
            .await
            .expect("promote the member");
    }

    /// Of `candidates`, the live member furthest along (the largest vclock
    /// sum), as `scripts/failover.sh` picks one.
    pub async fn furthest_along(&self, candidates: &[usize]) -> usize {
        let mut best = (0, candidates[0]);
        for &i in candidates {
            let admin = self.members[i].admin_client().await;
            let (lsn,): (u64,) = admin
                .eval(
                    "local n = 0 for _, v in pairs(box.info.vclock) do n = n + v end return n",
                    (),
                )
                .await
                .expect("ask a member how far it is");
            if lsn > best.0 {
                best = (lsn, i);
            }
        }
        best.1
    }

    /// Starts member `i` again as a follower (read-only), as an old leader
    /// comes back after a failover.
    pub fn restart_as_follower(&mut self, i: usize) {
        let member = &mut self.members[i];
        member.kill();
        for (key, value) in &mut member.member_env {
            if key == "TARANTOOL_READ_ONLY" {
                *value = "true".into();
            }
        }
        let from = member.log_len();
        member.spawn();
        member.wait_initialized(from);
    }

    /// Starts member `i` again as a follower with its data set aside, as a
    /// leader lost in a failover rejoins on Tarantool 2.6 (`scripts/up.sh
    /// --ha` after `scripts/failover.sh`): it gets everything from the
    /// others, and writes only it had never reach them.
    pub fn rejoin_as_follower(&mut self, i: usize) {
        let member = &mut self.members[i];
        member.kill();
        for entry in std::fs::read_dir(&member.dir).expect("read the member's directory") {
            let path = entry.expect("a directory entry").path();
            let data = path
                .extension()
                .is_some_and(|ext| ext == "snap" || ext == "xlog" || ext == "inprogress");
            if data {
                std::fs::remove_file(&path).expect("set the member's data aside");
            }
        }
        self.restart_as_follower(i);
    }
}

impl TarantoolProcess {
    /// How long its log is: a restart's lines follow.
    fn log_len(&self) -> usize {
        std::fs::read(self.dir.join("tarantool.log")).map_or(0, |log| log.len())
    }

    /// Waits until the init script has run to its end (a replica set
    /// member listens before it has), judging by its log past byte `from`.
    fn wait_initialized(&self, from: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let log = self.dir.join("tarantool.log");
        while Instant::now() < deadline {
            let text = std::fs::read(&log).unwrap_or_default();
            let text = String::from_utf8_lossy(text.get(from..).unwrap_or_default());
            if text.contains("ready to accept requests") || text.contains("entering the event loop")
            {
                std::thread::sleep(Duration::from_millis(200));
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        panic!(
            "tarantool at {} did not finish starting within 30 s; its log:\n{text}",
            self.address()
        );
    }
}

/// A Garage S3 server owned by one test, with its own data, to stop and
/// start again while the test's services run.
pub struct GarageProcess {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl GarageProcess {
    /// Starts Garage on free ports with a bucket the shared test credentials can use.
    pub fn start() -> Self {
        let dir =
            std::env::temp_dir().join(format!("mts-garage-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(dir.join("meta")).expect("create garage dir");
        let (port, rpc) = (free_port(), free_port());
        let secret: String = (0..4)
            .map(|_| format!("{:016x}", rand::random::<u64>()))
            .collect();
        let toml = format!(
            "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\nreplication_factor = 1\n\
             rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
             [s3_api]\ns3_region = \"us-east-1\"\napi_bind_addr = \"127.0.0.1:{port}\"\n",
            d = dir.display()
        );
        std::fs::write(dir.join("garage.toml"), toml).expect("write garage.toml");
        let mut process = Self {
            dir,
            port,
            child: None,
        };
        process.spawn();
        process
    }

    fn spawn(&mut self) {
        let config = config();
        let log = std::fs::File::create(self.dir.join("garage.log")).expect("garage log");
        let child = Command::new(required("MTS_TEST_GARAGE_BIN"))
            .args([
                "-c",
                self.dir.join("garage.toml").to_str().expect("utf-8 path"),
            ])
            .args(["server", "--single-node", "--default-bucket"])
            .env(
                "GARAGE_DEFAULT_ACCESS_KEY",
                &config.object_store.access_key_id,
            )
            .env(
                "GARAGE_DEFAULT_SECRET_KEY",
                &config.object_store.secret_access_key,
            )
            .env("GARAGE_DEFAULT_BUCKET", &config.object_store.bucket_name)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start garage");
        self.child = Some(child);
        wait_listening(
            "garage",
            format!("127.0.0.1:{}", self.port),
            &self.dir.join("garage.log"),
        );
    }

    /// `http://host:port` of its S3 API.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kills it without warning.
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    /// Starts it again with the same data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for GarageProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Kills a test's child process, if it runs, and reaps it.
fn kill(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn wait_listening(name: &str, address: String, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(&address).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = std::fs::read_to_string(log).unwrap_or_default();
    panic!("{name} did not listen on {address} within 15 s; its log:\n{log}");
}

/// A service running in-process on `127.0.0.1:0`, stopped through the same
/// shutdown path a signal takes.
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

/// The shutdown future handed to a service's `run`.
pub type Shutdown = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

impl Running {
    /// Binds an ephemeral port, starts `run` on it and waits until the
    /// service `name` (e.g. `minitoolstream.IngressService`) is SERVING.
    pub async fn start<Fut, E>(
        name: &str,
        config: Config,
        run: impl FnOnce(Config, tokio::net::TcpListener, Shutdown) -> Fut,
    ) -> Self
    where
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        Self::start_over(name, config, run, None).await
    }

    /// `start` for a service serving TLS, checked with the client `tls`.
    pub async fn start_over<Fut, E>(
        name: &str,
        config: Config,
        run: impl FnOnce(Config, tokio::net::TcpListener, Shutdown) -> Fut,
        tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> Self
    where
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind an ephemeral port");
        Self::start_listening(listener, name, config, run, tls).await
    }

    /// `start` on `addr`, where a stopped service listened: a restart that
    /// its clients' endpoints still reach.
    pub async fn start_at<Fut, E>(
        addr: SocketAddr,
        name: &str,
        config: Config,
        run: impl FnOnce(Config, tokio::net::TcpListener, Shutdown) -> Fut,
    ) -> Self
    where
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                Err(err) if Instant::now() < deadline => {
                    eprintln!("{addr} is not free yet ({err}); waiting");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(err) => panic!("cannot bind {addr} again: {err}"),
            }
        };
        Self::start_listening(listener, name, config, run, None).await
    }

    async fn start_listening<Fut, E>(
        listener: tokio::net::TcpListener,
        name: &str,
        config: Config,
        run: impl FnOnce(Config, tokio::net::TcpListener, Shutdown) -> Fut,
        tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> Self
    where
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown: Shutdown = Box::pin(async move {
            let _ = stopped.await;
        });
        let service = run(config, listener, shutdown);
        let task = tokio::spawn(async move { service.await.map_err(|e| e.to_string()) });
        wait_status_over(addr, tls.as_ref(), name, true, Duration::from_secs(30)).await;
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    /// `http://addr`, for tonic clients.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn stop(mut self) -> Result<(), String> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.map_err(|e| e.to_string())?
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP proxy in front of a server (Tarantool) that a test can make lose
/// one exchange: the next reply (the request was served, the answer never
/// arrives) or the next request (it never reaches the server). Either way the
/// client's connection breaks, as in a network failure with a call in
/// flight. It can also refuse connections for a while, as an outage would.
pub struct LossyProxy {
    addr: SocketAddr,
    faults: std::sync::Arc<Faults>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Faults {
    /// Reply bytes still let through before every connection is cut; 0 =
    /// no limit.
    cut_after: std::sync::atomic::AtomicU64,
    lose_reply: std::sync::atomic::AtomicBool,
    lose_request: std::sync::atomic::AtomicBool,
    refuse: std::sync::atomic::AtomicBool,
    sever: tokio::sync::Notify,
}

impl Faults {
    fn take(flag: &std::sync::atomic::AtomicBool) -> bool {
        flag.swap(false, std::sync::atomic::Ordering::SeqCst)
    }
}

impl LossyProxy {
    /// Starts forwarding a free local port to `target` (`host:port`).
    pub async fn start(target: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let faults = std::sync::Arc::new(Faults::default());
        let shared = std::sync::Arc::clone(&faults);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if shared.refuse.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                tokio::spawn(forward(client, server, std::sync::Arc::clone(&shared)));
            }
        });
        Self { addr, faults, task }
    }

    /// `host:port` to connect to instead of the server.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// The next bytes the server sends are dropped and the connection closed.
    pub fn lose_next_reply(&self) {
        self.faults
            .lose_reply
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The next bytes the client sends are dropped and the connection closed.
    pub fn lose_next_request(&self) {
        self.faults
            .lose_request
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// While `refuse` holds, new connections are closed at once.
    pub fn refuse_connections(&self, refuse: bool) {
        self.faults
            .refuse
            .store(refuse, std::sync::atomic::Ordering::SeqCst);
    }

    /// Lets `bytes` more reply bytes through, then closes the connection
    /// that would carry more: a link that breaks part way through a large
    /// answer, at a point a test can count on.
    pub fn cut_replies_after(&self, bytes: u64) {
        self.faults
            .cut_after
            .store(bytes.max(1), std::sync::atomic::Ordering::SeqCst);
    }

    /// Closes every open connection, as a server that went away would.
    pub fn sever(&self) {
        self.faults.sever.notify_waiters();
    }
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies both ways until either side closes or a fault breaks the link.
async fn forward(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    faults: std::sync::Arc<Faults>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let requests = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = client_read.read(&mut buf).await.unwrap_or(0);
            if n == 0 || Faults::take(&faults.lose_request) {
                return;
            }
            if server_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let replies = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = server_read.read(&mut buf).await.unwrap_or(0);
            if n == 0 || Faults::take(&faults.lose_reply) {
                return;
            }
            let mut n = n;
            let mut cut = false;
            let _ = faults.cut_after.fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |left| match left {
                    0 => None,
                    left if left as usize > n => Some(left - n as u64),
                    // What is left of the allowance goes, then the link is
                    // cut; the next connections are whole again.
                    left => {
                        n = left as usize;
                        cut = true;
                        Some(0)
                    }
                },
            );
            if client_write.write_all(&buf[..n]).await.is_err() || cut {
                return;
            }
        }
    };
    // Whichever way ends first ends the link: both halves are dropped.
    tokio::select! {
        () = requests => {}
        () = replies => {}
        () = faults.sever.notified() => {}
    }
}

/// Where the ingress puts the payloads of `subject` in the store `config`
/// names: the key prefix to list them by.
pub async fn payload_prefix(config: &Config, subject: &str) -> String {
    let store = mts_storage::store::Store::connect(config)
        .await
        .expect("connect to the test Tarantool");
    mts_storage::object_store::ObjectStore::new(config)
        .subject_prefix(&store.identity().store_id, subject)
}

/// Certificates made for a test: a CA, a server certificate for `localhost`
/// and a client certificate, each signed by the CA (PEM text).
pub struct Pki {
    /// The CA's certificate.
    pub ca: String,
    /// The server's certificate and key.
    pub server: (String, String),
    /// The client's certificate and key.
    pub client: (String, String),
}

/// A new [`Pki`]; the client certificate names `client`.
pub fn pki(client: &str) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("a CA key"))
        .expect("a CA certificate");
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().expect("a key");
        let cert = CertificateParams::new(names)
            .expect("certificate parameters")
            .signed_by(&key, &ca)
            .expect("a certificate signed by the CA");
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        server: leaf(vec!["localhost".into()]),
        client: leaf(vec![client.into()]),
        ca: ca.pem(),
    }
}
