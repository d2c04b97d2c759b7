//! The client library against real services, a real Tarantool and a real S3
//! server.

use std::path::Path;
use std::time::Duration;

mod admin;
mod consume;
mod payload;

use mts_client::{Client, Error, Message, Retry};
use mts_proto::service_names::{EGRESS, INGRESS};
use mts_testkit::{self as testing, Running, TarantoolProcess};

struct Services {
    ingress: Running,
    egress: Running,
}

async fn services(config: mts_config::Config) -> Services {
    Services {
        ingress: Running::start(INGRESS, config.clone(), mts_ingress::run).await,
        egress: Running::start(EGRESS, config, mts_egress::run).await,
    }
}

async fn client_of(services: &Services) -> Client {
    Client::connect(services.ingress.endpoint(), services.egress.endpoint())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_published_twice_under_one_id_is_stored_once() {
    let services = services(testing::config()).await;
    let client = client_of(&services).await;
    let subject = testing::unique_subject("client");

    let first = client
        .publish(Message::new(&subject, "one").header("k", "v"))
        .await
        .unwrap();
    assert_eq!(
        (first.sequence, first.duplicate, first.attempts),
        (1, false, 1)
    );
    assert_eq!(first.size, 3);
    assert!(
        uuid::Uuid::parse_str(&first.message_id).is_ok(),
        "an id is made for a message without one: {first:?}"
    );
    let again = client
        .publish(Message::new(&subject, "one").message_id(&first.message_id))
        .await
        .unwrap();
    assert_eq!((again.sequence, again.duplicate), (1, true));
    let next = client.publish(Message::new(&subject, "two")).await.unwrap();
    assert_eq!((next.sequence, next.duplicate), (2, false));
}

/// Services on a Tarantool of their own, to be stopped, that give up on it
/// after half a second (the client's retries ride out the rest of an
/// outage), and a client that tries for long enough.
async fn outage_ready() -> (TarantoolProcess, Services, Client) {
    let tarantool = TarantoolProcess::start();
    let mut config = tarantool.config();
    config.tarantool.timeout_ms = 500;
    let services = services(config).await;
    let client = Client::builder(services.ingress.endpoint(), services.egress.endpoint())
        .retry(Retry {
            attempts: 100,
            first_wait: Duration::from_millis(50),
            max_wait: Duration::from_millis(500),
        })
        .connect()
        .await
        .unwrap();
    (tarantool, services, client)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_rides_out_a_tarantool_outage_and_is_stored_once() {
    let (mut tarantool, _services, client) = outage_ready().await;
    let subject = testing::unique_subject("client-outage");
    assert_eq!(
        client
            .publish(Message::new(&subject, "before"))
            .await
            .unwrap()
            .sequence,
        1
    );

    tarantool.kill();
    let publishing = tokio::spawn({
        let (client, subject) = (client.clone(), subject.clone());
        async move { client.publish(Message::new(subject, "during")).await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!publishing.is_finished(), "it waits for Tarantool");
    tarantool.restart();
    let during = publishing.await.unwrap().unwrap();
    assert_eq!(during.sequence, 2, "{during:?}");
    assert!(during.attempts > 1, "{during:?}");
    let after = client
        .publish(Message::new(&subject, "after"))
        .await
        .unwrap();
    assert_eq!(after.sequence, 3, "the retried message was stored once");
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_say_whether_to_try_again() {
    let services = services(testing::config()).await;
    let client = client_of(&services).await;
    let err = client
        .publish(Message::new("", "no subject"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
    assert!(!err.is_retryable(), "{err}");

    let err = Client::connect("127.0.0.1:50051", "http://127.0.0.1:50052")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");

    // Nothing listens: refused, and worth trying later.
    let nowhere = format!("http://127.0.0.1:{}", testing::free_port());
    let client = Client::builder(&nowhere, &nowhere)
        .retry(Retry {
            attempts: 2,
            ..Retry::default()
        })
        .connect()
        .await
        .unwrap();
    let err = client.publish(Message::new("s", "x")).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn publishes_over_tls_and_mutual_tls() {
    let testing::Pki { ca, server, client } = testing::pki("me");
    let dir = std::env::temp_dir().join(format!("mts-client-tls-{}", testing::unique_subject("d")));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = write(&dir, "ca.pem", &ca);
    let mut config = testing::config();
    config.tls.cert_file = write(&dir, "server.pem", &server.0);
    config.tls.key_file = write(&dir, "server.key", &server.1);
    config.tls.client_ca_file = ca_file.clone();
    let trusting = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&ca))
        .identity(tonic::transport::Identity::from_pem(&client.0, &client.1))
        .domain_name("localhost");
    let ingress = Running::start_over(INGRESS, config, mts_ingress::run, Some(trusting)).await;
    let endpoint = format!("https://localhost:{}", ingress.addr.port());
    let once = Retry {
        attempts: 1,
        ..Retry::default()
    };

    let mutual = Client::builder(&endpoint, &endpoint)
        .ca_file(&ca_file)
        .identity(
            write(&dir, "me.pem", &client.0),
            write(&dir, "me.key", &client.1),
        )
        .retry(once)
        .connect()
        .await
        .unwrap();
    let subject = testing::unique_subject("client-tls");
    assert_eq!(
        mutual
            .publish(Message::new(&subject, "secret"))
            .await
            .unwrap()
            .sequence,
        1
    );
    let anonymous = Client::builder(&endpoint, &endpoint)
        .ca_file(&ca_file)
        .retry(once)
        .connect()
        .await
        .unwrap();
    assert!(
        anonymous
            .publish(Message::new(&subject, "x"))
            .await
            .is_err(),
        "a client without a certificate is refused"
    );
    let err = Client::builder(&endpoint, &endpoint)
        .ca_file(dir.join("missing.pem"))
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
    ingress.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publisher_sends_many_at_once_and_each_gets_its_answer() {
    let services = services(testing::config()).await;
    let client = client_of(&services).await;
    let subject = testing::unique_subject("client-many");
    let publisher = client.publisher(64);
    let mut answers = Vec::new();
    for i in 0..2000u32 {
        answers.push(
            publisher
                .send(Message::new(&subject, i.to_be_bytes().to_vec()))
                .await
                .unwrap(),
        );
    }
    let mut sequences = Vec::new();
    for answer in answers {
        let published = answer.await.unwrap();
        assert!(!published.duplicate);
        sequences.push(published.sequence);
    }
    assert_eq!(
        sequences,
        (1..=2000).collect::<Vec<_>>(),
        "answered in order"
    );
    assert_eq!(client.last_sequence(&subject).await.unwrap(), 2000);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publisher_rides_out_a_tarantool_outage_and_stores_each_message_once() {
    let (mut tarantool, _services, client) = outage_ready().await;
    let subject = testing::unique_subject("client-many-outage");
    let publisher = client.publisher(16);
    for i in 0..20u32 {
        let answer = publisher
            .send(Message::new(&subject, i.to_be_bytes().to_vec()))
            .await
            .unwrap();
        answer.await.unwrap();
    }

    tarantool.kill();
    let sending = tokio::spawn({
        let (publisher, subject) = (publisher.clone(), subject.clone());
        async move {
            let mut answers = Vec::new();
            for i in 20..70u32 {
                answers.push(
                    publisher
                        .send(Message::new(&subject, i.to_be_bytes().to_vec()))
                        .await
                        .unwrap(),
                );
            }
            let mut outcomes = Vec::new();
            for answer in answers {
                outcomes.push(answer.await);
            }
            outcomes
        }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    tarantool.restart();
    let outcomes = sending.await.unwrap();
    let mut sequences: Vec<u64> = outcomes
        .iter()
        .map(|outcome| outcome.as_ref().expect("stored in the end").sequence)
        .collect();
    assert!(
        outcomes.iter().any(|o| o.as_ref().unwrap().attempts > 1),
        "some were sent again"
    );
    sequences.sort_unstable();
    sequences.dedup();
    assert_eq!(sequences.len(), 50, "each its own sequence");
    assert_eq!(
        client.last_sequence(&subject).await.unwrap(),
        70,
        "each stored once"
    );
}
