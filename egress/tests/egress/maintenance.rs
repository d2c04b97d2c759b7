//! Retention and the orphan sweep. Each test runs its own Tarantool and its
//! own bucket, so its egress holds the maintenance lease and its sweep sees
//! no other test's objects.

use std::collections::HashMap;
use std::time::Duration;

use mts_config::Config;
use mts_proto::pb::egress_service_client::EgressServiceClient;
use mts_proto::pb::{SetSubjectLimitsRequest, SubjectInfo, SubjectLimits, SubjectRequest};
use mts_proto::service_names::EGRESS;
use mts_storage::object_store::ObjectStore;
use mts_storage::store::Store;
use mts_testkit::{self as testing, Running, TarantoolProcess};
use tonic::Code;
use tonic::transport::Channel;

pub(crate) struct Isolated {
    pub(crate) tarantool: TarantoolProcess,
    pub(crate) config: Config,
    pub(crate) service: Running,
    pub(crate) client: EgressServiceClient<Channel>,
    pub(crate) store: Store,
    pub(crate) object_store: ObjectStore,
}

pub(crate) async fn isolated(tweak: impl FnOnce(&mut Config)) -> Isolated {
    let tarantool = TarantoolProcess::start();
    let mut config = tarantool.config();
    config.object_store.bucket_name = format!("mts-{}", uuid_hex());
    config.egress.maintenance_interval_ms = 100;
    config.egress.orphan_sweep_interval_seconds = 0;
    tweak(&mut config);
    let service = Running::start(EGRESS, config.clone(), mts_egress::run).await;
    Isolated {
        client: EgressServiceClient::connect(service.endpoint())
            .await
            .unwrap(),
        store: Store::connect(&config).await.unwrap(),
        object_store: ObjectStore::new(&config),
        service,
        tarantool,
        config,
    }
}

fn uuid_hex() -> String {
    testing::unique_subject("x")
        .rsplit('.')
        .next()
        .unwrap()
        .to_string()
}

impl Isolated {
    /// Publishes `size` bytes; offloaded ones go to S3 first, as the ingress does.
    pub(crate) async fn publish(
        &self,
        subject: &str,
        size: usize,
        offload: bool,
    ) -> (u64, Option<String>) {
        let data = vec![7u8; size];
        if offload {
            let key = self.new_key(subject);
            self.object_store.put(&key, data.into()).await.unwrap();
            let seq = self
                .store
                .publish(subject, &HashMap::new(), None, Some(&key), size as u64)
                .await
                .unwrap();
            (seq, Some(key))
        } else {
            let seq = self
                .store
                .publish(subject, &HashMap::new(), Some(&data), None, size as u64)
                .await
                .unwrap();
            (seq, None)
        }
    }

    /// A fresh object key of `subject`, laid out as the ingress lays it out.
    pub(crate) fn new_key(&self, subject: &str) -> String {
        self.object_store
            .new_key(&self.store.identity().store_id, subject)
    }

    /// The keys of `subject`'s objects in the bucket.
    pub(crate) async fn keys_of(&self, subject: &str) -> Vec<String> {
        let prefix = self
            .object_store
            .subject_prefix(&self.store.identity().store_id, subject);
        self.object_store.list_keys(&prefix).await.unwrap()
    }

    pub(crate) async fn limit(&mut self, subject: &str, limits: SubjectLimits) -> SubjectInfo {
        self.client
            .set_subject_limits(SetSubjectLimitsRequest {
                subject: subject.into(),
                limits: Some(limits),
            })
            .await
            .unwrap()
            .into_inner()
    }

    pub(crate) async fn info(&self, subject: &str) -> SubjectInfo {
        self.client
            .clone()
            .get_subject_info(SubjectRequest {
                subject: subject.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }
}

#[tokio::test]
async fn retention_by_count_removes_metadata_and_objects_together() {
    let mut t = isolated(|c| c.egress.retention_max_messages = 2).await;
    let limited = testing::unique_subject("by-count");
    let info = t
        .limit(
            &limited,
            SubjectLimits {
                max_messages: Some(3),
                ..SubjectLimits::default()
            },
        )
        .await;
    assert_eq!(info.limits.unwrap().max_messages, Some(3));
    let mut keys = Vec::new();
    for i in 0..6 {
        let (_, key) = t.publish(&limited, 10, i % 2 == 0).await;
        keys.push(key);
    }
    let defaulted = testing::unique_subject("by-default");
    for _ in 0..4 {
        t.publish(&defaulted, 10, false).await;
    }
    testing::eventually("the subject keeps its own 3 messages", || async {
        let info = t.info(&limited).await;
        (info.messages, info.first_sequence, info.last_sequence) == (3, 4, 6)
    })
    .await;
    testing::eventually("the service default keeps 2", || async {
        t.info(&defaulted).await.first_sequence == 3
    })
    .await;
    // Sequences 1, 3 and 5 were offloaded: 1 and 3 are gone with their metadata, 5 stays.
    testing::eventually("released objects are deleted", || async {
        t.keys_of(&limited).await.len() == 1
    })
    .await;
    assert!(
        t.object_store
            .exists(keys[4].as_ref().unwrap())
            .await
            .unwrap()
    );
    assert!(
        !t.object_store
            .exists(keys[0].as_ref().unwrap())
            .await
            .unwrap()
    );
    let info = t.info(&limited).await;
    assert_eq!((info.bytes, info.messages), (30, 3));
    t.service.stop().await.unwrap();
}

#[tokio::test]
async fn retention_by_bytes_keeps_the_newest_that_fit() {
    let mut t = isolated(|_| {}).await;
    let subject = testing::unique_subject("by-bytes");
    t.limit(
        &subject,
        SubjectLimits {
            max_bytes: Some(250),
            ..SubjectLimits::default()
        },
    )
    .await;
    for _ in 0..5 {
        t.publish(&subject, 100, true).await;
    }
    testing::eventually("200 of 500 bytes kept", || async {
        let info = t.info(&subject).await;
        (info.messages, info.bytes, info.first_sequence) == (2, 200, 4)
    })
    .await;
    testing::eventually("three objects deleted", || async {
        t.keys_of(&subject).await.len() == 2
    })
    .await;
    t.service.stop().await.unwrap();
}

#[tokio::test]
async fn retention_by_age_empties_a_subject_and_sequences_are_not_reused() {
    let mut t = isolated(|_| {}).await;
    let subject = testing::unique_subject("by-age");
    t.limit(
        &subject,
        SubjectLimits {
            max_age_ms: Some(300),
            ..SubjectLimits::default()
        },
    )
    .await;
    for _ in 0..3 {
        t.publish(&subject, 10, true).await;
    }
    testing::eventually("every message aged out", || async {
        t.info(&subject).await.messages == 0
    })
    .await;
    testing::eventually("and every object", || async {
        t.keys_of(&subject).await.is_empty()
    })
    .await;
    assert_eq!(
        t.publish(&subject, 10, false).await.0,
        4,
        "the next sequence is 4, not 1"
    );
    let info = t.info(&subject).await;
    assert_eq!(info.last_sequence, 4);
    t.service.stop().await.unwrap();
}

#[tokio::test]
async fn the_orphan_sweep_deletes_this_stores_objects_without_metadata_only() {
    let port = testing::free_port();
    let t = isolated(|c| {
        c.server.metrics_port = port;
        c.egress.orphan_grace_seconds = 1;
        c.egress.orphan_sweep_interval_seconds = 1;
    })
    .await;
    let subject = testing::unique_subject("orphans");
    // What else a shared bucket holds, all without metadata here: another
    // application's object, another store's, and one in the key layout this
    // service used before it had a prefix.
    let foreign = [
        "other-application/report.pdf".to_string(),
        t.object_store.new_key("another-store", &subject),
        format!("{subject}/written-before-prefixes"),
    ];
    for key in &foreign {
        t.object_store.put(key, vec![3u8; 10].into()).await.unwrap();
    }
    let (_, committed) = t.publish(&subject, 50, true).await;
    let committed = committed.unwrap();
    // An upload whose commit never came.
    let orphan = t.new_key(&subject);
    t.object_store
        .put(&orphan, vec![1u8; 50].into())
        .await
        .unwrap();
    testing::eventually("the orphan is swept", || async {
        !t.object_store.exists(&orphan).await.unwrap()
    })
    .await;
    assert!(
        t.object_store.exists(&committed).await.unwrap(),
        "an object with metadata stays"
    );
    // Swept at least twice since the foreign objects passed their grace period.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for key in &foreign {
        assert!(
            t.object_store.exists(key).await.unwrap(),
            "{key} is not ours to delete"
        );
    }
    let metrics = testing::scrape_metrics(port).await;
    assert!(
        metrics.contains("minitoolstream_orphan_objects_deleted_total 1"),
        "{metrics}"
    );
    // The sweep fenced the key: a commit arriving now is refused.
    let late = t
        .store
        .publish(&subject, &HashMap::new(), None, Some(&orphan), 50)
        .await
        .unwrap_err();
    assert_eq!(mts_runtime::status::store(late).code(), Code::Aborted);
    t.service.stop().await.unwrap();
}

#[tokio::test]
async fn one_replica_at_a_time_holds_the_maintenance_lease() {
    let t = isolated(|_| {}).await;
    let second = Running::start(EGRESS, t.config.clone(), mts_egress::run).await;
    let holder = || async {
        let (holders,): (Vec<String>,) = t
            .tarantool
            .admin_client()
            .await
            .eval(
                "local h = {} for _, l in box.space.mts_leases:pairs() do \
                 if l.name == 'maintenance' then h[#h + 1] = l.holder end end return h",
                (),
            )
            .await
            .unwrap();
        holders
    };
    testing::eventually("a holder", || async { holder().await.len() == 1 }).await;
    let first = holder().await;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(holder().await, first, "the lease stays with one replica");
    }
    second.stop().await.unwrap();
    t.service.stop().await.unwrap();
}

#[tokio::test]
async fn the_maintenance_replica_exports_consumer_lag() {
    let port = testing::free_port();
    let t = isolated(|c| c.server.metrics_port = port).await;
    let subject = testing::unique_subject("lag");
    for _ in 0..5 {
        t.publish(&subject, 10, false).await;
    }
    let fetched = t
        .store
        .fetch(&subject, "slow-reader", 2)
        .await
        .unwrap()
        .messages;
    assert_eq!(fetched.len(), 2);
    let series = |name: &str| format!(r#"{name}{{subject="{subject}",durable="slow-reader"}}"#);
    testing::eventually("lag gauges for the consumer", || async {
        let text = testing::scrape_metrics(port).await;
        text.contains(&format!(
            "{} 3",
            series("minitoolstream_consumer_pending_messages")
        )) && text.contains(&format!(
            "{} 2",
            series("minitoolstream_consumer_ack_pending_messages")
        )) && text.contains(&series(
            "minitoolstream_consumer_oldest_unacked_age_seconds",
        ))
    })
    .await;
    t.service.stop().await.unwrap();
}

#[tokio::test]
async fn a_running_backup_holds_object_deletions_until_it_stops() {
    let mut t = isolated(|_| {}).await;
    let subject = testing::unique_subject("held");
    let (_, first) = t.publish(&subject, 10, true).await;
    let (_, second) = t.publish(&subject, 10, true).await;
    let (first, second) = (first.unwrap(), second.unwrap());

    let checkpoint = t
        .store
        .backup_start(Duration::from_secs(60), Duration::from_secs(30))
        .await
        .unwrap();
    let files = &checkpoint.files;
    assert!(
        files
            .iter()
            .any(|(name, size)| name.ends_with(".snap") && *size > 0),
        "{files:?}"
    );
    t.limit(
        &subject,
        SubjectLimits {
            max_messages: Some(1),
            ..SubjectLimits::default()
        },
    )
    .await;
    testing::eventually("retention removes the first message", || async {
        t.info(&subject).await.first_sequence == 2
    })
    .await;
    // Many maintenance rounds later the object is still there, and the
    // backup lists it among the keys the checkpoint may name.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        t.object_store.exists(&first).await.unwrap(),
        "deleted during the backup"
    );
    let queued = t.store.backup_keys("gc", "", 100).await.unwrap();
    assert!(queued.iter().any(|(key, _)| *key == first), "{queued:?}");
    let stored = t.store.backup_keys("messages", "", 100).await.unwrap();
    assert!(
        stored
            .iter()
            .any(|(key, size)| *key == second && *size == 10),
        "{stored:?}"
    );
    assert!(!stored.iter().any(|(key, _)| *key == first), "{stored:?}");
    // Pinned files are readable; others are not.
    let (name, size) = files[0].clone();
    let head = t
        .store
        .backup_read(&checkpoint, &name, 0, size.min(64))
        .await
        .unwrap();
    assert!(head.starts_with(b"SNAP"), "{head:?}");
    assert!(
        t.store
            .backup_read(&checkpoint, "../etc/passwd", 0, 10)
            .await
            .is_err()
    );

    t.store.backup_stop(&checkpoint).await.unwrap();
    testing::eventually(
        "the held deletion happens once the backup stops",
        || async { !t.object_store.exists(&first).await.unwrap() },
    )
    .await;
    t.service.stop().await.unwrap();
}

#[tokio::test]
async fn an_empty_tarantool_pointed_at_an_old_bucket_deletes_nothing() {
    // A store that wrote payloads, then lost its Tarantool (a lost volume, a
    // restore mistake): a new, empty instance is started on the same bucket.
    let old = isolated(|_| {}).await;
    let subject = testing::unique_subject("recoverable");
    let mut payloads = Vec::new();
    for _ in 0..3 {
        payloads.push(old.publish(&subject, 40, true).await.1.unwrap());
    }
    let bucket = old.config.object_store.bucket_name.clone();
    old.service.stop().await.unwrap();
    drop(old.tarantool);

    let fresh = isolated(|c| {
        c.object_store.bucket_name = bucket;
        c.egress.orphan_grace_seconds = 1;
        c.egress.orphan_sweep_interval_seconds = 1;
    })
    .await;
    // A genuine orphan of the new store shows when its sweep has run.
    let orphan = fresh.new_key(&subject);
    fresh
        .object_store
        .put(&orphan, vec![1u8; 10].into())
        .await
        .unwrap();
    testing::eventually("the new store's sweep ran", || async {
        !fresh.object_store.exists(&orphan).await.unwrap()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for key in &payloads {
        assert!(
            fresh.object_store.exists(key).await.unwrap(),
            "{key} is still there for the operator to recover"
        );
    }
    fresh.service.stop().await.unwrap();
}
