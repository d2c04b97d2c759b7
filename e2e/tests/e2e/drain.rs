//! SIGTERM against the real binaries: in-flight publishes finish, subscriber
//! streams end with UNAVAILABLE, the process exits 0 within the grace period,
//! and a second signal ends it at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use mts_proto::pb::egress_service_client::EgressServiceClient;
use mts_proto::pb::ingress_service_client::IngressServiceClient;
use mts_proto::pb::publish_frame::Frame;
use mts_proto::pb::{PublishEnd, PublishFrame, PublishHeader, SubscribeRequest};
use mts_proto::service_names::{EGRESS, INGRESS};
use mts_shared::testing;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

/// A service binary built next to this test.
fn binary(name: &str) -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    let path = deps.parent().unwrap().parent().unwrap().join(name);
    assert!(
        path.exists(),
        "{} is not built; cargo test --workspace builds it",
        path.display()
    );
    path
}

struct Process {
    child: Child,
    addr: SocketAddr,
}

impl Process {
    async fn start(name: &str, service: &str, grace_seconds: u64) -> Self {
        let config = testing::config();
        let port = testing::free_port();
        let child = Command::new(binary(name))
            .env("SERVER_HOST", "127.0.0.1")
            .env("SERVER_PORT", port.to_string())
            .env("METRICS_PORT", "0")
            .env("SHUTDOWN_GRACE_SECONDS", grace_seconds.to_string())
            .env("TARANTOOL_ADDRESS", &config.tarantool_address)
            .env("TARANTOOL_USER", &config.tarantool_user)
            .env("TARANTOOL_PASSWORD", &config.tarantool_password)
            .env("MINIO_ENDPOINT", &config.minio_endpoint)
            .env("MINIO_ACCESS_KEY_ID", &config.minio_access_key_id)
            .env("MINIO_SECRET_ACCESS_KEY", &config.minio_secret_access_key)
            .env("MINIO_BUCKET_NAME", &config.minio_bucket_name)
            .env("LOG_FORMAT", "console")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        testing::wait_serving(addr, service, Duration::from_secs(30)).await;
        Self { child, addr }
    }

    /// Once draining, the listener takes no new connections.
    async fn wait_refusing(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while tokio::net::TcpStream::connect(self.addr).await.is_ok() {
            assert!(
                Instant::now() < deadline,
                "still accepting connections after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn signal(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the exit; its code and how long it took.
    async fn exit(mut self, within: Duration) -> (Option<i32>, Duration) {
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

fn frame(frame: Frame) -> PublishFrame {
    PublishFrame { frame: Some(frame) }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_in_flight_at_sigterm_completes_and_the_process_exits_zero() {
    let ingress = Process::start("ingress", INGRESS, 10).await;
    let mut client = IngressServiceClient::connect(format!("http://{}", ingress.addr))
        .await
        .unwrap();
    let subject = testing::unique_subject("drain");
    let (frames, outbound) = mpsc::channel(4);
    frames
        .send(frame(Frame::Header(PublishHeader {
            subject: subject.clone(),
            headers: HashMap::new(),
            total_size: None,
            message_id: String::new(),
        })))
        .await
        .unwrap();
    frames
        .send(frame(Frame::Chunk(vec![1u8; 1000].into())))
        .await
        .unwrap();
    let call =
        tokio::spawn(async move { client.publish_stream(ReceiverStream::new(outbound)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;

    ingress.signal();
    ingress.wait_refusing().await;
    // The publish began before the signal: it may finish.
    frames
        .send(frame(Frame::Chunk(vec![2u8; 1000].into())))
        .await
        .unwrap();
    frames
        .send(frame(Frame::End(PublishEnd {
            sha256: String::new(),
        })))
        .await
        .unwrap();
    drop(frames);
    let reply = call.await.unwrap().unwrap().into_inner();
    assert_eq!((reply.sequence, reply.size), (1, 2000));
    let (code, took) = ingress.exit(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "a drained process exits 0");
    assert!(
        took < Duration::from_secs(10),
        "within the grace period: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn subscribers_are_told_to_reconnect_and_a_second_signal_exits_at_once() {
    let egress = Process::start("egress", EGRESS, 20).await;
    let mut client = EgressServiceClient::connect(format!("http://{}", egress.addr))
        .await
        .unwrap();
    let mut stream = client
        .subscribe(SubscribeRequest {
            subject: testing::unique_subject("drain-sub"),
            start_sequence: None,
            durable_name: "d".into(),
        })
        .await
        .unwrap()
        .into_inner();
    egress.signal();
    let ended = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap();
    let status = ended.expect("a status, not a silent end").unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("reconnect"),
        "{}",
        status.message()
    );
    let (code, _) = egress.exit(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0));

    // A publish stream that never ends would hold the drain for the whole grace period.
    let ingress = Process::start("ingress", INGRESS, 60).await;
    let mut client = IngressServiceClient::connect(format!("http://{}", ingress.addr))
        .await
        .unwrap();
    let (frames, outbound) = mpsc::channel(4);
    frames
        .send(frame(Frame::Header(PublishHeader {
            subject: testing::unique_subject("held"),
            headers: HashMap::new(),
            total_size: None,
            message_id: String::new(),
        })))
        .await
        .unwrap();
    let _call =
        tokio::spawn(async move { client.publish_stream(ReceiverStream::new(outbound)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    ingress.signal();
    ingress.wait_refusing().await;
    ingress.signal();
    let (code, took) = ingress.exit(Duration::from_secs(10)).await;
    assert_eq!(
        code,
        Some(130),
        "the second signal does not wait for the 60 s drain"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    drop(frames);
}
