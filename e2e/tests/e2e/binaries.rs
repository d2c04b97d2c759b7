//! The service binaries run as processes of their own, for what only a real
//! process shows: signals, exit codes, global telemetry.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mts_config::Config;
use mts_testkit as testing;

/// The variables naming `config`'s Tarantool and bucket, as the services read them.
pub fn dependency_env(config: &Config) -> [(&'static str, String); 7] {
    [
        ("TARANTOOL_ADDRESS", config.tarantool.address.clone()),
        ("TARANTOOL_USER", config.tarantool.user.clone()),
        ("TARANTOOL_PASSWORD", config.tarantool.password.clone()),
        ("MINIO_ENDPOINT", config.object_store.endpoint.clone()),
        (
            "MINIO_ACCESS_KEY_ID",
            config.object_store.access_key_id.clone(),
        ),
        (
            "MINIO_SECRET_ACCESS_KEY",
            config.object_store.secret_access_key.clone(),
        ),
        ("MINIO_BUCKET_NAME", config.object_store.bucket_name.clone()),
    ]
}

/// A service binary built next to this test.
pub fn binary(name: &str) -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    let path = deps.parent().unwrap().parent().unwrap().join(name);
    assert!(
        path.exists(),
        "{} is not built; cargo test --workspace builds it",
        path.display()
    );
    path
}

/// A service binary running as its own process against the test dependencies.
pub struct Process {
    child: Child,
    /// Its gRPC address.
    pub addr: SocketAddr,
}

impl Process {
    /// Starts `name` and waits until `service` is SERVING.
    pub async fn start(name: &str, service: &str, grace_seconds: u64) -> Self {
        Self::start_with(name, service, grace_seconds, &[]).await
    }

    /// `start_with`, its output kept in `log` and shown when it does not
    /// become SERVING.
    pub async fn start_logged(
        name: &str,
        service: &str,
        grace_seconds: u64,
        extra: &[(&str, &str)],
        log: &std::path::Path,
    ) -> Self {
        let output = std::fs::File::create(log).unwrap();
        let process = Self::spawn(
            name,
            grace_seconds,
            extra,
            output.try_clone().unwrap().into(),
            output.into(),
        );
        let (addr, service) = (process.addr, service.to_owned());
        let waited = tokio::spawn(async move {
            testing::wait_serving(addr, &service, Duration::from_secs(30)).await;
        })
        .await;
        if waited.is_err() {
            panic!(
                "{name} did not become SERVING; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        process
    }

    /// Starts `name` with `extra` environment variables.
    pub async fn start_with(
        name: &str,
        service: &str,
        grace_seconds: u64,
        extra: &[(&str, &str)],
    ) -> Self {
        let process = Self::spawn(name, grace_seconds, extra, Stdio::null(), Stdio::null());
        testing::wait_serving(process.addr, service, Duration::from_secs(30)).await;
        process
    }

    /// Runs `name` on a free port against the test dependencies.
    fn spawn(
        name: &str,
        grace_seconds: u64,
        extra: &[(&str, &str)],
        stdout: Stdio,
        stderr: Stdio,
    ) -> Self {
        let config = testing::config();
        let port = testing::free_port();
        let mut command = Command::new(binary(name));
        // Nothing of this machine's own AWS identity reaches the chain.
        for inherited in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_CONTAINER_AUTHORIZATION_TOKEN",
        ] {
            command.env_remove(inherited);
        }
        let child = command
            .env("SERVER_HOST", "127.0.0.1")
            .env("SERVER_PORT", port.to_string())
            .env("METRICS_PORT", "0")
            .env("SHUTDOWN_GRACE_SECONDS", grace_seconds.to_string())
            .envs(dependency_env(&config))
            .env("LOG_FORMAT", "console")
            .envs(extra.iter().copied())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        Self { child, addr }
    }

    /// Once draining, the listener takes no new connections.
    pub async fn wait_refusing(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while tokio::net::TcpStream::connect(self.addr).await.is_ok() {
            assert!(
                Instant::now() < deadline,
                "still accepting connections after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn signal(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the exit; its code and how long it took.
    pub async fn exit(mut self, within: Duration) -> (Option<i32>, Duration) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code(), started.elapsed());
            }
            assert!(started.elapsed() < within, "still running after {within:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Process {
    /// A test that failed before the process's end must not leave it
    /// running (holding ports and files) after the test binary exits.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
