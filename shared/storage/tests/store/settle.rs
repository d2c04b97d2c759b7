//! Publishes whose answer was lost: the group commit settles them with
//! Tarantool, so a caller is told "stored" (with the sequence) or "not
//! stored" only when that is true, and "unknown" when Tarantool cannot be
//! asked in time.

use mts_storage::store::{Error, Store};
use mts_testkit::{self as testing, LossyProxy, TarantoolProcess};

use crate::{inline, raw_client};

/// A store that reaches Tarantool through a proxy the test controls.
async fn through_proxy(tarantool: &TarantoolProcess, timeout_ms: u64) -> (Store, LossyProxy) {
    let proxy = LossyProxy::start(tarantool.address()).await;
    let mut config = tarantool.config();
    config.tarantool.address = proxy.address();
    config.tarantool.timeout_ms = timeout_ms;
    (Store::connect(&config).await.unwrap(), proxy)
}

#[tokio::test]
async fn a_commit_whose_answer_was_lost_is_answered_with_its_sequence() {
    let tarantool = TarantoolProcess::start();
    let direct = Store::connect(&tarantool.config()).await.unwrap();
    let (store, proxy) = through_proxy(&tarantool, 5000).await;
    let subject = testing::unique_subject("lost-answer");
    store
        .publish_inline(inline(&subject, b"first"))
        .await
        .unwrap();

    proxy.lose_next_reply();
    let published = store
        .publish_inline(inline(&subject, b"second"))
        .await
        .expect("the commit happened, so the publish succeeded");
    assert_eq!(published.seq, 2);
    assert!(!published.duplicate);
    assert_eq!(direct.last_seq(&subject).await.unwrap(), 2);
    // And the queue goes on.
    let third = store
        .publish_inline(inline(&subject, b"third"))
        .await
        .unwrap();
    assert_eq!(third.seq, 3);
}

#[tokio::test]
async fn a_commit_that_never_arrived_is_answered_not_stored() {
    let tarantool = TarantoolProcess::start();
    let direct = Store::connect(&tarantool.config()).await.unwrap();
    let (store, proxy) = through_proxy(&tarantool, 5000).await;
    let subject = testing::unique_subject("lost-request");
    proxy.lose_next_request();
    let err = store
        .publish_inline(inline(&subject, b"lost"))
        .await
        .unwrap_err();
    assert!(err.outcome_unknown(), "a plain connection failure: {err:?}");
    assert_eq!(direct.last_seq(&subject).await.unwrap(), 0);
    let next = store
        .publish_inline(inline(&subject, b"next"))
        .await
        .unwrap();
    assert_eq!(next.seq, 1, "nothing was stored, no sequence was used");
}

#[tokio::test]
async fn when_tarantool_cannot_be_asked_in_time_the_outcome_is_unknown() {
    let tarantool = TarantoolProcess::start();
    let direct = Store::connect(&tarantool.config()).await.unwrap();
    let (store, proxy) = through_proxy(&tarantool, 1000).await;
    let subject = testing::unique_subject("unknown");
    proxy.lose_next_reply();
    proxy.refuse_connections(true);
    let err = store
        .publish_inline(inline(&subject, b"maybe"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::OutcomeUnknown { .. }), "{err:?}");
    // It was in fact stored: "unknown" was the truthful answer, "not stored" would not have been.
    assert_eq!(direct.last_seq(&subject).await.unwrap(), 1);
    proxy.refuse_connections(false);
}

#[tokio::test]
async fn a_settled_attempt_arriving_late_stores_nothing_and_a_replay_stores_nothing_twice() {
    let config = testing::config();
    // Connecting applies the schema, if no one has yet.
    let store = Store::connect(&config).await.unwrap();
    let client = raw_client(&config).await;
    let subject = testing::unique_subject("fence");
    let attempt = format!("test-{}", uuid::Uuid::now_v7().simple());
    let none: Vec<String> = Vec::new();
    let message = (
        subject.as_str(),
        std::collections::HashMap::<String, String>::new(),
        serde_bytes::Bytes::new(b"x"),
        1u64,
        "0".repeat(64),
        "",
        0u64,
        0u64,
    );
    let (outcome, verdicts): (String, Vec<tarant::Value>) = client
        .call("mts_settle_attempt", (&attempt,))
        .await
        .unwrap();
    assert_eq!((outcome.as_str(), verdicts.len()), ("fenced", 0));
    let (late,): (Vec<(u64, bool, u32, String)>,) = client
        .call(
            "mts_publish_batch",
            (vec![message.clone()], &attempt, &none),
        )
        .await
        .unwrap();
    assert_eq!(late[0].0, 0);
    assert_eq!(late[0].2, 10003, "{late:?}");
    assert_eq!(store.last_seq(&subject).await.unwrap(), 0);

    // A committed attempt sent again answers as before and stores nothing more.
    let attempt = format!("test-{}", uuid::Uuid::now_v7().simple());
    let (first,): (Vec<(u64, bool)>,) = client
        .call(
            "mts_publish_batch",
            (vec![message.clone(), message.clone()], &attempt, &none),
        )
        .await
        .unwrap();
    assert_eq!(first, vec![(1, false), (2, false)]);
    let (again,): (Vec<(u64, bool)>,) = client
        .call(
            "mts_publish_batch",
            (vec![message.clone(), message.clone()], &attempt, &none),
        )
        .await
        .unwrap();
    assert_eq!(again, first);
    let (outcome, settled): (String, Vec<(u64, bool)>) = client
        .call("mts_settle_attempt", (&attempt,))
        .await
        .unwrap();
    assert_eq!((outcome.as_str(), settled), ("committed", first));
    assert_eq!(store.last_seq(&subject).await.unwrap(), 2);

    // Forgotten, the attempt is gone: settling it now fences it.
    let (_,): (Vec<(u64, bool)>,) = client
        .call(
            "mts_publish_batch",
            (Vec::<()>::new(), "", vec![attempt.clone()]),
        )
        .await
        .unwrap();
    let (outcome, _): (String, Vec<tarant::Value>) = client
        .call("mts_settle_attempt", (&attempt,))
        .await
        .unwrap();
    assert_eq!(outcome, "fenced");
}

#[tokio::test]
async fn answered_attempts_do_not_pile_up() {
    let tarantool = TarantoolProcess::start();
    let config = tarantool.config();
    let store = Store::connect(&config).await.unwrap();
    let subject = testing::unique_subject("forget");
    for _ in 0..50 {
        store.publish_inline(inline(&subject, b"m")).await.unwrap();
    }
    let client = tarantool.admin_client().await;
    let (rows,): (u64,) = client
        .eval("return box.space.mts_attempts:len()", ())
        .await
        .unwrap();
    assert!(
        rows <= 2,
        "{rows} attempts kept after 50 sequential publishes"
    );
}
