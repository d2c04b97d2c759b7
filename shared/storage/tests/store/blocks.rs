//! Block rows: a group commit stores a subject's run of plain inline
//! messages in rows of up to 8 (a power of two of them, up to 8 KiB of
//! payload), and every reader, retention, eviction, tiering and
//! dead-lettering sees their messages one by one, as if each had a row.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use mts_storage::segment::{Sealed, Writer};
use mts_storage::store::{
    ConsumerSettings, DeliverPolicy, Discard, InlineMessage, Limits, Published, PurgeStep, Refusal,
    Store, StoredMessage, TierCommit,
};
use mts_testkit::{self as testing, TarantoolProcess};

/// Message `i` of `subject`: its payload differs in length from message to
/// message, so that byte counts tell them apart.
fn message(subject: &str, i: u64) -> InlineMessage {
    InlineMessage {
        subject: subject.into(),
        headers: HashMap::from([("n".to_owned(), i.to_string())]),
        data: Bytes::from(format!(
            "payload {i} of {subject}{}",
            "+".repeat(i as usize % 7)
        )),
        sha256: format!("{i:064}"),
        message_id: None,
        dedup_window: Duration::from_secs(60),
    }
}

/// Queues `messages` at once (a current-thread test runtime runs the
/// group commit only when this awaits, so they go in one call) and returns
/// what each was answered.
async fn commit_together(store: &Store, messages: Vec<InlineMessage>) -> Vec<Published> {
    let queued: Vec<_> = messages
        .into_iter()
        .map(|m| store.publish_inline(m))
        .collect();
    futures::future::try_join_all(queued).await.unwrap()
}

/// Messages `from..=to` of `subject`, published in one call.
async fn block(store: &Store, subject: &str, from: u64, to: u64) {
    let published =
        commit_together(store, (from..=to).map(|i| message(subject, i)).collect()).await;
    let seqs: Vec<u64> = published.iter().map(|p| p.seq).collect();
    assert_eq!(seqs, (from..=to).collect::<Vec<_>>());
}

/// Asserts that `stored` is message `i` of `subject` in full.
fn assert_is(stored: &StoredMessage, subject: &str, i: u64) {
    let expected = message(subject, i);
    assert_eq!((stored.subject.as_str(), stored.seq), (subject, i));
    assert_eq!(
        stored.data.as_ref(),
        Some(&expected.data),
        "payload of #{i}"
    );
    assert_eq!(stored.size, expected.data.len() as u64);
    assert_eq!(stored.headers, expected.headers);
    assert_eq!(stored.sha256.as_deref(), Some(expected.sha256.as_str()));
    assert!(stored.object_key.is_none() && stored.segment.is_none());
}

/// Payload bytes of messages `from..=to` of `subject`.
fn bytes_of(subject: &str, from: u64, to: u64) -> u64 {
    (from..=to)
        .map(|i| message(subject, i).data.len() as u64)
        .sum()
}

/// A Tarantool of the test's own, its admin client and a store.
async fn own_tarantool() -> (TarantoolProcess, tarant::Client, Store) {
    let tarantool = TarantoolProcess::start();
    let admin = tarantool.admin_client().await;
    let store = Store::connect(&tarantool.config()).await.unwrap();
    (tarantool, admin, store)
}

/// The hot rows of `subject`, as {first seq, last seq}.
async fn rows(admin: &tarant::Client, subject: &str) -> Vec<(u64, u64)> {
    let lua = format!(
        "local out = {{}} for _, m in box.space.mts_messages:pairs({{'{subject}'}}) do \
         out[#out + 1] = {{m.seq, m.last_seq or m.seq}} end return out"
    );
    let (rows,): (Vec<(u64, u64)>,) = admin.eval(&lua, ()).await.unwrap();
    rows
}

#[tokio::test]
async fn a_group_commit_stores_each_subjects_run_as_one_row_read_back_message_by_message() {
    let (_tarantool, admin, store) = own_tarantool().await;
    let (many, one, ids, large) = (
        testing::unique_subject("block-many"),
        testing::unique_subject("block-one"),
        testing::unique_subject("block-ids"),
        testing::unique_subject("block-large"),
    );
    let mut messages: Vec<InlineMessage> = Vec::new();
    for i in 1..=30 {
        messages.push(message(&many, i));
        if i <= 5 {
            messages.push(InlineMessage {
                data: Bytes::from(vec![i as u8; 2000]),
                ..message(&large, i)
            });
        }
        if i <= 3 {
            let mut with_id = message(&ids, i);
            if i == 2 {
                with_id.message_id = Some("two".into());
            }
            messages.push(with_id);
        }
    }
    messages.push(message(&one, 1));
    let published = commit_together(&store, messages).await;
    assert!(published.iter().all(|p| !p.duplicate));

    // A run of 30 in rows of 8, 4 and 2; of 2,000-byte messages, 4 and 1;
    // a message alone, or a run with a message id in it, a row per message.
    assert_eq!(
        rows(&admin, &many).await,
        vec![(1, 8), (9, 16), (17, 24), (25, 28), (29, 30)]
    );
    assert_eq!(rows(&admin, &large).await, vec![(1, 4), (5, 5)]);
    let fifth = store.message(&large, 5).await.unwrap().unwrap();
    assert_eq!(fifth.data.as_deref(), Some(&[5u8; 2000][..]));
    assert_eq!(rows(&admin, &one).await, vec![(1, 1)]);
    assert_eq!(rows(&admin, &ids).await, vec![(1, 1), (2, 2), (3, 3)]);
    let info = store.subject_info(&many).await.unwrap();
    assert_eq!(
        (info.first_seq, info.last_seq, info.count, info.bytes),
        (1, 30, 30, bytes_of(&many, 1, 30))
    );

    // Each message by its sequence, and all of them in order to a consumer.
    for i in [1, 2, 17, 29, 30] {
        assert_is(&store.message(&many, i).await.unwrap().unwrap(), &many, i);
    }
    assert!(store.message(&many, 31).await.unwrap().is_none());
    let first = store.fetch(&many, "d", 12).await.unwrap().messages;
    let rest = store.fetch(&many, "d", 100).await.unwrap().messages;
    assert_eq!((first.len(), rest.len()), (12, 18));
    for (i, leased) in (1..).zip(first.iter().chain(&rest)) {
        assert_is(&leased.message, &many, i);
    }
    // The message id was remembered as for any publish.
    let again = store
        .publish_inline(InlineMessage {
            message_id: Some("two".into()),
            ..message(&ids, 9)
        })
        .await
        .unwrap();
    assert_eq!((again.seq, again.duplicate), (2, true));
}

#[tokio::test]
async fn a_consumer_by_start_time_starts_at_the_first_row_committed_at_or_after_it() {
    let store = Store::connect(&testing::config()).await.unwrap();
    let subject = testing::unique_subject("block-time");
    block(&store, &subject, 1, 10).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let between = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    tokio::time::sleep(Duration::from_millis(20)).await;
    block(&store, &subject, 11, 20).await;
    for (durable, from, first) in [("all", 0, 1), ("later", between, 11)] {
        let settings = ConsumerSettings {
            deliver_policy: Some(DeliverPolicy::ByStartTime),
            start_time_ns: Some(from),
            ..ConsumerSettings::default()
        };
        store
            .create_or_update_consumer(&subject, durable, &settings)
            .await
            .unwrap();
        let delivered = store.fetch(&subject, durable, 100).await.unwrap().messages;
        assert_eq!(delivered.len() as u64, 21 - first, "{durable}");
        for (i, leased) in (first..).zip(&delivered) {
            assert_is(&leased.message, &subject, i);
        }
    }
}

#[tokio::test]
async fn retention_cuts_a_row_down_to_the_newest_messages_its_limits_keep() {
    let (_tarantool, admin, store) = own_tarantool().await;
    let subject = testing::unique_subject("block-retention");
    block(&store, &subject, 1, 20).await;
    let limit = |limits: Limits| {
        let (store, subject) = (&store, &subject);
        async move {
            store.set_subject_limits(subject, limits).await.unwrap();
            store
                .retention_step(subject, Limits::default(), 500, 50)
                .await
                .unwrap();
            store.subject_info(subject).await.unwrap()
        }
    };
    let info = limit(Limits {
        max_messages: Some(15),
        ..Limits::default()
    })
    .await;
    assert_eq!(
        (info.first_seq, info.count, info.bytes),
        (6, 15, bytes_of(&subject, 6, 20))
    );
    assert_eq!(
        rows(&admin, &subject).await,
        vec![(6, 8), (9, 16), (17, 20)]
    );
    assert!(store.message(&subject, 5).await.unwrap().is_none());
    assert_is(
        &store.message(&subject, 6).await.unwrap().unwrap(),
        &subject,
        6,
    );

    // Bytes: down to the newest messages that fit, however long each is.
    let fit = bytes_of(&subject, 14, 20);
    let info = limit(Limits {
        max_messages: Some(0),
        max_bytes: Some(fit + 1),
        ..Limits::default()
    })
    .await;
    assert_eq!((info.first_seq, info.count, info.bytes), (14, 7, fit));
    assert_eq!(rows(&admin, &subject).await, vec![(14, 16), (17, 20)]);
    let delivered = store.fetch(&subject, "d", 100).await.unwrap().messages;
    for (i, leased) in (14..).zip(&delivered) {
        assert_is(&leased.message, &subject, i);
    }
    assert_eq!(delivered.len(), 7);

    // Age: the whole row, whose messages were committed together.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let info = limit(Limits {
        max_age_ms: Some(1),
        max_bytes: Some(0),
        ..Limits::default()
    })
    .await;
    assert_eq!((info.count, info.bytes), (0, 0));
    assert!(rows(&admin, &subject).await.is_empty());
}

#[tokio::test]
async fn a_full_hot_tier_evicts_whole_rows_until_a_new_run_fits_or_refuses_it_whole() {
    let roomy = Store::connect(&testing::config()).await.unwrap();
    let evicting = testing::unique_subject("block-evict");
    block(&roomy, &evicting, 1, 5).await;
    block(&roomy, &evicting, 6, 10).await;
    let mut config = testing::config();
    config.tiering.hot_tier_max_messages = 1;
    let store = Store::connect(&config).await.unwrap();
    store
        .set_subject_limits(
            &evicting,
            Limits {
                discard: Some(Discard::Old),
                ..Limits::default()
            },
        )
        .await
        .unwrap();
    // Rows 1-4, 5, 6-9, 10. Three (rows 11-12 and 13) need the row of
    // four to go; eight (one row), the next four rows.
    block(&store, &evicting, 11, 13).await;
    let info = store.subject_info(&evicting).await.unwrap();
    assert_eq!((info.first_seq, info.last_seq, info.count), (5, 13, 9));
    block(&store, &evicting, 14, 21).await;
    let info = store.subject_info(&evicting).await.unwrap();
    assert_eq!(
        (info.first_seq, info.last_seq, info.count, info.bytes),
        (13, 21, 9, bytes_of(&evicting, 13, 21))
    );
    assert_is(
        &store.message(&evicting, 17).await.unwrap().unwrap(),
        &evicting,
        17,
    );

    // Policy new: the run is refused whole, and nothing of it is stored.
    let refusing = testing::unique_subject("block-refuse");
    let queued: Vec<_> = (1..=4)
        .map(|i| store.publish_inline(message(&refusing, i)))
        .collect();
    for outcome in futures::future::join_all(queued).await {
        let err = outcome.unwrap_err();
        assert_eq!(err.refusal(), Some(Refusal::HotFull), "{err}");
    }
    assert_eq!(store.subject_info(&refusing).await.unwrap().count, 0);
}

/// The segment of `runs` (rows as tier_read gives them, or messages).
fn seal(messages: &[StoredMessage]) -> Sealed {
    let mut writer = Writer::new(64);
    for m in messages {
        writer.push(m);
    }
    writer.finish()
}

#[tokio::test]
async fn tiering_ends_a_segment_where_a_row_ends_and_trims_a_row_an_older_service_cut() {
    let (tarantool, admin, store) = own_tarantool().await;
    let subject = testing::unique_subject("block-tier");
    for first in [1, 11, 21] {
        block(&store, &subject, first, first + 9).await;
    }
    // Rows 1-8, 9-10, 11-18, 19-20, 21-28, 29-30. Asked for 15, it reads
    // whole rows.
    let runs = store.tier_read(&subject, 0, 15, u64::MAX).await.unwrap();
    let lengths: Vec<usize> = runs.iter().map(Vec::len).collect();
    assert_eq!(lengths, [8, 2, 8]);
    let messages: Vec<StoredMessage> = runs.into_iter().flatten().collect();
    for (i, m) in (1..).zip(&messages) {
        assert_is(m, &subject, i);
    }
    let sealed = seal(&messages);
    let key = format!("{subject}/segments/1");
    assert_eq!(
        store.tier_commit(&subject, &key, &sealed).await.unwrap(),
        TierCommit::Committed
    );
    assert_eq!(
        rows(&admin, &subject).await,
        vec![(19, 20), (21, 28), (29, 30)]
    );

    // A service from before block rows reads messages one by one and may
    // cut a segment inside a row: the swap keeps the rest of that row.
    let raw = crate::raw_client(&tarantool.config()).await;
    let (older,): (Vec<StoredMessage>,) = raw
        .call("mts_tier_read", (&subject, 18u64, 5u32, u64::MAX))
        .await
        .unwrap();
    let seqs: Vec<u64> = older.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (19..=23).collect::<Vec<_>>());
    let sealed = seal(&older);
    let key = format!("{subject}/segments/19");
    assert_eq!(
        store.tier_commit(&subject, &key, &sealed).await.unwrap(),
        TierCommit::Committed
    );
    assert_eq!(rows(&admin, &subject).await, vec![(24, 28), (29, 30)]);
    let info = store.subject_info(&subject).await.unwrap();
    assert_eq!(
        (info.count, info.cold_count, info.bytes, info.cold_bytes),
        (30, 23, bytes_of(&subject, 1, 30), bytes_of(&subject, 1, 23))
    );
    let delivered = store.fetch(&subject, "d", 100).await.unwrap().messages;
    let seqs: Vec<u64> = delivered.iter().map(|l| l.message.seq).collect();
    assert_eq!(seqs, (1..=30).collect::<Vec<_>>());
    for (i, leased) in (24..).zip(&delivered[23..]) {
        assert_is(&leased.message, &subject, i);
    }
    let runs = store.tier_read(&subject, 23, 100, u64::MAX).await.unwrap();
    assert_eq!(runs.concat().len(), 7);
}

#[tokio::test]
async fn a_message_of_a_row_dead_letters_with_its_headers_and_payload() {
    let store = Store::connect(&testing::config()).await.unwrap();
    let subject = testing::unique_subject("block-dlq");
    store
        .create_or_update_consumer(
            &subject,
            "d",
            &ConsumerSettings {
                ack_wait_ms: Some(50),
                max_deliver: Some(1),
                ..ConsumerSettings::default()
            },
        )
        .await
        .unwrap();
    block(&store, &subject, 1, 5).await;
    assert_eq!(
        store.fetch(&subject, "d", 2).await.unwrap().messages.len(),
        2
    );
    tokio::time::sleep(Duration::from_millis(80)).await;
    let next = store.fetch(&subject, "d", 10).await.unwrap().messages;
    let seqs: Vec<u64> = next.iter().map(|l| l.message.seq).collect();
    assert_eq!(
        seqs,
        vec![3, 4, 5],
        "#1 and #2 went to the dead-letter subject"
    );
    let dlq = format!("{subject}.dlq");
    for (seq, i) in [(1, 1), (2, 2)] {
        let letter = store.message(&dlq, seq).await.unwrap().unwrap();
        let original = message(&subject, i);
        assert_eq!(letter.data.as_ref(), Some(&original.data));
        assert_eq!(letter.sha256.as_deref(), Some(original.sha256.as_str()));
        assert_eq!(letter.headers["n"], i.to_string());
        assert_eq!(letter.headers["mts-origin-sequence"], i.to_string());
    }
}

#[tokio::test]
async fn a_purge_cuts_a_row_it_ends_inside_to_the_messages_after_it() {
    let (_tarantool, admin, store) = own_tarantool().await;
    let subject = testing::unique_subject("block-purge");
    block(&store, &subject, 1, 12).await;
    assert_eq!(rows(&admin, &subject).await, vec![(1, 8), (9, 12)]);
    let (step, through) = store.purge_step(&subject, 5, 500, None).await.unwrap();
    assert!(matches!(step, PurgeStep::Done(5)), "{step:?}");
    assert_eq!(through, 5);
    let info = store.subject_info(&subject).await.unwrap();
    assert_eq!(
        (info.first_seq, info.count, info.bytes),
        (6, 7, bytes_of(&subject, 6, 12))
    );
    assert_eq!(rows(&admin, &subject).await, vec![(6, 8), (9, 12)]);
    let delivered = store.fetch(&subject, "d", 100).await.unwrap().messages;
    assert_eq!(delivered.len(), 7);
    for (i, leased) in (6..).zip(&delivered) {
        assert_is(&leased.message, &subject, i);
    }
}
