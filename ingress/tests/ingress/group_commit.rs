//! Group commit of inline publishes (`Store::publish_inline` and the
//! `mts_publish_batch` procedure) against the real Tarantool.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use mts_storage::store::{self, InlineMessage, Published, Store};
use mts_testkit as testing;
use tonic::Code;

fn message(subject: &str, data: impl Into<Bytes>, message_id: Option<&str>) -> InlineMessage {
    let data = data.into();
    InlineMessage {
        subject: subject.into(),
        headers: HashMap::from([("n".to_string(), format!("{}", data.len()))]),
        sha256: "0".repeat(64),
        data,
        message_id: message_id.map(str::to_owned),
        dedup_window: Duration::from_secs(60),
    }
}

#[tokio::test]
async fn queued_messages_get_gap_free_sequences_in_queue_order() {
    let store = Store::connect(&testing::config()).await.unwrap();
    let (one, two) = (
        testing::unique_subject("group.one"),
        testing::unique_subject("group.two"),
    );
    // Queued one after another from one task, and from many at once.
    let queued: Vec<_> = (0..300u32)
        .map(|i| {
            let subject = if i % 3 == 0 { &two } else { &one };
            store.publish_inline(message(subject, i.to_be_bytes().to_vec(), None))
        })
        .collect();
    let concurrent: Vec<_> = (0..50u32)
        .map(|i| {
            let store = store.clone();
            let subject = one.clone();
            tokio::spawn(async move {
                store
                    .publish_inline(message(&subject, (1000 + i).to_be_bytes().to_vec(), None))
                    .await
            })
        })
        .collect();
    let mut next = HashMap::from([(one.clone(), 1u64), (two.clone(), 1u64)]);
    for (i, outcome) in futures::future::join_all(queued)
        .await
        .into_iter()
        .enumerate()
    {
        let subject = if i % 3 == 0 { &two } else { &one };
        let published = outcome.unwrap();
        let expected = next.get_mut(subject).unwrap();
        assert_eq!(
            published,
            Published {
                seq: *expected,
                duplicate: false
            },
            "message {i}"
        );
        *expected += 1;
        let stored = store
            .message(subject, published.seq)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.data.unwrap()[..], (i as u32).to_be_bytes());
        assert_eq!(stored.size, 4);
    }
    let mut concurrent_seqs = Vec::new();
    for task in concurrent {
        concurrent_seqs.push(task.await.unwrap().unwrap().seq);
    }
    concurrent_seqs.sort_unstable();
    concurrent_seqs.dedup();
    assert_eq!(concurrent_seqs.len(), 50, "every message its own sequence");
    assert_eq!(store.last_seq(&one).await.unwrap(), 200 + 50);
    assert_eq!(store.last_seq(&two).await.unwrap(), 100);
    let info = store.subject_info(&one).await.unwrap();
    assert_eq!((info.count, info.bytes), (250, 250 * 4));
}

#[tokio::test]
async fn a_message_tarantool_refuses_is_answered_alone() {
    let store = Store::connect(&testing::config()).await.unwrap();
    let subject = testing::unique_subject("group.refused");
    // Beyond memtx_max_tuple_size (1 MiB by default): Tarantool cannot store
    // it, but the messages around it in the same call are stored.
    let outcomes = futures::future::join_all([
        store.publish_inline(message(&subject, vec![1u8; 10], None)),
        store.publish_inline(message(&subject, vec![2u8; 2 << 20], None)),
        store.publish_inline(message(&subject, vec![3u8; 10], None)),
    ])
    .await;
    assert_eq!(outcomes[0].as_ref().unwrap().seq, 1);
    let refused = outcomes[1].clone().unwrap_err();
    assert!(
        matches!(refused, store::Error::Refused { .. }),
        "{refused:?}"
    );
    let status = mts_runtime::status::store(refused);
    assert_ne!(status.code(), Code::Unknown);
    assert!(status.message().contains("tuple"), "{}", status.message());
    assert_eq!(
        outcomes[2].as_ref().unwrap().seq,
        2,
        "the refused message used no sequence"
    );
    assert_eq!(
        store
            .message(&subject, 2)
            .await
            .unwrap()
            .unwrap()
            .data
            .unwrap()[..],
        [3u8; 10]
    );
    let info = store.subject_info(&subject).await.unwrap();
    assert_eq!((info.last_seq, info.count, info.bytes), (2, 2, 20));
}

#[tokio::test]
async fn a_message_id_repeated_in_one_call_is_stored_once() {
    let store = Store::connect(&testing::config()).await.unwrap();
    let subject = testing::unique_subject("group.dedup");
    let outcomes = futures::future::join_all([
        store.publish_inline(message(&subject, b"a".to_vec(), Some("id-1"))),
        store.publish_inline(message(&subject, b"b".to_vec(), Some("id-1"))),
        store.publish_inline(message(&subject, b"c".to_vec(), Some("id-2"))),
    ])
    .await;
    let published: Vec<Published> = outcomes.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        published,
        [
            Published {
                seq: 1,
                duplicate: false
            },
            Published {
                seq: 1,
                duplicate: true
            },
            Published {
                seq: 2,
                duplicate: false
            },
        ]
    );
    // And across calls.
    let again = store
        .publish_inline(message(&subject, b"d".to_vec(), Some("id-2")))
        .await
        .unwrap();
    assert_eq!(
        again,
        Published {
            seq: 2,
            duplicate: true
        }
    );
    assert_eq!(store.last_seq(&subject).await.unwrap(), 2);
}

#[tokio::test]
async fn a_message_reaching_tarantool_after_its_deadline_is_refused_alone() {
    let config = testing::config();
    let store = Store::connect(&config).await.unwrap();
    let client = crate::tarantool_client(&config).await;
    let subject = testing::unique_subject("group.late");
    let now = crate::now_ns();
    let no_headers: HashMap<String, String> = HashMap::new();
    let item = |deadline_ns: u64| {
        (
            subject.as_str(),
            &no_headers,
            serde_bytes::Bytes::new(b"x"),
            1u64,
            "0".repeat(64),
            "",
            0u64,
            deadline_ns,
        )
    };
    let (verdicts,): (Vec<tarant::Value>,) = client
        .call(
            "mts_publish_batch",
            (vec![item(now - 1_000_000_000), item(now + 60_000_000_000)],),
        )
        .await
        .unwrap();
    let late = verdicts[0].as_array().unwrap();
    assert_eq!(late[2].as_u64(), Some(10002));
    assert!(
        late[3].as_str().unwrap().contains("after its deadline"),
        "{late:?}"
    );
    assert_eq!(verdicts[1].as_array().unwrap()[0].as_u64(), Some(1));
    assert_eq!(store.last_seq(&subject).await.unwrap(), 1);
}
