//! The tiers at the level of the stored procedures: swapping hot rows for a
//! segment row (once, whatever races it), reading across both tiers,
//! retention of whole segments, and the hot tier's budget with each discard
//! policy. The segment objects themselves are not uploaded here: Tarantool
//! only ever sees their rows (the egress tests read real ones).

use std::collections::HashMap;
use std::time::Duration;

use mts_storage::segment::{self, Sealed, Writer};
use mts_storage::store::{
    Discard, Limits, PurgeStep, Refusal, SegmentCut, Store, TierCommit, TieringOptions,
};
use mts_testkit as testing;

/// Publishes `n` inline messages with a header each; returns their payloads.
async fn publish_n(store: &Store, subject: &str, n: u64) -> Vec<Vec<u8>> {
    let mut payloads = Vec::new();
    for i in 1..=n {
        let data = format!("payload {i} of {subject}").into_bytes();
        let headers = HashMap::from([("n".to_owned(), i.to_string())]);
        store
            .publish(subject, &headers, Some(&data), None, data.len() as u64)
            .await
            .unwrap();
        payloads.push(data);
    }
    payloads
}

/// Limits `subject` to its newest `n` messages and runs a retention step.
async fn keep_newest(store: &Store, subject: &str, n: u64) {
    let keep = Limits {
        max_messages: Some(n),
        ..Limits::default()
    };
    store.set_subject_limits(subject, keep).await.unwrap();
    store
        .retention_step(subject, Limits::default(), 500, 50)
        .await
        .unwrap();
}

/// A Tarantool of the test's own (whose admin can reach behind the
/// procedures, and whose totals no other test changes), its admin client,
/// a store and a subject with 10 messages.
async fn own_tarantool_with_10(
    prefix: &str,
) -> (testing::TarantoolProcess, tarant::Client, Store, String) {
    let tarantool = testing::TarantoolProcess::start();
    let admin = tarantool.admin_client().await;
    let store = Store::connect(&tarantool.config()).await.unwrap();
    let subject = testing::unique_subject(prefix);
    publish_n(&store, &subject, 10).await;
    (tarantool, admin, store, subject)
}

/// The segment of the subject's oldest `n` hot messages, as the tiering
/// worker packs it.
async fn seal(store: &Store, subject: &str, n: u32) -> Sealed {
    seal_after(store, subject, 0, n).await
}

/// The segment of the subject's `n` hot messages after `after`.
async fn seal_after(store: &Store, subject: &str, after: u64, n: u32) -> Sealed {
    let rows: Vec<_> = (store.tier_read(subject, after, n, u64::MAX).await.unwrap())
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(rows.len(), n as usize);
    let mut writer = Writer::new(64);
    for row in &rows {
        writer.push(row);
    }
    writer.finish()
}

#[tokio::test]
async fn a_run_of_hot_messages_moves_into_a_segment_once_and_reads_through_it() {
    let store = Store::connect(&testing::config()).await.unwrap();
    let subject = testing::unique_subject("tier");
    let payloads = publish_n(&store, &subject, 10).await;
    let sealed = seal(&store, &subject, 6).await;
    let key = format!("{subject}/segments/1");
    assert_eq!(
        store.tier_commit(&subject, &key, &sealed).await.unwrap(),
        TierCommit::Committed
    );
    // Another replica with the same run finds its rows gone: nothing changes.
    assert_eq!(
        store.tier_commit(&subject, "other", &sealed).await.unwrap(),
        TierCommit::Gone
    );
    let info = store.subject_info(&subject).await.unwrap();
    assert_eq!(
        (info.first_seq, info.last_seq, info.count, info.cold_count),
        (1, 10, 10, 6)
    );
    assert_eq!(
        info.bytes,
        payloads.iter().map(|p| p.len() as u64).sum::<u64>()
    );

    // A message in the segment is answered as a reference to its block.
    let cold = store.message(&subject, 3).await.unwrap().unwrap();
    let at = cold.segment.clone().expect("a reference into the segment");
    assert_eq!(at.object_key, key);
    let range = at.offset as usize..(at.offset + at.length) as usize;
    let blocks = segment::decode_blocks(sealed.body.slice(range), at.offset).unwrap();
    let record = blocks[0]
        .get(3)
        .unwrap()
        .clone()
        .into_message(subject.clone());
    assert_eq!(record.data.unwrap(), payloads[2]);
    assert_eq!(record.headers["n"], "3");
    let hot = store.message(&subject, 8).await.unwrap().unwrap();
    assert!(hot.segment.is_none());
    assert_eq!(hot.data.unwrap(), payloads[7]);

    // A consumer reads across both tiers, in order, each message once.
    let batch = store.fetch(&subject, "reader", 100).await.unwrap();
    let seqs: Vec<u64> = batch.messages.iter().map(|l| l.message.seq).collect();
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    let cold_seqs = batch
        .messages
        .iter()
        .filter(|l| l.message.segment.is_some())
        .count();
    assert_eq!(cold_seqs, 6);
    // Redelivery of a message in a segment still finds it.
    let seqs: Vec<u64> = (1..=10).collect();
    store
        .nack(&subject, "reader", &seqs, 0)
        .await
        .unwrap()
        .unwrap();
    let again = store.fetch(&subject, "reader", 100).await.unwrap();
    assert_eq!(again.messages.len(), 10);
    assert!(again.messages.iter().all(|l| l.deliveries == 2));
    // Lag counts messages in segments too.
    let state = store
        .consumer_info(&subject, "late")
        .await
        .unwrap()
        .map(|s| s.num_pending);
    assert_eq!(state, None);
    store
        .create_or_update_consumer(&subject, "late", &Default::default())
        .await
        .unwrap();
    let late = store
        .consumer_info(&subject, "late")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(late.num_pending, 10);
    assert!(late.oldest_unacked_age_ns > 0);
}

#[tokio::test]
async fn two_replicas_swapping_the_same_run_at_once_commit_one_segment() {
    let store = Store::connect(&testing::config()).await.unwrap();
    let subject = testing::unique_subject("race");
    publish_n(&store, &subject, 20).await;
    let sealed = seal(&store, &subject, 20).await;
    let (key_a, key_b) = (format!("{subject}/a"), format!("{subject}/b"));
    let (a, b) = tokio::join!(
        store.tier_commit(&subject, &key_a, &sealed),
        store.tier_commit(&subject, &key_b, &sealed),
    );
    let mut outcomes = [a.unwrap(), b.unwrap()];
    outcomes.sort_by_key(|o| *o == TierCommit::Committed);
    assert_eq!(outcomes, [TierCommit::Gone, TierCommit::Committed]);
    let info = store.subject_info(&subject).await.unwrap();
    assert_eq!((info.count, info.cold_count), (20, 20));
}

#[tokio::test]
async fn the_orphan_sweep_and_a_late_swap_agree_on_who_owns_a_segment_object() {
    let store = Store::connect(&testing::config()).await.unwrap();
    let subject = testing::unique_subject("owner");
    let payload = format!("{subject}/payload");
    store
        .publish(&subject, &HashMap::new(), None, Some(&payload), 5)
        .await
        .unwrap();
    publish_n(&store, &subject, 3).await;
    let sealed = seal(&store, &subject, 4).await;
    assert_eq!(
        sealed.first_seq, 1,
        "the offloaded message is in the segment"
    );

    // Uploaded, then the swap came too late: the sweep had fenced it.
    let stalled = format!("{subject}/segments/stalled");
    let orphans = store
        .settle_objects(std::slice::from_ref(&stalled))
        .await
        .unwrap();
    assert_eq!(orphans, vec![stalled.clone()]);
    assert_eq!(
        store
            .tier_commit(&subject, &stalled, &sealed)
            .await
            .unwrap(),
        TierCommit::Abandoned
    );

    let key = format!("{subject}/segments/1");
    assert_eq!(
        store.tier_commit(&subject, &key, &sealed).await.unwrap(),
        TierCommit::Committed
    );
    // The segment and the payload it names belong to stored messages.
    let orphans = store
        .settle_objects(&[key.clone(), payload.clone()])
        .await
        .unwrap();
    assert!(orphans.is_empty(), "{orphans:?}");
    // A lost publish answer for the offloaded payload still finds its sequence.
    let cause = mts_storage::store::Error::closed();
    assert_eq!(store.settle_object(&payload, cause).await.unwrap(), Some(1));
    for source in ["segments", "messages"] {
        let keys = store.backup_keys(source, &subject, 100).await.unwrap();
        assert!(
            keys.iter().any(|(k, _)| *k == key || *k == payload),
            "{source}: {keys:?}"
        );
    }
}

#[tokio::test]
async fn retention_drops_a_segment_only_once_all_its_messages_are_past_the_limit() {
    let store = Store::connect(&testing::config()).await.unwrap();
    let subject = testing::unique_subject("segment-retention");
    publish_n(&store, &subject, 10).await;
    let sealed = seal(&store, &subject, 6).await;
    let key = format!("{subject}/segments/1");
    store.tier_commit(&subject, &key, &sealed).await.unwrap();

    let limit = |max_messages| Limits {
        max_messages: Some(max_messages),
        ..Limits::default()
    };
    let step = || store.retention_step(&subject, Limits::default(), 500, 50);
    // Keeping 5 of 10: message 6, the segment's newest, is among the
    // newest 5, so the segment stays whole (and the hot rows, all newer,
    // stay with it).
    store.set_subject_limits(&subject, limit(5)).await.unwrap();
    step().await.unwrap();
    let info = store.subject_info(&subject).await.unwrap();
    assert_eq!((info.first_seq, info.count, info.cold_count), (1, 10, 6));
    // Keeping 4: every message of the segment is past it; the segment goes
    // whole, with its object queued for deletion.
    store.set_subject_limits(&subject, limit(4)).await.unwrap();
    step().await.unwrap();
    let info = store.subject_info(&subject).await.unwrap();
    assert_eq!(
        (info.first_seq, info.count, info.cold_count, info.cold_bytes),
        (7, 4, 0, 0)
    );
    let released = store.backup_keys("gc", &subject, 100).await.unwrap();
    assert!(released.iter().any(|(k, _)| *k == key), "{released:?}");
    assert!(store.message(&subject, 6).await.unwrap().is_none());
    assert!(store.message(&subject, 7).await.unwrap().is_some());
}

#[tokio::test]
async fn a_full_hot_tier_refuses_or_evicts_as_each_subject_says() {
    // One row is already over budget: every publish of this store finds the
    // hot tier full. The shared Tarantool may hold none yet.
    let roomy = Store::connect(&testing::config()).await.unwrap();
    roomy
        .publish(
            &testing::unique_subject("full-seed"),
            &HashMap::new(),
            Some(b"x"),
            None,
            1,
        )
        .await
        .unwrap();
    let mut config = testing::config();
    config.tiering.hot_tier_max_messages = 1;
    let store = Store::connect(&config).await.unwrap();
    let refusing = testing::unique_subject("full-new");
    let err = store
        .publish(&refusing, &HashMap::new(), Some(b"x"), None, 1)
        .await
        .unwrap_err();
    assert_eq!(err.refusal(), Some(Refusal::HotFull), "{err}");
    assert!(err.to_string().contains("hot tier is full"), "{err}");
    assert_eq!(store.subject_info(&refusing).await.unwrap().count, 0);
    // The group-commit path answers the same.
    let err = store
        .publish_inline(crate::inline(&refusing, b"y"))
        .await
        .unwrap_err();
    assert_eq!(err.refusal(), Some(Refusal::HotFull), "{err}");

    let evict_oldest = Limits {
        discard: Some(Discard::Old),
        ..Limits::default()
    };
    // Policy old: each new message evicts the subject's oldest hot one, so
    // the subject keeps publishing at a constant hot size.
    let evicting = testing::unique_subject("full-old");
    let roomy = Store::connect(&testing::config()).await.unwrap();
    publish_n(&roomy, &evicting, 3).await;
    store
        .set_subject_limits(&evicting, evict_oldest)
        .await
        .unwrap();
    for _ in 0..2 {
        store
            .publish(&evicting, &HashMap::new(), Some(b"new"), None, 3)
            .await
            .unwrap();
    }
    store
        .publish_inline(crate::inline(&evicting, b"newer"))
        .await
        .unwrap();
    let info = store.subject_info(&evicting).await.unwrap();
    assert_eq!((info.first_seq, info.last_seq, info.count), (4, 6, 3));
    assert_eq!(info.limits.discard, Some(Discard::Old));

    // A subject with policy old but nothing hot to evict is refused.
    let empty = testing::unique_subject("full-old-empty");
    store
        .set_subject_limits(&empty, evict_oldest)
        .await
        .unwrap();
    let err = store
        .publish(&empty, &HashMap::new(), Some(b"x"), None, 1)
        .await
        .unwrap_err();
    assert_eq!(err.refusal(), Some(Refusal::HotFull), "{err}");
}

#[tokio::test]
async fn upgrading_from_schema_10_keeps_every_offloaded_payload_named() {
    // Schema 10 indexed object keys and commit times in mts_messages itself.
    let tarantool = testing::TarantoolProcess::start();
    let admin = tarantool.admin_client().await;
    let _: Vec<tarant::Value> = admin
        .eval(
            "local m = box.space.mts_messages \
             m:create_index('object_key', {parts = {{field = 'object_key', type = 'string', \
               is_nullable = true}}, unique = false}) \
             m:create_index('ts', {parts = {'subject', 'ts_ns'}, unique = false}) \
             box.space.mts_subjects:replace({'old', 2, 2, 15}) \
             local h = setmetatable({}, {__serialize = 'map'}) \
             m:insert({'old', 1, 1, h, box.NULL, 'p/old-object', 10, box.NULL}) \
             m:insert({'old', 2, 2, h, 'inline', box.NULL, 5, box.NULL})",
            (),
        )
        .await
        .unwrap();
    let _: (u64,) = admin
        .eval(mts_storage::store::SCHEMA_LUA, ())
        .await
        .unwrap();
    let (dropped,): (bool,) = admin
        .eval(
            "local i = box.space.mts_messages.index return i.object_key == nil and i.ts == nil",
            (),
        )
        .await
        .unwrap();
    assert!(dropped, "the old indexes are gone");
    let store = Store::connect(&tarantool.config()).await.unwrap();
    let key = "p/old-object".to_owned();
    assert!(
        store
            .settle_objects(std::slice::from_ref(&key))
            .await
            .unwrap()
            .is_empty(),
        "the sweep must not take a stored message's payload"
    );
    let named = store.backup_keys("messages", "", 10).await.unwrap();
    assert_eq!(named, vec![(key, 10)]);
    // Messages from before read as before.
    let old = store.message("old", 1).await.unwrap().unwrap();
    assert_eq!(old.object_key.as_deref(), Some("p/old-object"));
}

#[tokio::test]
async fn a_swap_cut_off_while_trimming_leaves_copies_that_are_never_read_twice_or_tiered_again() {
    // A crash after the swap's transaction, before its slices trimmed the
    // hot rows, leaves hot copies of the segment's messages: put back here
    // as they were.
    let (_tarantool, admin, store, subject) = own_tarantool_with_10("leftover").await;
    let save = format!(
        "rawset(_G, 'saved', box.space.mts_messages:select({{'{subject}'}}, {{limit = 6}}))"
    );
    let _: Vec<tarant::Value> = admin.eval(&save, ()).await.unwrap();
    let restore = "for _, t in ipairs(saved) do box.space.mts_messages:replace(t) end";
    let hot_rows = format!("return box.space.mts_messages:count({{'{subject}'}})");
    let hot_rows = || async {
        let (n,): (u64,) = admin.eval(&hot_rows, ()).await.unwrap();
        n
    };
    let sealed = seal(&store, &subject, 6).await;
    let key = format!("{subject}/segments/1");
    assert_eq!(
        store.tier_commit(&subject, &key, &sealed).await.unwrap(),
        TierCommit::Committed
    );
    assert_eq!(hot_rows().await, 4, "the swap trimmed its rows");
    let _: Vec<tarant::Value> = admin.eval(restore, ()).await.unwrap();
    assert_eq!(hot_rows().await, 10);

    // Counted and read once.
    let info = store.subject_info(&subject).await.unwrap();
    assert_eq!((info.first_seq, info.count, info.cold_count), (1, 10, 6));
    let delivered = store.fetch(&subject, "d", 20).await.unwrap().messages;
    let seqs: Vec<u64> = delivered.iter().map(|l| l.message.seq).collect();
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    let cold: Vec<bool> = delivered
        .iter()
        .map(|l| l.message.segment.is_some())
        .collect();
    assert_eq!(cold, [[true; 6], [false; 6]].concat()[..10]);
    // The same swap again (another replica's, say) finds the run tiered.
    assert_eq!(
        store.tier_commit(&subject, "again", &sealed).await.unwrap(),
        TierCommit::Gone
    );
    // The next run swaps though the copies are still there.
    let next = seal_after(&store, &subject, 6, 2).await;
    assert_eq!((next.first_seq, next.last_seq), (7, 8));
    assert_eq!(
        store
            .tier_commit(&subject, &format!("{subject}/segments/7"), &next)
            .await
            .unwrap(),
        TierCommit::Committed
    );

    // A plan offers only what no segment holds, and trims the copies.
    let _: Vec<tarant::Value> = admin.eval(restore, ()).await.unwrap();
    let due_now = TieringOptions {
        segment_bytes: 1,
        segment_messages: 1,
        seal_age: Duration::ZERO,
    };
    let plans = store.tier_plan(due_now, 1000).await.unwrap();
    let plan = plans.iter().find(|p| p.subject == subject).unwrap();
    assert_eq!((plan.first_seq, plan.hot_messages), (9, 2));
    assert_eq!(hot_rows().await, 2);

    // Retention takes a segment's copies with it.
    let _: Vec<tarant::Value> = admin.eval(restore, ()).await.unwrap();
    keep_newest(&store, &subject, 4).await;
    let info = store.subject_info(&subject).await.unwrap();
    assert_eq!((info.first_seq, info.count, info.cold_count), (7, 4, 2));
    assert!(store.message(&subject, 3).await.unwrap().is_none());
    assert_eq!(hot_rows().await, 2);
}

#[tokio::test]
async fn the_gauges_count_segments_and_their_bytes_as_they_come_and_go() {
    let (_tarantool, admin, store, subject) = own_tarantool_with_10("gauges").await;
    let first = seal(&store, &subject, 4).await;
    store
        .tier_commit(&subject, &format!("{subject}/1"), &first)
        .await
        .unwrap();
    let second = seal_after(&store, &subject, 4, 6).await;
    store
        .tier_commit(&subject, &format!("{subject}/5"), &second)
        .await
        .unwrap();
    let both = (first.body.len() + second.body.len()) as u64;
    let stats = store.storage_stats().await.unwrap();
    assert_eq!((stats.segments, stats.segment_bytes), (2, both));

    // Segments written before the subjects kept their bytes are added up
    // when the schema is applied.
    let forget = format!(
        "box.space.mts_subjects:update({{'{subject}'}}, {{{{'=', 'segment_bytes', box.NULL}}}})"
    );
    let _: Vec<tarant::Value> = admin.eval(&forget, ()).await.unwrap();
    let _: (u64,) = admin
        .eval(mts_storage::store::SCHEMA_LUA, ())
        .await
        .unwrap();
    let stats = store.storage_stats().await.unwrap();
    assert_eq!((stats.segments, stats.segment_bytes), (2, both));

    // Retention takes the first segment and its bytes.
    keep_newest(&store, &subject, 6).await;
    let stats = store.storage_stats().await.unwrap();
    assert_eq!(
        (stats.segments, stats.segment_bytes),
        (1, second.body.len() as u64)
    );
}

#[tokio::test]
async fn a_run_of_several_slices_is_checked_swapped_and_trimmed_whole() {
    let store = Store::connect(&testing::config()).await.unwrap();
    let subject = testing::unique_subject("slices");
    // Beyond two slices of 256 rows, and not a multiple of one.
    publish_n(&store, &subject, 700).await;
    let sealed = seal(&store, &subject, 700).await;
    assert_eq!(
        store
            .tier_commit(&subject, &format!("{subject}/1"), &sealed)
            .await
            .unwrap(),
        TierCommit::Committed
    );
    let info = store.subject_info(&subject).await.unwrap();
    assert_eq!((info.count, info.cold_count), (700, 700));
    let left = store.tier_read(&subject, 0, 1000, u64::MAX).await.unwrap();
    assert!(left.is_empty(), "{} hot rows left", left.len());
    let delivered = store.fetch(&subject, "d", 1000).await.unwrap().messages;
    let seqs: Vec<u64> = delivered.iter().map(|l| l.message.seq).collect();
    assert_eq!(seqs, (1..=700).collect::<Vec<_>>());
}

#[tokio::test]
async fn fresh_messages_of_a_segment_are_handed_out_a_block_at_a_time_each_at_its_own_block() {
    let store = Store::connect(&testing::config()).await.unwrap();
    let subject = testing::unique_subject("spans");
    publish_n(&store, &subject, 40).await;
    // Blocks of a few messages each, so that batches start and end inside
    // them.
    let rows: Vec<_> = (store.tier_read(&subject, 0, 30, u64::MAX).await.unwrap())
        .into_iter()
        .flatten()
        .collect();
    let mut writer = Writer::new(300);
    for row in &rows {
        writer.push(row);
    }
    let sealed = writer.finish();
    assert!(sealed.blocks.len() >= 5, "{} blocks", sealed.blocks.len());
    let key = format!("{subject}/segments/1");
    assert_eq!(
        store.tier_commit(&subject, &key, &sealed).await.unwrap(),
        TierCommit::Committed
    );
    // A hot message gone (as eviction takes one): the batch runs past the gap.
    let admin = testing::admin_client().await;
    let (deleted,): (bool,) = admin
        .eval(
            "return box.space.mts_messages:delete({...}) ~= nil",
            (&subject, 33u64),
        )
        .await
        .unwrap();
    assert!(deleted);

    let block_of = |seq: u64| {
        let block = sealed
            .blocks
            .iter()
            .rev()
            .find(|b| b.first_seq <= seq)
            .unwrap();
        (key.clone(), block.offset, block.length)
    };
    let first = store.fetch(&subject, "d", 13).await.unwrap();
    let rest = store.fetch(&subject, "d", 100).await.unwrap();
    let mut seen = Vec::new();
    for leased in first.messages.iter().chain(&rest.messages) {
        let message = &leased.message;
        assert_eq!(
            (leased.deliveries, message.subject.as_str()),
            (1, subject.as_str())
        );
        match &message.segment {
            Some(at) => assert_eq!(
                (at.object_key.clone(), at.offset, at.length),
                block_of(message.seq),
                "message {}",
                message.seq
            ),
            None => assert!(message.seq > 30, "message {} is hot", message.seq),
        }
        seen.push(message.seq);
    }
    let expected: Vec<u64> = (1..=40).filter(|&seq| seq != 33).collect();
    assert_eq!(seen, expected);
    assert_eq!(first.messages.len(), 13);
    assert_eq!(
        super::consumers::runs(&subject, "d").await,
        vec![
            (1, 13, None),
            (
                14,
                40,
                Some(format!("{}0{}", "1".repeat(19), "1".repeat(7)))
            )
        ],
        "one run a batch, the gap marked"
    );
    // A caller from before spans (no fourth argument) gets an entry per
    // message, each its own reference.
    let (entries,): (Vec<(u64, u64)>,) = admin
        .eval(
            "local out = mts_fetch(...)
             local seen = {}
             for _, entry in ipairs(out) do seen[#seen + 1] = {entry[1][2], #entry} end
             return seen",
            (&subject, "old", 13u32),
        )
        .await
        .unwrap();
    assert_eq!(entries, (1..=13).map(|seq| (seq, 3)).collect::<Vec<_>>());
    let refused = store.ack_sequences(&subject, "d", &[33]).await.unwrap();
    assert_eq!(refused.unwrap_err().0, vec![33]);
    store
        .ack_sequences(&subject, "d", &expected)
        .await
        .unwrap()
        .unwrap();
    assert!(super::consumers::runs(&subject, "d").await.is_empty());
}

#[tokio::test]
async fn a_purge_cuts_a_segment_it_ends_inside_and_removes_whole_ones_before() {
    let store = Store::connect(&testing::config()).await.unwrap();
    let subject = testing::unique_subject("purge-cold");
    let payloads = publish_n(&store, &subject, 10).await;
    let bytes = |from: usize, to: usize| -> u64 {
        payloads[from - 1..to].iter().map(|p| p.len() as u64).sum()
    };
    let sealed = seal(&store, &subject, 6).await;
    let key = format!("{subject}/segments/1");
    store.tier_commit(&subject, &key, &sealed).await.unwrap();

    // Through 3: inside the segment, whose bytes only its object knows.
    let (step, through) = store.purge_step(&subject, 3, 500, None).await.unwrap();
    assert_eq!(through, 3);
    let PurgeStep::Cut {
        removed,
        first_seq,
        blocks,
    } = step
    else {
        panic!("a cut, not {step:?}");
    };
    assert_eq!((removed, first_seq), (0, 1));
    assert!(!blocks.is_empty() && blocks[0].0 == 1, "{blocks:?}");
    assert!(blocks.iter().all(|(_, at)| at.object_key == key));
    let cut = SegmentCut {
        first_seq,
        bytes: bytes(1, 3),
    };
    let (step, _) = store.purge_step(&subject, 3, 500, Some(cut)).await.unwrap();
    assert!(matches!(step, PurgeStep::Done(3)), "{step:?}");
    let info = store.subject_info(&subject).await.unwrap();
    assert_eq!(
        (
            info.first_seq,
            info.count,
            info.cold_count,
            info.bytes,
            info.cold_bytes
        ),
        (4, 7, 3, bytes(4, 10), bytes(4, 6))
    );
    assert!(store.message(&subject, 3).await.unwrap().is_none());
    let fourth = store.message(&subject, 4).await.unwrap().unwrap();
    assert_eq!(
        fourth.segment.expect("still in the segment").object_key,
        key
    );
    let batch = store.fetch(&subject, "after-cut", 100).await.unwrap();
    let seqs: Vec<u64> = batch.messages.iter().map(|l| l.message.seq).collect();
    assert_eq!(seqs, (4..=10).collect::<Vec<_>>());
    assert!(
        !released(&key).await,
        "the object still holds messages 4 to 6"
    );

    // Through 8: the rest of the segment goes whole, with its object.
    let (step, _) = store.purge_step(&subject, 8, 500, None).await.unwrap();
    assert!(matches!(step, PurgeStep::Done(5)), "{step:?}");
    let info = store.subject_info(&subject).await.unwrap();
    assert_eq!(
        (info.first_seq, info.count, info.cold_count, info.bytes),
        (9, 2, 0, bytes(9, 10))
    );
    assert!(released(&key).await);
}

/// Whether object `key` is queued for deletion.
async fn released(key: &str) -> bool {
    let admin = testing::admin_client().await;
    let (queued,): (bool,) = admin
        .eval("return box.space.mts_gc:get(...) ~= nil", (key,))
        .await
        .unwrap();
    queued
}
