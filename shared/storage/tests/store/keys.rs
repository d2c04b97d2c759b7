//! Ordering keys against a real Tarantool: a consumer gets one message of a
//! key at a time, in order, while other keys and messages without a key go
//! on; whatever finishes a message (ack, nack and ack, rejection, dead
//! letter, cumulative ack, purge) lets its key go on, and a seek starts keys
//! over.

use std::collections::HashMap;

use mts_storage::store::{
    ConsumerSettings, ORDERING_KEY_HEADER, PurgeStep, Seek, Store, StoredMessage,
};
use mts_testkit as testing;

/// Publishes one message per entry: its ordering key, or none.
async fn publish(store: &Store, subject: &str, keys: &[Option<&str>]) {
    for key in keys {
        let mut headers = HashMap::new();
        if let Some(key) = key {
            headers.insert(ORDERING_KEY_HEADER.to_owned(), (*key).to_owned());
        }
        store
            .publish(subject, &headers, Some(b"x"), None, 1)
            .await
            .unwrap();
    }
}

async fn fetch(store: &Store, subject: &str, limit: u32) -> Vec<u64> {
    let batch = store.fetch(subject, "d", limit).await.unwrap();
    batch.messages.iter().map(|l| l.message.seq).collect()
}

async fn ack(store: &Store, subject: &str, seqs: &[u64]) {
    store
        .ack_sequences(subject, "d", seqs)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{seqs:?} held: {e:?}"));
}

async fn keyed_subject(name: &str, keys: &[Option<&str>]) -> (Store, String) {
    let store = Store::connect(&testing::config()).await.unwrap();
    let subject = testing::unique_subject(name);
    publish(&store, &subject, keys).await;
    (store, subject)
}

const A: Option<&str> = Some("a");
const B: Option<&str> = Some("b");

#[tokio::test]
async fn a_key_goes_one_message_at_a_time_in_order_while_others_go_on() {
    // 1 a, 2 b, 3 a, 4 (none), 5 b, 6 a
    let (store, subject) = keyed_subject("keys-order", &[A, B, A, None, B, A]).await;
    assert_eq!(fetch(&store, &subject, 10).await, [1, 2, 4]);
    let info = store.consumer_info(&subject, "d").await.unwrap().unwrap();
    assert_eq!(
        (info.num_ack_pending, info.num_pending),
        (3, 3),
        "3, 5, 6 wait"
    );
    // A waiting message is not the consumer's to ack.
    let refused = store.ack_sequences(&subject, "d", &[3]).await.unwrap();
    assert_eq!(refused.unwrap_err().0, [3]);

    // Nacked, a key's message comes back before the next of its key.
    store.nack(&subject, "d", &[1], 0).await.unwrap().unwrap();
    let again = store.fetch(&subject, "d", 10).await.unwrap();
    let seqs: Vec<(u64, u32)> = again
        .messages
        .iter()
        .map(|l| (l.message.seq, l.deliveries))
        .collect();
    assert_eq!(seqs, [(1, 2)]);
    ack(&store, &subject, &[1]).await;
    assert_eq!(fetch(&store, &subject, 10).await, [3]);
    ack(&store, &subject, &[2, 4]).await;
    assert_eq!(fetch(&store, &subject, 10).await, [5]);
    ack(&store, &subject, &[3, 5]).await;
    let last = store.fetch(&subject, "d", 10).await.unwrap();
    assert_eq!(last.messages.len(), 1);
    assert_eq!(
        (last.messages[0].message.seq, last.messages[0].deliveries),
        (6, 1)
    );
    ack(&store, &subject, &[6]).await;
    assert!(fetch(&store, &subject, 10).await.is_empty());
    let info = store.consumer_info(&subject, "d").await.unwrap().unwrap();
    assert_eq!(
        (
            info.ack_floor,
            info.num_pending,
            info.num_ack_pending,
            info.num_redelivered
        ),
        (6, 0, 0, 0)
    );
    // Each consumer keeps its own turns.
    let other = store.fetch(&subject, "other", 10).await.unwrap();
    let seqs: Vec<u64> = other.messages.iter().map(|l| l.message.seq).collect();
    assert_eq!(seqs, [1, 2, 4]);
}

#[tokio::test]
async fn a_rejected_or_dead_lettered_message_lets_its_key_go_on() {
    let (store, subject) = keyed_subject("keys-reject", &[A, A, A]).await;
    store
        .create_or_update_consumer(
            &subject,
            "d",
            &ConsumerSettings {
                max_deliver: Some(1),
                ack_wait_ms: Some(3_600_000),
                ..ConsumerSettings::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(fetch(&store, &subject, 10).await, [1]);
    store
        .reject(&subject, "d", &[1], "bad", &[] as &[StoredMessage])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fetch(&store, &subject, 10).await, [2]);
    // Its one delivery used: due again, it is dead-lettered, and 3 goes out.
    store.nack(&subject, "d", &[2], 0).await.unwrap().unwrap();
    assert_eq!(fetch(&store, &subject, 10).await, [3]);
    let dlq = store.subject_info(&format!("{subject}.dlq")).await.unwrap();
    assert_eq!(dlq.count, 2);
}

#[tokio::test]
async fn a_cumulative_ack_a_purge_and_a_seek_keep_keys_in_step() {
    let (store, subject) = keyed_subject("keys-cumulative", &[A, A, A, A, B, B]).await;
    assert_eq!(fetch(&store, &subject, 10).await, [1, 5]);
    // AckMessage through 2: 1 delivered and 2 waiting both done; 3 is next.
    store.ack_message(&subject, "d", 2).await.unwrap();
    assert_eq!(fetch(&store, &subject, 10).await, [3]);

    // A purge through 5 finishes 3 and 5 and takes a's 4: b's 6 goes on.
    let (step, _) = store.purge_step(&subject, 5, 500, None).await.unwrap();
    assert!(matches!(step, PurgeStep::Done(5)), "{step:?}");
    assert_eq!(fetch(&store, &subject, 10).await, [6]);

    // Seeking back starts every key over from the new start.
    publish(&store, &subject, &[A, B]).await;
    store.seek(&subject, "d", Seek::After(5)).await.unwrap();
    assert_eq!(fetch(&store, &subject, 10).await, [6, 7]);
    ack(&store, &subject, &[6, 7]).await;
    assert_eq!(fetch(&store, &subject, 10).await, [8]);
}

#[tokio::test]
async fn releases_and_lease_ends_keep_a_key_with_its_message() {
    let (store, subject) = keyed_subject("keys-release", &[A, A]).await;
    store
        .create_or_update_consumer(
            &subject,
            "d",
            &ConsumerSettings {
                ack_wait_ms: Some(50),
                ..ConsumerSettings::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(fetch(&store, &subject, 10).await, [1]);
    store.release(&subject, "d", &[1, 2]).await.unwrap();
    assert_eq!(
        fetch(&store, &subject, 10).await,
        [1],
        "2 was not released: it was never out"
    );
    tokio::time::sleep(std::time::Duration::from_millis(80)).await;
    let again = store.fetch(&subject, "d", 10).await.unwrap();
    let seqs: Vec<(u64, u32)> = again
        .messages
        .iter()
        .map(|l| (l.message.seq, l.deliveries))
        .collect();
    assert_eq!(seqs, [(1, 3)], "its lease ran out: 1 again, still before 2");
}

#[tokio::test]
async fn keyed_messages_committed_together_keep_their_keys() {
    let store = Store::connect(&testing::config()).await.unwrap();
    let subject = testing::unique_subject("keys-group");
    let queued: Vec<_> = [A, A, B, None, A, B]
        .into_iter()
        .map(|key| {
            let mut message = crate::inline(&subject, b"grouped");
            if let Some(key) = key {
                message
                    .headers
                    .insert(ORDERING_KEY_HEADER.to_owned(), key.to_owned());
            }
            store.publish_inline(message)
        })
        .collect();
    let published = futures::future::try_join_all(queued).await.unwrap();
    let seqs: Vec<u64> = published.iter().map(|p| p.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);
    assert_eq!(fetch(&store, &subject, 10).await, [1, 3, 4]);
}

#[tokio::test]
async fn a_key_backlog_longer_than_one_look_does_not_hide_the_next_key() {
    let mut keys = vec![A; 3001];
    keys.push(B);
    let (store, subject) = keyed_subject("keys-backlog", &keys).await;
    assert_eq!(fetch(&store, &subject, 10).await, [1]);
    // Three thousand of a's wait behind 1; b's first comes out all the same.
    assert_eq!(fetch(&store, &subject, 10).await, [3002]);
    let info = store.consumer_info(&subject, "d").await.unwrap().unwrap();
    assert_eq!((info.num_ack_pending, info.num_pending), (2, 3000));
    ack(&store, &subject, &[1]).await;
    assert_eq!(fetch(&store, &subject, 10).await, [2]);
}
