//! Leases, acks, nacks, redelivery, dead letters and consumer state: the
//! consumer procedures on their own, against a real Tarantool.

use std::collections::HashMap;
use std::time::Duration;

use mts_storage::store::{AckOutcome, ConsumerSettings, DeliverPolicy, Seek, Store};
use mts_testkit as testing;

/// A store on the shared test Tarantool and a subject with `n` messages.
async fn subject_with(name: &str, n: u8) -> (Store, String) {
    let store = Store::connect(&testing::config()).await.unwrap();
    let subject = testing::unique_subject(name);
    for i in 0..n {
        store
            .publish(&subject, &HashMap::new(), Some(&[i]), None, 1)
            .await
            .unwrap();
    }
    (store, subject)
}

/// As `subject_with`, and durable consumer "d" created with `settings`.
async fn consumer_with(name: &str, n: u8, settings: ConsumerSettings) -> (Store, String) {
    let (store, subject) = subject_with(name, n).await;
    store
        .create_or_update_consumer(&subject, "d", &settings)
        .await
        .unwrap();
    (store, subject)
}

fn seqs(batch: &mts_storage::store::Batch) -> Vec<u64> {
    batch.messages.iter().map(|l| l.message.seq).collect()
}

#[tokio::test]
async fn competing_consumers_lease_disjoint_messages_and_acks_move_the_floor() {
    let (store, subject) = subject_with("lease", 5).await;
    let first = store.fetch(&subject, "d", 2).await.unwrap();
    let second = store.fetch(&subject, "d", 2).await.unwrap();
    assert_eq!((seqs(&first), seqs(&second)), (vec![1, 2], vec![3, 4]));
    assert!(first.next_deadline_ns > 0);
    assert_eq!(first.messages[0].deliveries, 1);

    // Acks of sequences not held change nothing, and name what was not held.
    let refused = store.ack_sequences(&subject, "d", &[2, 5]).await.unwrap();
    assert_eq!(refused.unwrap_err().0, vec![5]);
    assert_eq!(
        store.ack_sequences(&subject, "d", &[2]).await.unwrap(),
        Ok(0)
    );
    assert_eq!(
        store.ack_sequences(&subject, "d", &[1]).await.unwrap(),
        Ok(2)
    );
    let info = store.consumer_info(&subject, "d").await.unwrap().unwrap();
    assert_eq!(
        (
            info.ack_floor,
            info.last_delivered,
            info.num_ack_pending,
            info.num_pending
        ),
        (2, 4, 2, 1)
    );
}

#[tokio::test]
async fn a_nack_or_a_lapsed_lease_redelivers_and_max_deliver_dead_letters() {
    let (store, subject) = consumer_with(
        "redeliver",
        2,
        ConsumerSettings {
            ack_wait_ms: Some(100),
            max_deliver: Some(2),
            ..ConsumerSettings::default()
        },
    )
    .await;
    let batch = store.fetch(&subject, "d", 10).await.unwrap();
    assert_eq!(seqs(&batch), vec![1, 2]);
    store.nack(&subject, "d", &[1], 0).await.unwrap().unwrap();
    let again = store.fetch(&subject, "d", 10).await.unwrap();
    assert_eq!(seqs(&again), vec![1]);
    assert_eq!(again.messages[0].deliveries, 2);

    // Both leases lapse; both reached max_deliver 2 only for #1.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let third = store.fetch(&subject, "d", 10).await.unwrap();
    assert_eq!(seqs(&third), vec![2], "#1 went to the dead-letter subject");
    assert_eq!(third.messages[0].deliveries, 2);
    let dlq = format!("{subject}.dlq");
    let letter = store.message(&dlq, 1).await.unwrap().unwrap();
    assert_eq!(letter.data.as_deref().map(|d| d.to_vec()), Some(vec![0]));
    assert_eq!(letter.headers["mts-origin-subject"], subject);
    assert_eq!(letter.headers["mts-origin-sequence"], "1");
    assert_eq!(letter.headers["mts-origin-durable"], "d");
    assert_eq!(letter.headers["mts-origin-delivery-count"], "2");
    let info = store.consumer_info(&subject, "d").await.unwrap().unwrap();
    assert_eq!(info.ack_floor, 1, "a dead-lettered message counts as acked");
}

#[tokio::test]
async fn an_extended_lease_runs_out_when_the_extension_says_and_keeps_its_delivery_count() {
    let (store, subject) = consumer_with(
        "extend",
        3,
        ConsumerSettings {
            ack_wait_ms: Some(100),
            ..ConsumerSettings::default()
        },
    )
    .await;
    let batch = store.fetch(&subject, "d", 2).await.unwrap();
    assert_eq!(seqs(&batch), vec![1, 2]);
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    };
    // Part of a run: #1 for 400 ms, #2 keeps its 100.
    let asked = now();
    let deadline = store
        .extend_leases(&subject, "d", &[1], Some(400))
        .await
        .unwrap()
        .unwrap();
    assert!(deadline >= asked + 400_000_000 && deadline < now() + 450_000_000);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        seqs(&store.fetch(&subject, "d", 10).await.unwrap()),
        vec![2, 3]
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Due again in the order their leases ran out.
    let again = store.fetch(&subject, "d", 10).await.unwrap();
    assert_eq!(seqs(&again), vec![2, 3, 1]);
    assert_eq!(
        again.messages[2].deliveries, 2,
        "one more delivery, not two"
    );

    // Without a length: the consumer's ack_wait.
    let asked = now();
    let deadline = store
        .extend_leases(&subject, "d", &[1, 3], None)
        .await
        .unwrap()
        .unwrap();
    assert!(deadline >= asked + 100_000_000 && deadline < now() + 150_000_000);
    // Nothing changes when one is not held.
    store
        .ack_sequences(&subject, "d", &[3])
        .await
        .unwrap()
        .unwrap();
    let refused = store
        .extend_leases(&subject, "d", &[1, 3], Some(60_000))
        .await
        .unwrap();
    assert_eq!(refused.unwrap_err().0, vec![3]);
    let unknown = store
        .extend_leases(&subject, "nobody", &[1], None)
        .await
        .unwrap();
    assert_eq!(unknown.unwrap_err().0, vec![1]);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        seqs(&store.fetch(&subject, "d", 10).await.unwrap()),
        vec![2, 1]
    );
}

#[tokio::test]
async fn a_rejected_message_is_dead_lettered_with_its_reason_or_dropped_and_never_delivered_again()
{
    let (store, subject) = consumer_with(
        "reject",
        4,
        ConsumerSettings {
            ack_wait_ms: Some(100),
            ..ConsumerSettings::default()
        },
    )
    .await;
    assert_eq!(
        seqs(&store.fetch(&subject, "d", 3).await.unwrap()),
        vec![1, 2, 3]
    );
    // Nothing changes when one is not held.
    let refused = store
        .reject(&subject, "d", &[1, 4], "bad", &[])
        .await
        .unwrap();
    assert_eq!(refused.unwrap_err().0, vec![4]);
    let rejected = store
        .reject(&subject, "d", &[1, 3], "cannot parse", &[])
        .await
        .unwrap()
        .unwrap();
    assert_eq!((rejected.ack_floor, rejected.in_segments), (1, vec![]));
    let dlq = format!("{subject}.dlq");
    for (letter, origin) in [(1, 1u8), (2, 3)] {
        let copy = store.message(&dlq, letter).await.unwrap().unwrap();
        assert_eq!(copy.data.as_deref(), Some(&[origin - 1][..]));
        assert_eq!(copy.headers["mts-reject-reason"], "cannot parse");
        assert_eq!(copy.headers["mts-origin-sequence"], origin.to_string());
        assert_eq!(copy.headers["mts-origin-delivery-count"], "1");
    }
    // Leases run out: #2 comes back, the rejected ones never do.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        seqs(&store.fetch(&subject, "d", 10).await.unwrap()),
        vec![2, 4]
    );
    let info = store.consumer_info(&subject, "d").await.unwrap().unwrap();
    assert_eq!((info.num_rejected, info.num_ack_pending), (2, 2));

    // Without a dead-letter subject a rejected message is dropped.
    store
        .create_or_update_consumer(
            &subject,
            "quiet",
            &ConsumerSettings {
                dlq_subject: Some(String::new()),
                ..ConsumerSettings::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        seqs(&store.fetch(&subject, "quiet", 1).await.unwrap()),
        vec![1]
    );
    let rejected = store
        .reject(&subject, "quiet", &[1], "", &[])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rejected.ack_floor, 1);
    assert_eq!(store.subject_info(&dlq).await.unwrap().count, 2);
    let info = store
        .consumer_info(&subject, "quiet")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(info.num_rejected, 1);
}

#[tokio::test]
async fn a_seek_drops_every_lease_and_delivers_anew_from_the_new_start() {
    let (store, subject) = subject_with("seek", 5).await;
    assert_eq!(
        seqs(&store.fetch(&subject, "d", 10).await.unwrap()),
        vec![1, 2, 3, 4, 5]
    );
    store
        .ack_sequences(&subject, "d", &[1, 2, 3])
        .await
        .unwrap()
        .unwrap();

    // Back: from #2 on, delivered anew; the leases of #4 and #5 are gone.
    assert_eq!(
        store.seek(&subject, "d", Seek::After(1)).await.unwrap(),
        Some(1)
    );
    let info = store.consumer_info(&subject, "d").await.unwrap().unwrap();
    assert_eq!(
        (
            info.ack_floor,
            info.last_delivered,
            info.num_ack_pending,
            info.num_pending
        ),
        (1, 1, 0, 4)
    );
    let again = store.fetch(&subject, "d", 10).await.unwrap();
    assert_eq!(seqs(&again), vec![2, 3, 4, 5]);
    assert!(again.messages.iter().all(|l| l.deliveries == 1));

    // Forward: past everything but #5.
    assert_eq!(
        store.seek(&subject, "d", Seek::After(4)).await.unwrap(),
        Some(4)
    );
    assert_eq!(
        seqs(&store.fetch(&subject, "d", 10).await.unwrap()),
        vec![5]
    );

    // By time: from the first message committed at or after it.
    assert_eq!(
        store.seek(&subject, "d", Seek::Time(0)).await.unwrap(),
        Some(0)
    );
    assert_eq!(
        seqs(&store.fetch(&subject, "d", 10).await.unwrap()),
        vec![1, 2, 3, 4, 5]
    );
    let later = u64::MAX / 2;
    assert_eq!(
        store.seek(&subject, "d", Seek::Time(later)).await.unwrap(),
        Some(5)
    );
    assert!(
        store
            .fetch(&subject, "d", 10)
            .await
            .unwrap()
            .messages
            .is_empty()
    );

    assert_eq!(
        store
            .seek(&subject, "nobody", Seek::After(0))
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn acks_ride_with_the_next_lease_and_release_gives_leases_back() {
    let (store, subject) = subject_with("ack-consume", 4).await;
    let batch = store
        .consume(&subject, "d", &[], 2, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(seqs(&batch), vec![1, 2]);
    let next = store
        .consume(&subject, "d", &[1, 2], 2, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!((seqs(&next), next.not_held), (vec![3, 4], vec![]));
    // An ack of a sequence not held is left out; the others apply.
    let partly = store
        .consume(&subject, "d", &[1, 4], 2, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(partly.not_held, vec![1], "acked already");
    let info = store.consumer_info(&subject, "d").await.unwrap().unwrap();
    assert_eq!((info.ack_floor, info.num_ack_pending), (2, 1), "#4 acked");

    store.release(&subject, "d", &[3]).await.unwrap();
    let back = store.fetch(&subject, "d", 10).await.unwrap();
    assert_eq!(seqs(&back), vec![3]);
    assert!(back.messages.iter().all(|l| l.deliveries == 2));

    // With nothing to hand out, the call waits for the next commit.
    let waiting = {
        let (store, subject) = (store.clone(), subject.clone());
        tokio::spawn(async move {
            store
                .consume(&subject, "d", &[3], 10, Duration::from_secs(5))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    store
        .publish(&subject, &HashMap::new(), Some(b"late"), None, 4)
        .await
        .unwrap();
    let woken = waiting.await.unwrap().unwrap();
    assert_eq!(seqs(&woken), vec![5]);
}

#[tokio::test]
async fn the_cumulative_ack_skips_ahead_but_never_beyond_the_last_sequence() {
    let (store, subject) = subject_with("cumulative", 3).await;
    assert_eq!(
        store.ack_message(&subject, "d", 2).await.unwrap(),
        AckOutcome::Acked { position: 2 }
    );
    assert_eq!(
        store.ack_message(&subject, "d", 1).await.unwrap(),
        AckOutcome::Acked { position: 2 },
        "never back"
    );
    assert_eq!(
        store.ack_message(&subject, "d", 4).await.unwrap(),
        AckOutcome::BeyondLast { last: 3 }
    );
    assert_eq!(
        seqs(&store.fetch(&subject, "d", 10).await.unwrap()),
        vec![3]
    );
}

#[tokio::test]
async fn consumers_start_where_their_policy_says_and_can_be_deleted() {
    let (store, subject) = subject_with("policy", 3).await;
    let put = |durable: &'static str, settings: ConsumerSettings| {
        let (store, subject) = (store.clone(), subject.clone());
        async move {
            store
                .create_or_update_consumer(&subject, durable, &settings)
                .await
                .unwrap()
        }
    };
    assert!(
        put(
            "new",
            ConsumerSettings {
                deliver_policy: Some(DeliverPolicy::New),
                ..ConsumerSettings::default()
            }
        )
        .await
    );
    assert!(
        put(
            "from-2",
            ConsumerSettings {
                deliver_policy: Some(DeliverPolicy::ByStartSequence),
                start_seq: Some(2),
                ..ConsumerSettings::default()
            }
        )
        .await
    );
    assert!(
        !put("from-2", ConsumerSettings::default()).await,
        "updated, not created"
    );
    assert!(
        store
            .fetch(&subject, "new", 10)
            .await
            .unwrap()
            .messages
            .is_empty()
    );
    assert_eq!(
        seqs(&store.fetch(&subject, "from-2", 10).await.unwrap()),
        vec![2, 3]
    );
    let (notified, last) = store.subscribe(&subject, "sub", 0).await.unwrap();
    assert_eq!((notified, last), (0, 3));
    assert_eq!(
        store
            .wait_beyond(&subject, 2, Duration::from_secs(1))
            .await
            .unwrap(),
        3
    );
    let lag = store
        .consumers_lag(Some((subject.as_str(), "")), 100)
        .await
        .unwrap();
    assert!(
        lag.iter()
            .any(|l| l.subject == subject && l.durable == "from-2" && l.ack_pending == 2)
    );
    assert!(store.delete_consumer(&subject, "from-2").await.unwrap());
    assert!(!store.delete_consumer(&subject, "from-2").await.unwrap());
    assert!(
        store
            .consumer_info(&subject, "from-2")
            .await
            .unwrap()
            .is_none()
    );
}

/// The consumer's lease rows (runs) as (first, last, held marks) through an
/// admin connection.
pub(super) async fn runs(subject: &str, durable: &str) -> Vec<(u64, u64, Option<String>)> {
    let admin = testing::admin_client().await;
    let (rows,): (Vec<(u64, u64, Option<String>)>,) = admin
        .eval(
            "local out = {}
             for _, p in box.space.mts_pending:pairs({...}, {iterator = 'EQ'}) do
                 out[#out + 1] = {p.seq, p.last_seq or p.seq, p.held or box.NULL}
             end
             return out",
            (subject, durable),
        )
        .await
        .unwrap();
    rows
}

fn deliveries(batch: &mts_storage::store::Batch) -> Vec<(u64, u32)> {
    batch
        .messages
        .iter()
        .map(|l| (l.message.seq, l.deliveries))
        .collect()
}

#[tokio::test]
async fn a_batch_is_leased_as_one_run_that_acks_nacks_and_lapses_cut_exactly() {
    let (store, subject) = consumer_with(
        "runs",
        10,
        ConsumerSettings {
            ack_wait_ms: Some(300),
            ..ConsumerSettings::default()
        },
    )
    .await;
    let batch = store.fetch(&subject, "d", 10).await.unwrap();
    assert_eq!(seqs(&batch), (1..=10).collect::<Vec<_>>());
    assert_eq!(runs(&subject, "d").await, vec![(1, 10, None)], "one row");

    store
        .ack_sequences(&subject, "d", &[6, 2, 5])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        runs(&subject, "d").await,
        vec![(1, 10, Some("1011001111".into()))]
    );
    let again = store.ack_sequences(&subject, "d", &[5, 7]).await.unwrap();
    assert_eq!(again.unwrap_err().0, vec![5], "acked already; 7 stays held");
    assert_eq!(runs(&subject, "d").await.len(), 1);

    // A nack cuts its sequences out into runs of their own.
    store
        .nack(&subject, "d", &[3, 8], 0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        runs(&subject, "d").await,
        vec![
            (1, 1, None),
            (3, 3, None),
            (4, 7, Some("1001".into())),
            (8, 8, None),
            (9, 10, None)
        ]
    );
    let redelivered = store.fetch(&subject, "d", 10).await.unwrap();
    assert_eq!(deliveries(&redelivered), vec![(3, 2), (8, 2)]);
    assert_eq!(
        store.ack_sequences(&subject, "d", &[1]).await.unwrap(),
        Ok(2),
        "the floor stops below 3, the lowest held"
    );
    let info = store.consumer_info(&subject, "d").await.unwrap().unwrap();
    assert_eq!((info.num_ack_pending, info.num_redelivered), (6, 2));

    // Every lease lapses: the first run's first, at most `limit` at a time,
    // the rest still due.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let some = store.fetch(&subject, "d", 3).await.unwrap();
    assert_eq!(deliveries(&some), vec![(4, 2), (7, 2), (9, 2)]);
    let rest = store.fetch(&subject, "d", 10).await.unwrap();
    assert_eq!(deliveries(&rest), vec![(10, 2), (3, 3), (8, 3)]);

    // The cumulative ack takes whole runs and cuts the one it ends in.
    assert_eq!(
        store.ack_message(&subject, "d", 8).await.unwrap(),
        AckOutcome::Acked { position: 8 }
    );
    // 9 and 10 went out again in different batches: runs of their own.
    assert_eq!(
        runs(&subject, "d").await,
        vec![(9, 9, None), (10, 10, None)]
    );
    let info = store.consumer_info(&subject, "d").await.unwrap().unwrap();
    assert_eq!(
        (info.ack_floor, info.num_ack_pending, info.num_redelivered),
        (8, 2, 2)
    );
    store
        .ack_sequences(&subject, "d", &[10, 9])
        .await
        .unwrap()
        .unwrap();
    assert!(runs(&subject, "d").await.is_empty());
    let info = store.consumer_info(&subject, "d").await.unwrap().unwrap();
    assert_eq!((info.ack_floor, info.num_ack_pending), (10, 0));
}

/// Lease rows written before runs (one per message, without the run's
/// fields) keep working after the upgrade.
#[tokio::test]
async fn leases_of_one_message_each_from_before_runs_are_acked_and_redelivered() {
    let (store, subject) = subject_with("old-leases", 3).await;
    let batch = store.fetch(&subject, "d", 3).await.unwrap();
    assert_eq!(seqs(&batch), vec![1, 2, 3]);
    let admin = testing::admin_client().await;
    let _: Vec<tarant::Value> = admin
        .eval(
            "local subject, durable = ...
             local p = box.space.mts_pending:get({subject, durable, 1})
             box.space.mts_pending:delete({subject, durable, 1})
             for seq = 1, 3 do
                 box.space.mts_pending:insert({subject, durable, seq, 1, p.deadline_ns, p.first_delivered_ns})
             end",
            (&subject, "d"),
        )
        .await
        .unwrap();
    store
        .ack_sequences(&subject, "d", &[1])
        .await
        .unwrap()
        .unwrap();
    store.nack(&subject, "d", &[3], 0).await.unwrap().unwrap();
    assert_eq!(
        deliveries(&store.fetch(&subject, "d", 10).await.unwrap()),
        vec![(3, 2)]
    );
    let info = store.consumer_info(&subject, "d").await.unwrap().unwrap();
    assert_eq!((info.ack_floor, info.num_ack_pending), (1, 2));
    assert_eq!(
        store.ack_message(&subject, "d", 3).await.unwrap(),
        AckOutcome::Acked { position: 3 }
    );
    assert!(runs(&subject, "d").await.is_empty());
}

/// A consumer holding `max_ack_pending` messages gets nothing new until it
/// acks, and a commit does not change that: its consume call comes back at
/// once instead of waiting out its wait for commits that cannot help.
#[tokio::test]
async fn a_consumer_at_max_ack_pending_is_answered_at_once() {
    let (store, subject) = consumer_with(
        "ack-pending",
        4,
        ConsumerSettings {
            max_ack_pending: Some(2),
            ..ConsumerSettings::default()
        },
    )
    .await;
    let batch = store
        .consume(&subject, "d", &[], 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(seqs(&batch), vec![1, 2]);
    let started = std::time::Instant::now();
    let full = store
        .consume(&subject, "d", &[], 10, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(full.messages.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "waited {:?} for commits that could not make room",
        started.elapsed()
    );
    let next = store
        .consume(&subject, "d", &[1], 10, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(seqs(&next), vec![3], "an ack makes room for one");
}
