//! Publish against the real Tarantool and S3 server that scripts/test.sh runs.

use std::collections::HashMap;

use mts_ingress::Ingress;
use mts_proto::pb::PublishRequest;
use mts_proto::pb::ingress_service_client::IngressServiceClient;
use mts_proto::pb::ingress_service_server::IngressService;
use mts_proto::service_names::INGRESS;
use mts_storage::object_store::ObjectStore;
use mts_storage::store::Store;
use mts_testkit::{self as testing, Running, TarantoolProcess};
use tonic::Code;

async fn start() -> (Running, IngressServiceClient<tonic::transport::Channel>) {
    let service = Running::start(INGRESS, testing::config(), mts_ingress::run).await;
    let client = IngressServiceClient::connect(service.endpoint())
        .await
        .unwrap();
    (service, client)
}

fn request(subject: &str, data: Vec<u8>) -> PublishRequest {
    PublishRequest {
        message_id: String::new(),
        subject: subject.into(),
        data: data.into(),
        headers: HashMap::from([("content-type".into(), "application/octet-stream".into())]),
        ordering_key: String::new(),
    }
}

#[tokio::test]
async fn small_payloads_stay_inline_and_large_ones_go_to_s3() {
    let (service, mut client) = start().await;
    let config = testing::config();
    let object_store = ObjectStore::new(&config);
    let subject = testing::unique_subject("inline-vs-s3");

    let empty = client
        .publish(request(&subject, vec![]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            empty.sequence,
            empty.status_code,
            empty.object_name.as_str()
        ),
        (1, 0, "")
    );

    let at_threshold = vec![7u8; config.ingress.inline_threshold_bytes as usize];
    let inline = client
        .publish(request(&subject, at_threshold))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((inline.sequence, inline.object_name.as_str()), (2, ""));

    let above = vec![9u8; config.ingress.inline_threshold_bytes as usize + 1];
    let offloaded = client
        .publish(request(&subject, above.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(offloaded.sequence, 3);
    let prefix = testing::payload_prefix(&config, &subject).await;
    assert!(
        prefix.starts_with(&config.object_store.key_prefix),
        "{prefix} is under the service's own key prefix"
    );
    assert!(
        offloaded.object_name.starts_with(&prefix),
        "{}",
        offloaded.object_name
    );
    assert_eq!(
        object_store.get(&offloaded.object_name).await.unwrap(),
        above
    );
    assert_eq!(object_store.list_keys(&prefix).await.unwrap().len(), 1);

    let store = Store::connect(&config).await.unwrap();
    let stored: Vec<_> = store
        .fetch(&subject, "inspector", 10)
        .await
        .unwrap()
        .messages
        .into_iter()
        .map(|leased| leased.message)
        .collect();
    assert_eq!(stored.len(), 3);
    assert_eq!(stored[0].data.as_deref().map(|d| d.len()), Some(0));
    assert_eq!(stored[1].size, config.ingress.inline_threshold_bytes);
    assert!(stored[1].object_key.is_none());
    assert_eq!(
        stored[2].object_key.as_deref(),
        Some(offloaded.object_name.as_str())
    );
    assert!(stored[2].data.is_none());
    assert_eq!(
        stored[0].headers["content-type"],
        "application/octet-stream"
    );
    service.stop().await.unwrap();
}

#[tokio::test]
async fn binary_payloads_round_trip_through_tarantool_unchanged() {
    let (service, mut client) = start().await;
    let subject = testing::unique_subject("binary");
    let every_byte: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    client
        .publish(request(&subject, every_byte.clone()))
        .await
        .unwrap();
    let store = Store::connect(&testing::config()).await.unwrap();
    let stored = store.fetch(&subject, "d", 1).await.unwrap().messages;
    let stored: Vec<_> = stored.into_iter().map(|leased| leased.message).collect();
    assert_eq!(stored[0].data.as_deref(), Some(every_byte.as_slice()));
    service.stop().await.unwrap();
}

#[tokio::test]
async fn oversized_payload_is_refused_before_anything_is_stored() {
    let mut config = testing::config();
    config.ingress.max_payload_bytes = 512 * 1024;
    let service = Running::start(INGRESS, config.clone(), mts_ingress::run).await;
    let mut client = IngressServiceClient::connect(service.endpoint())
        .await
        .unwrap();
    let subject = testing::unique_subject("too-big");
    let status = client
        .publish(request(&subject, vec![0; 512 * 1024 + 1]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("data"), "{}", status.message());
    let store = Store::connect(&config).await.unwrap();
    assert_eq!(store.last_seq(&subject).await.unwrap(), 0);
    assert!(
        ObjectStore::new(&config)
            .list_keys(&testing::payload_prefix(&config, &subject).await)
            .await
            .unwrap()
            .is_empty()
    );
    service.stop().await.unwrap();
}

#[tokio::test]
async fn failed_upload_is_unavailable_and_stores_no_metadata() {
    let config = testing::config();
    let store = Store::connect(&config).await.unwrap();
    let mut unreachable = config.clone();
    unreachable.object_store.endpoint = format!("http://127.0.0.1:{}", testing::free_port());
    unreachable.object_store.timeout_ms = 2000;
    let ingress = Ingress::new(
        store.clone(),
        ObjectStore::new(&unreachable),
        authenticator(&config),
        &config,
    );
    let subject = testing::unique_subject("upload-fails");
    let big = vec![1u8; config.ingress.inline_threshold_bytes as usize + 10];
    let status = ingress
        .publish(tonic::Request::new(request(&subject, big)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("nothing was stored"),
        "{}",
        status.message()
    );
    assert_eq!(store.last_seq(&subject).await.unwrap(), 0);
}

#[tokio::test]
async fn refused_commit_removes_the_uploaded_object() {
    let tarantool = TarantoolProcess::start();
    let config = tarantool.config();
    let store = Store::connect(&config).await.unwrap();
    // A stand-in for any refusal (space full, permission): the real procedure
    // replaced in this test's own Tarantool by one that always raises.
    let _: Vec<tarant::Value> = tarantool
        .admin_client()
        .await
        .eval(
            "rawset(_G, 'mts_publish', function() error('commit refused for the test') end)",
            (),
        )
        .await
        .unwrap();
    let object_store = ObjectStore::new(&config);
    let ingress = Ingress::new(
        store.clone(),
        object_store.clone(),
        authenticator(&config),
        &config,
    );
    let subject = testing::unique_subject("commit-refused");
    let big = vec![2u8; config.ingress.inline_threshold_bytes as usize + 10];
    let status = ingress
        .publish(tonic::Request::new(request(&subject, big)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(status.message().contains("commit refused for the test"));
    assert!(
        object_store
            .list_keys(&testing::payload_prefix(&config, &subject).await)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.last_seq(&subject).await.unwrap(), 0);
}

fn authenticator(config: &mts_config::Config) -> std::sync::Arc<mts_runtime::auth::Authenticator> {
    std::sync::Arc::new(mts_runtime::auth::Authenticator::from_config(config).unwrap())
}

#[tokio::test]
async fn a_publish_reaching_tarantool_after_its_deadline_is_refused() {
    // What a client library does when it replays requests held back during a
    // reconnect: the publisher already got UNAVAILABLE, so nothing may be stored.
    let config = testing::config();
    let store = Store::connect(&config).await.unwrap();
    let client = crate::tarantool_client(&config).await;
    let subject = testing::unique_subject("late");
    let past = crate::now_ns() - 1_000_000_000;
    let no_headers: HashMap<String, String> = HashMap::new();
    let late = client
        .call::<(u64,)>(
            "mts_publish",
            (
                &subject,
                &no_headers,
                serde_bytes::Bytes::new(b"x"),
                Option::<&str>::None,
                1u64,
                past,
            ),
        )
        .await
        .unwrap_err();
    assert!(late.to_string().contains("after its deadline"), "{late}");
    assert_eq!(store.last_seq(&subject).await.unwrap(), 0);
    // The service's own publishes carry a deadline in the future.
    assert_eq!(
        store
            .publish(&subject, &no_headers, Some(b"x"), None, 1)
            .await
            .unwrap(),
        1
    );
}

#[tokio::test]
async fn an_ordering_key_is_kept_with_the_message_large_or_small_and_checked() {
    let (service, mut client) = start().await;
    let config = testing::config();
    let store = Store::connect(&config).await.unwrap();
    let subject = testing::unique_subject("ordering-key");
    let large = vec![1u8; config.ingress.inline_threshold_bytes as usize + 1];
    for data in [b"small".to_vec(), large] {
        let published = client
            .publish(PublishRequest {
                ordering_key: "order-42".into(),
                ..request(&subject, data)
            })
            .await
            .unwrap()
            .into_inner();
        let stored = store
            .message(&subject, published.sequence)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            stored.headers.get(mts_storage::store::ORDERING_KEY_HEADER),
            Some(&"order-42".to_owned())
        );
    }
    let status = client
        .publish(PublishRequest {
            ordering_key: "k".repeat(257),
            ..request(&subject, b"x".to_vec())
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("ordering_key"),
        "{}",
        status.message()
    );
    // The header is the service's to set.
    let mut forged = request(&subject, b"x".to_vec());
    forged
        .headers
        .insert("mts-ordering-key".into(), "sneaky".into());
    let status = client.publish(forged).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(store.last_seq(&subject).await.unwrap(), 2);
    service.stop().await.unwrap();
}
