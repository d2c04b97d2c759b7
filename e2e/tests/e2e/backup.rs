//! Backup and restore with the real `mts-backup` binary: a Tarantool and an
//! S3 server of the test's own are backed up, destroyed, restored, and every
//! message, sequence counter and consumer position is back.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use mts_config::Config;
use mts_proto::pb::{
    AckRequest, ConsumerRequest, GetLastSequenceRequest, PublishRequest, SubjectRequest,
};
use mts_storage::object_store::ObjectStore;
use mts_testkit::{self as testing, GarageProcess, TarantoolProcess};
use sha2::{Digest, Sha256};

use crate::binaries::{binary, dependency_env};
use crate::system::System;

/// Runs `mts-backup` against `config`'s Tarantool and bucket.
fn mts_backup(config: &Config, args: &[&str]) -> (bool, String) {
    let output = Command::new(binary("mts-backup"))
        .args(args)
        .envs(dependency_env(config))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn publish(subject: &str, data: Vec<u8>) -> PublishRequest {
    PublishRequest {
        subject: subject.into(),
        data: data.into(),
        headers: HashMap::from([("kind".to_string(), "backup-test".to_string())]),
        message_id: String::new(),
        ordering_key: String::new(),
    }
}

/// Deletes Tarantool's checkpoints and WAL, as a lost volume would.
fn destroy_tarantool_data(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".snap") || name.ends_with(".xlog") {
            std::fs::remove_file(path).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restore_brings_back_every_message_counter_and_consumer_position() {
    let mut tarantool = TarantoolProcess::start();
    let garage = GarageProcess::start();
    let mut config = tarantool.config();
    config.object_store.endpoint = garage.endpoint();
    // Every message moves to a segment within a moment: the backup must
    // carry the cold tier too.
    config.tiering.segment_seal_age_ms = 100;
    let system = System::start(config.clone()).await;
    let mut publisher = system.publisher().await;
    let mut subscriber = system.subscriber().await;
    let orders = testing::unique_subject("orders");
    let audit = testing::unique_subject("audit");

    // A mix of inline and offloaded payloads on two subjects.
    let big = config.ingress.inline_threshold_bytes as usize;
    let payloads: Vec<(String, Vec<u8>)> = vec![
        (orders.clone(), b"first".to_vec()),
        (orders.clone(), vec![7u8; big + 1]),
        (audit.clone(), b"audit one".to_vec()),
        (
            orders.clone(),
            (0..=255u8).cycle().take(700 * 1024).collect(),
        ),
        (orders.clone(), b"fourth".to_vec()),
        (audit.clone(), vec![9u8; big * 2]),
        (orders.clone(), Vec::new()),
    ];
    let mut expected: HashMap<(String, u64), String> = HashMap::new();
    for (subject, data) in &payloads {
        let reply = publisher
            .publish(publish(subject, data.clone()))
            .await
            .unwrap()
            .into_inner();
        expected.insert(
            (subject.clone(), reply.sequence),
            hex::encode(Sha256::digest(data)),
        );
    }
    // Consumers at various positions: 3 of 5, none, all of audit.
    for (subject, durable, upto) in [(&orders, "billing", 3), (&audit, "archive", 2)] {
        system.fetch(subject, durable, 10).await;
        subscriber
            .ack_message(AckRequest {
                durable_name: durable.into(),
                subject: subject.clone(),
                sequence: upto,
            })
            .await
            .unwrap();
    }
    system.fetch(&orders, "idle", 1).await;
    testing::eventually("every message in a segment", || {
        let (mut client, orders, audit) = (subscriber.clone(), orders.clone(), audit.clone());
        async move {
            let mut all_cold = true;
            for subject in [&orders, &audit] {
                let info = client
                    .get_subject_info(SubjectRequest {
                        subject: subject.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                all_cold &= info.messages > 0 && info.cold_messages == info.messages;
            }
            all_cold
        }
    })
    .await;
    let (segments,): (u64,) = tarantool
        .admin_client()
        .await
        .eval("return box.space.mts_segments:len()", ())
        .await
        .unwrap();
    assert!(segments >= 2);

    let backup_dir = tarantool.dir().with_extension("backup");
    let (ok, output) = mts_backup(&config, &["backup", "--to", backup_dir.to_str().unwrap()]);
    assert!(ok, "{output}");
    // The three offloaded payloads and the segments.
    assert!(
        output.contains(&format!("{} objects", 3 + segments)) && output.contains(".snap"),
        "the summary says what was saved: {output}"
    );
    // Published after the backup: not part of it.
    publisher
        .publish(publish(&orders, b"after the backup".to_vec()))
        .await
        .unwrap();
    system.stop().await;

    // Lose everything.
    tarantool.kill();
    destroy_tarantool_data(tarantool.dir());
    let object_store = ObjectStore::new(&config);
    for key in object_store.list_keys("").await.unwrap() {
        object_store.delete(&key).await.unwrap();
    }
    assert!(object_store.list_keys("").await.unwrap().is_empty());

    let restore = [
        "restore",
        "--from",
        backup_dir.to_str().unwrap(),
        "--tarantool-dir",
        tarantool.dir().to_str().unwrap(),
    ];
    let (ok, output) = mts_backup(&config, &restore);
    assert!(ok, "{output}");
    // A second restore finds the targets no longer empty and says so.
    let (ok, refused) = mts_backup(&config, &restore);
    assert!(
        !ok && refused.contains("already holds"),
        "a non-empty target is refused: {refused}"
    );
    tarantool.restart();

    let system = System::start(config.clone()).await;
    let mut publisher = system.publisher().await;
    let mut subscriber = system.subscriber().await;
    for (subject, last) in [(&orders, 5), (&audit, 2)] {
        let restored = subscriber
            .get_last_sequence(GetLastSequenceRequest {
                subject: subject.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .last_sequence;
        assert_eq!(restored, last, "{subject}'s counter");
        let messages = system.fetch(subject, "verify", 100).await;
        assert_eq!(messages.len() as u64, last, "{subject}");
        for message in messages {
            let want = &expected[&(subject.clone(), message.sequence)];
            assert_eq!(
                &hex::encode(Sha256::digest(&message.data)),
                want,
                "{subject} #{} bytes",
                message.sequence
            );
            assert_eq!(&message.sha256, want);
            assert_eq!(message.headers["kind"], "backup-test");
        }
    }
    for (subject, durable, floor) in [
        (&orders, "billing", 3),
        (&audit, "archive", 2),
        (&orders, "idle", 0),
    ] {
        let info = subscriber
            .get_consumer_info(ConsumerRequest {
                subject: subject.clone(),
                durable_name: durable.into(),
            })
            .await
            .unwrap_or_else(|status| panic!("consumer {durable} is back: {status:?}"))
            .into_inner();
        assert_eq!(info.ack_floor, floor, "{durable}'s position");
    }
    // Publishing continues with the next sequence.
    let next = publisher
        .publish(publish(&orders, b"after the restore".to_vec()))
        .await
        .unwrap()
        .into_inner()
        .sequence;
    assert_eq!(next, 6);
    system.stop().await;
    let _ = std::fs::remove_dir_all(backup_dir);
}
