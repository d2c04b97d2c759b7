//! Publishing on its own: sequences, dedup, offloaded keys and their fences,
//! retention's queue of released objects, and the backup hold.

use std::collections::HashMap;
use std::time::Duration;

use mts_storage::store::{Limits, NewMessage, Payload, Store};
use mts_testkit::{self as testing, TarantoolProcess};

fn with_id<'a>(
    subject: &'a str,
    headers: &'a HashMap<String, String>,
    id: &'a str,
) -> NewMessage<'a> {
    NewMessage {
        subject,
        headers,
        payload: Payload::Inline(b"x"),
        size: 1,
        sha256: Some("00"),
        message_id: Some(id),
        dedup_window: Duration::from_millis(300),
    }
}

#[tokio::test]
async fn a_message_id_is_stored_once_within_its_window() {
    let store = Store::connect(&testing::config()).await.unwrap();
    let subject = testing::unique_subject("dedup");
    let headers = HashMap::new();
    let first = store
        .publish_message(with_id(&subject, &headers, "a"))
        .await
        .unwrap();
    let again = store
        .publish_message(with_id(&subject, &headers, "a"))
        .await
        .unwrap();
    assert_eq!((first.seq, first.duplicate), (1, false));
    assert_eq!((again.seq, again.duplicate), (1, true));
    assert_eq!(store.seen_message_id(&subject, "a").await.unwrap(), Some(1));
    assert_eq!(store.seen_message_id(&subject, "b").await.unwrap(), None);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let later = store
        .publish_message(with_id(&subject, &headers, "a"))
        .await
        .unwrap();
    assert_eq!((later.seq, later.duplicate), (2, false));
    let stored = store.message(&subject, 1).await.unwrap().unwrap();
    assert_eq!(stored.sha256.as_deref(), Some("00"));
    assert_eq!(store.last_seq(&subject).await.unwrap(), 2);
}

#[tokio::test]
async fn settling_objects_fences_the_unnamed_and_reports_the_committed() {
    let store = Store::connect(&testing::config()).await.unwrap();
    let subject = testing::unique_subject("objects");
    let committed = format!("{subject}/committed");
    let seq = store
        .publish(&subject, &HashMap::new(), None, Some(&committed), 10)
        .await
        .unwrap();
    let orphan = format!("{subject}/orphan");
    let orphans = store
        .settle_objects(&[committed.clone(), orphan.clone()])
        .await
        .unwrap();
    assert_eq!(orphans, vec![orphan.clone()]);
    let late = store
        .publish(&subject, &HashMap::new(), None, Some(&orphan), 10)
        .await
        .unwrap_err();
    assert_eq!(
        late.refusal(),
        Some(mts_storage::store::Refusal::Abandoned),
        "{late}"
    );
    assert_eq!(
        store
            .settle_object(&committed, mts_storage::store::Error::closed())
            .await
            .unwrap(),
        Some(seq)
    );
}

#[tokio::test]
async fn retention_queues_released_objects_and_a_backup_holds_their_deletion() {
    let tarantool = TarantoolProcess::start();
    let store = Store::connect(&tarantool.config()).await.unwrap();
    let subject = testing::unique_subject("released");
    for i in 0..3 {
        let key = format!("{subject}/{i}");
        store
            .publish(&subject, &HashMap::new(), None, Some(&key), 10)
            .await
            .unwrap();
    }
    store
        .set_subject_limits(
            &subject,
            Limits {
                max_messages: Some(1),
                ..Limits::default()
            },
        )
        .await
        .unwrap();

    // A backup starts first: deletions wait for it.
    let checkpoint = store
        .backup_start(Duration::from_secs(60), Duration::from_secs(10))
        .await
        .unwrap();
    let files = &checkpoint.files;
    assert!(
        files
            .iter()
            .any(|(name, size)| name.ends_with(".snap") && *size > 0)
    );
    let (snap, _) = files.iter().find(|(n, _)| n.ends_with(".snap")).unwrap();
    let head = store.backup_read(&checkpoint, snap, 0, 4).await.unwrap();
    assert_eq!(head, b"SNAP");
    let keys = store.backup_keys("messages", "", 100).await.unwrap();
    assert_eq!(keys.len(), 3);

    let (_, removed) = store
        .retention_step("", Limits::default(), 100, 100)
        .await
        .unwrap();
    assert_eq!(removed, 2);
    assert!(
        store.released_objects(10).await.unwrap().is_empty(),
        "held while the backup runs"
    );
    let queued = store.backup_keys("gc", "", 100).await.unwrap();
    assert_eq!(queued.len(), 2, "the backup copies them still");
    store.backup_renew(Duration::from_secs(60)).await.unwrap();
    store.backup_stop(&checkpoint).await.unwrap();

    let released = store.released_objects(10).await.unwrap();
    assert_eq!(
        released,
        vec![format!("{subject}/0"), format!("{subject}/1")]
    );
    store.forget_objects(&released).await.unwrap();
    assert!(store.released_objects(10).await.unwrap().is_empty());
    assert_eq!(store.subject_info(&subject).await.unwrap().first_seq, 3);
}

/// Backup reads run side by side (a backup of several files, two backups, a
/// health probe's calls in between): each must get its own bytes. Tarantool
/// 2.6's `fio` reads into one buffer shared by every fiber when not handed
/// one, and the reads yield.
#[tokio::test]
async fn backup_reads_side_by_side_each_get_the_bytes_they_asked_for() {
    let tarantool = TarantoolProcess::start();
    let store = Store::connect(&tarantool.config()).await.unwrap();
    let subject = testing::unique_subject("backup-read");
    let headers = HashMap::new();
    // Bytes that differ along the file, so a chunk from elsewhere shows,
    // and that the snapshot's compression cannot shrink.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..200 {
        let body: Vec<u8> = (0..2000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        store
            .publish(&subject, &headers, Some(&body), None, body.len() as u64)
            .await
            .unwrap();
    }
    let checkpoint = store
        .backup_start(Duration::from_secs(60), Duration::from_secs(10))
        .await
        .unwrap();
    let (snap, size) = checkpoint
        .files
        .iter()
        .find(|(n, _)| n.ends_with(".snap"))
        .unwrap();
    let on_disk = std::fs::read(tarantool.dir().join(snap)).unwrap();
    assert_eq!(on_disk.len() as u64, *size);
    assert!(
        *size > 300_000,
        "a snapshot of {size} bytes is too small to cut up"
    );

    let chunk = 4099u64;
    let reads = (0..size.div_ceil(chunk)).map(|i| {
        let (store, checkpoint) = (&store, &checkpoint);
        async move {
            let offset = i * chunk;
            let length = chunk.min(size - offset);
            (
                offset,
                store
                    .backup_read(checkpoint, snap, offset, length)
                    .await
                    .unwrap(),
            )
        }
    });
    for (offset, bytes) in futures::future::join_all(reads).await {
        let end = (offset + chunk).min(*size) as usize;
        assert!(
            bytes == on_disk[offset as usize..end],
            "the chunk at {offset} ({} bytes) is not the file's",
            bytes.len()
        );
    }
    store.backup_stop(&checkpoint).await.unwrap();
}
