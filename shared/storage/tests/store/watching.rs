//! A watcher's wait (mts_wait with what it has seen): it returns on a
//! commit, on a release of any kind, and when a lease ends, and otherwise
//! sleeps through its whole wait.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mts_storage::store::{ConsumerSettings, Seek, Store, Watch, Watched};
use mts_testkit as testing;

/// Longer than any wait below should take: a wait that returns this late
/// slept through what should have woken it.
const LONG: Duration = Duration::from_secs(20);

/// A subject with `n` messages, consumer "d" with `settings`, and a watcher
/// past its first wait (which returns at once).
async fn watched(name: &str, n: u8, settings: ConsumerSettings) -> (Store, String, Watch) {
    let store = Store::connect(&testing::config()).await.unwrap();
    let subject = testing::unique_subject(name);
    for i in 0..n {
        store
            .publish(&subject, &HashMap::new(), Some(&[i]), None, 1)
            .await
            .unwrap();
    }
    store
        .create_or_update_consumer(&subject, "d", &settings)
        .await
        .unwrap();
    let first = store.watch(&subject, Watch::default(), LONG).await.unwrap();
    assert!(first.now.epoch.is_some());
    assert_eq!(first.now.last, u64::from(n));
    (store, subject, first.now)
}

/// Waits as a watcher in the background: the handle gives what the wait
/// found and how long it took.
fn wait(store: &Store, subject: &str, seen: Watch) -> tokio::task::JoinHandle<(Watched, Duration)> {
    let (store, subject) = (store.clone(), subject.to_owned());
    tokio::spawn(async move {
        let started = Instant::now();
        let watched = store.watch(&subject, seen, LONG).await.unwrap();
        (watched, started.elapsed())
    })
}

/// Lets a background wait reach Tarantool before what should wake it.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(200)).await;
}

fn an_hour() -> ConsumerSettings {
    ConsumerSettings {
        ack_wait_ms: Some(3_600_000),
        ..ConsumerSettings::default()
    }
}

#[tokio::test]
async fn a_commit_wakes_a_watcher_without_a_release() {
    let (store, subject, seen) = watched("watch-commit", 1, an_hour()).await;
    let waiting = wait(&store, &subject, seen);
    settle().await;
    store
        .publish(&subject, &HashMap::new(), Some(b"x"), None, 1)
        .await
        .unwrap();
    let (watched, took) = waiting.await.unwrap();
    assert!(took < LONG / 2, "{took:?}");
    assert_eq!(watched.now.last, 2);
    assert!(!watched.released);
}

#[tokio::test]
async fn a_nack_and_a_release_wake_a_watcher() {
    let (store, subject, seen) = watched("watch-nack", 2, an_hour()).await;
    assert_eq!(
        store.fetch(&subject, "d", 2).await.unwrap().messages.len(),
        2
    );

    let waiting = wait(&store, &subject, seen);
    settle().await;
    store.nack(&subject, "d", &[1], 0).await.unwrap().unwrap();
    let (watched, took) = waiting.await.unwrap();
    assert!(took < LONG / 2, "{took:?}");
    assert!(watched.released);
    assert_eq!(watched.now.last, 2, "no commit");

    let waiting = wait(&store, &subject, watched.now);
    settle().await;
    store.release(&subject, "d", &[2]).await.unwrap();
    let (watched, took) = waiting.await.unwrap();
    assert!(took < LONG / 2 && watched.released, "{took:?} {watched:?}");
}

#[tokio::test]
async fn a_seek_wakes_a_watcher() {
    let (store, subject, seen) = watched("watch-seek", 3, an_hour()).await;
    assert_eq!(
        store.fetch(&subject, "d", 3).await.unwrap().messages.len(),
        3
    );
    store
        .ack_sequences(&subject, "d", &[1, 2, 3])
        .await
        .unwrap()
        .unwrap();
    let seen = store
        .watch(&subject, seen, Duration::ZERO)
        .await
        .unwrap()
        .now;
    let waiting = wait(&store, &subject, seen);
    settle().await;
    store.seek(&subject, "d", Seek::After(0)).await.unwrap();
    let (watched, took) = waiting.await.unwrap();
    assert!(took < LONG / 2 && watched.released, "{took:?} {watched:?}");
}

#[tokio::test]
async fn a_lease_ending_wakes_a_watcher_when_it_ends() {
    let (store, subject, seen) = watched(
        "watch-lapse",
        1,
        ConsumerSettings {
            ack_wait_ms: Some(700),
            ..ConsumerSettings::default()
        },
    )
    .await;
    // The watcher sleeps with no lease to wait for; the lease taken after
    // it began must still wake it when it ends.
    let waiting = wait(&store, &subject, seen);
    settle().await;
    assert_eq!(
        store.fetch(&subject, "d", 1).await.unwrap().messages.len(),
        1
    );
    let (watched, took) = waiting.await.unwrap();
    println!("a 700 ms lease taken 200 ms into the wait woke the watcher after {took:?}");
    assert!(watched.released, "{watched:?}");
    assert!(
        took >= Duration::from_millis(800) && took < LONG / 2,
        "woken when the lease ended, not before: {took:?}"
    );
    // Reported once: the next wait sleeps until something else happens.
    let again = store
        .watch(&subject, watched.now, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(!again.released, "{again:?}");
}

#[tokio::test]
async fn a_lease_cut_short_by_an_extension_wakes_a_watcher_when_it_ends() {
    let (store, subject, seen) = watched("watch-shorter", 1, an_hour()).await;
    assert_eq!(
        store.fetch(&subject, "d", 1).await.unwrap().messages.len(),
        1
    );
    let seen = store
        .watch(&subject, seen, Duration::ZERO)
        .await
        .unwrap()
        .now;
    let waiting = wait(&store, &subject, seen);
    settle().await;
    store
        .extend_leases(&subject, "d", &[1], Some(300))
        .await
        .unwrap()
        .unwrap();
    let (watched, took) = waiting.await.unwrap();
    assert!(watched.released, "{watched:?}");
    assert!(took < LONG / 2, "{took:?}");
}

#[tokio::test]
async fn an_ack_wakes_a_watcher_only_for_a_consumer_found_without_room() {
    let (store, subject, seen) = watched(
        "watch-room",
        3,
        ConsumerSettings {
            ack_wait_ms: Some(3_600_000),
            max_ack_pending: Some(2),
            ..ConsumerSettings::default()
        },
    )
    .await;
    assert_eq!(
        store.fetch(&subject, "d", 1).await.unwrap().messages.len(),
        1
    );
    let seen = store
        .watch(&subject, seen, Duration::ZERO)
        .await
        .unwrap()
        .now;
    // Room left: an ack brings nothing a look would not have found.
    let waiting = wait(&store, &subject, seen);
    settle().await;
    store
        .ack_sequences(&subject, "d", &[1])
        .await
        .unwrap()
        .unwrap();
    let quiet = store
        .watch(&subject, seen, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(!quiet.released, "{quiet:?}");
    waiting.abort();

    // A look that found the consumer full: the next ack wakes the watcher.
    assert_eq!(
        store.fetch(&subject, "d", 5).await.unwrap().messages.len(),
        2
    );
    assert!(
        store
            .fetch(&subject, "d", 5)
            .await
            .unwrap()
            .messages
            .is_empty()
    );
    let seen = store
        .watch(&subject, quiet.now, Duration::ZERO)
        .await
        .unwrap()
        .now;
    let waiting = wait(&store, &subject, seen);
    settle().await;
    store
        .ack_sequences(&subject, "d", &[2])
        .await
        .unwrap()
        .unwrap();
    let (watched, took) = waiting.await.unwrap();
    assert!(took < LONG / 2 && watched.released, "{took:?} {watched:?}");
}
