//! A store on a three-member replica set with synchronous replication:
//! writes go to the member that takes them and follow it through a failover;
//! with the quorum lost nothing is stored, and an old leader rejoins as a
//! follower with every confirmed write.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mts_storage::store::{Refusal, Store};
use mts_testkit::{self as testing, ReplicaSet};

async fn publish(store: &Store, subject: &str, i: u64) -> Result<u64, mts_storage::store::Error> {
    store
        .publish(subject, &HashMap::new(), Some(&i.to_be_bytes()), None, 8)
        .await
}

/// Publishes until one is answered with a sequence, for at most `within`.
async fn publish_within(store: &Store, subject: &str, i: u64, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        match publish(store, subject, i).await {
            Ok(seq) => return seq,
            Err(err) if Instant::now() < deadline => {
                tracing::debug!(%err, "not yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("no publish within {within:?}: {err}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_follow_the_leader_through_a_failover_and_need_a_quorum() {
    let mut set = ReplicaSet::start();
    let store = Store::connect(&set.config()).await.unwrap();
    let subject = testing::unique_subject("replicas");
    for i in 1..=10 {
        assert_eq!(publish(&store, &subject, i).await.unwrap(), i);
    }
    let members = store.members().await;
    assert_eq!(members.len(), 3);
    assert!(
        members[0].leader && !members[1].leader && !members[2].leader,
        "{members:?}"
    );

    // The leader dies; member 1 is promoted. The store finds it on its own.
    set.members[0].kill();
    let killed = Instant::now();
    set.promote(1).await;
    let seq = publish_within(&store, &subject, 11, Duration::from_secs(15)).await;
    println!(
        "first publish after the kill stored in {:?}",
        killed.elapsed()
    );
    assert_eq!(seq, 11, "sequences go on, none lost or used twice");
    for i in 1..=10 {
        let stored = store
            .message(&subject, i)
            .await
            .unwrap()
            .expect("confirmed before the kill");
        assert_eq!(stored.data.unwrap().as_ref(), i.to_be_bytes());
    }

    // Member 2 goes too: one member is no quorum, and nothing is stored.
    set.members[2].kill();
    let err = publish(&store, &subject, 12).await.unwrap_err();
    assert_eq!(err.refusal(), Some(Refusal::QuorumLost), "{err}");
    assert_eq!(store.last_seq(&subject).await.unwrap(), 11);

    // The old leader rejoins as a follower: the quorum is back, and it has
    // every confirmed write.
    set.rejoin_as_follower(0);
    assert_eq!(
        publish_within(&store, &subject, 12, Duration::from_secs(15)).await,
        12
    );
    let admin = set.members[0].admin_client().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (last,): (u64,) = admin
            .eval(
                "local row = box.space.mts_subjects:get(...) return row and row.last_seq or 0",
                (subject.as_str(),),
            )
            .await
            .unwrap();
        if last == 12 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the old leader caught up only to {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let members = store.members().await;
    assert!(members[1].leader && !members[0].leader, "{members:?}");
}

/// Every write commits while all three members are up, one after another and
/// many at once: on Tarantool 2.6.0 a second CONFIRM for a write (the late
/// member's) used to leave a few writes in a hundred waiting out the synchro
/// timeout, and most of a concurrent load rolled back (see init.lua).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_commits_one_after_another_and_many_at_once() {
    let set = ReplicaSet::start();
    let store = Store::connect(&set.config()).await.unwrap();
    let subject = testing::unique_subject("replicas-load");
    for i in 1..=300 {
        let started = Instant::now();
        let seq = publish(&store, &subject, i).await.unwrap_or_else(|err| {
            panic!("publish {i} refused after {:?}: {err}", started.elapsed())
        });
        assert_eq!(seq, i);
    }
    let tasks: Vec<_> = (0..40u64)
        .map(|task| {
            let (store, subject) = (store.clone(), subject.clone());
            tokio::spawn(async move {
                for i in 0..50 {
                    publish(&store, &subject, 1_000 + task * 100 + i)
                        .await
                        .unwrap_or_else(|err| panic!("a concurrent publish refused: {err}"));
                }
            })
        })
        .collect();
    for task in futures::future::join_all(tasks).await {
        task.unwrap();
    }
    assert_eq!(store.last_seq(&subject).await.unwrap(), 300 + 40 * 50);

    // The writes were synchronous through mts_sync alone, which is left
    // empty; a space that an earlier schema made synchronous is made
    // asynchronous again.
    let admin = set.members[0].admin_client().await;
    let flags = "local sync = {} for _, s in box.space._space:pairs() do \
                 if s[3]:sub(1, 4) == 'mts_' and s[6].is_sync then table.insert(sync, s[3]) end end \
                 table.sort(sync) return sync, box.space.mts_sync:len()";
    let (sync, rows): (Vec<String>, u64) = admin.eval(flags, ()).await.unwrap();
    assert_eq!((sync, rows), (vec!["mts_sync".to_owned()], 0));
    let _: Vec<tarant::Value> = admin
        .eval(
            "box.space._space:update(box.space.mts_messages.id, {{'=', 6, {is_sync = true}}}) mts_make_sync()",
            (),
        )
        .await
        .unwrap();
    let (sync, _): (Vec<String>, u64) = admin.eval(flags, ()).await.unwrap();
    assert_eq!(sync, vec!["mts_sync".to_owned()]);
}

/// On Tarantool before 2.6.1 the leader keeps the quorum at the members in
/// step with it: all three while they are, two when a follower is gone,
/// three again once it is back and has caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quorum_follows_the_members_in_step_with_the_leader() {
    let mut set = ReplicaSet::start();
    let admin = set.members[0].admin_client().await;
    let quorum = || async {
        let (quorum,): (u64,) = admin
            .eval("return box.cfg.replication_synchro_quorum", ())
            .await
            .unwrap();
        quorum
    };
    let until = |want: u64| {
        let quorum = &quorum;
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let have = quorum().await;
                if have == want {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "the quorum stayed {have}, not {want}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    until(3).await;
    let store = Store::connect(&set.config()).await.unwrap();
    let subject = testing::unique_subject("replicas-quorum");
    set.members[2].kill();
    until(2).await;
    for i in 1..=20 {
        assert_eq!(publish(&store, &subject, i).await.unwrap(), i);
    }
    set.restart_as_follower(2);
    until(3).await;
    for i in 21..=40 {
        assert_eq!(publish(&store, &subject, i).await.unwrap(), i);
    }
    // A follower keeps the configured quorum, which a failover uses.
    let follower = set.members[1].admin_client().await;
    let (quorum,): (u64,) = follower
        .eval("return box.cfg.replication_synchro_quorum", ())
        .await
        .unwrap();
    assert_eq!(quorum, 2);
}

/// What a member answers within 5 s: one that went down would leave a call
/// waiting for its reconnection.
async fn answered<T>(call: impl std::future::Future<Output = Result<T, tarant::Error>>) -> T {
    tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("the member answers")
        .expect("the call succeeds")
}

/// A leader lost with a write the quorum never confirmed (its followers were
/// down) rejoins after the failover without that write reaching anyone: on
/// Tarantool 2.6 a lost leader restarted with its data would hand it to the
/// others, so it rejoins with its data set aside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_leaders_unconfirmed_write_never_reaches_the_others() {
    let mut set = ReplicaSet::start();
    let leader = set.members[0].admin_client().await;
    let write = |key: &'static str| format!("box.space.mts_leases:replace({{'{key}', 'test', 1}})");
    let _: Vec<tarant::Value> = leader.eval(&write("before"), ()).await.unwrap();
    set.members[1].kill();
    set.members[2].kill();
    // Written on the leader alone, waiting for a quorum when the leader dies.
    let unconfirmed = tokio::spawn(async move {
        leader
            .eval::<Vec<tarant::Value>>(&write("unconfirmed"), ())
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    set.members[0].kill();
    assert!(unconfirmed.await.unwrap().is_err(), "never confirmed");
    set.restart_as_follower(1);
    set.restart_as_follower(2);
    set.promote(1).await;
    set.rejoin_as_follower(0);
    let new_leader = set.members[1].admin_client().await;
    let _: Vec<tarant::Value> = answered(new_leader.eval(&write("after"), ())).await;
    let has = "return box.space.mts_leases:get(...) ~= nil";
    let deadline = Instant::now() + Duration::from_secs(10);
    let old = set.members[0].admin_client().await;
    loop {
        let (after,): (bool,) = answered(old.eval(has, ("after",))).await;
        if after {
            break;
        }
        assert!(Instant::now() < deadline, "the old leader did not catch up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (i, member) in set.members.iter().enumerate() {
        let admin = member.admin_client().await;
        for (key, want) in [("before", true), ("unconfirmed", false), ("after", true)] {
            let (found,): (bool,) = answered(admin.eval(has, (key,))).await;
            assert_eq!(found, want, "member {i}: {key}");
        }
    }
}

/// Schema 16 made every space synchronous, and Tarantool 2.6.0 cannot
/// recover a snapshot with rows of a synchronous space: its members' files
/// are read with the schema's spaces taken as asynchronous (init.lua).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_restarts_from_a_snapshot_that_schema_16_wrote() {
    let mut set = ReplicaSet::start();
    let leader = set.members[0].admin_client().await;
    let _: Vec<tarant::Value> = answered(leader.eval(
        "box.space._space:update(box.space.mts_leases.id, {{'=', 6, {is_sync = true}}}) \
         box.space.mts_leases:replace({'synchronous', 'test', 1})",
        (),
    ))
    .await;
    let follower = set.members[2].admin_client().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (has,): (bool,) = answered(follower.eval(
            "return box.space.mts_leases:get('synchronous') ~= nil and box.space.mts_leases.is_sync",
            (),
        ))
        .await;
        if has {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the follower did not get the row"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _: Vec<tarant::Value> = answered(follower.eval("box.snapshot()", ())).await;
    set.restart_as_follower(2);
    let follower = set.members[2].admin_client().await;
    let (has, sync): (bool, bool) = answered(follower.eval(
        "return box.space.mts_leases:get('synchronous') ~= nil, box.space.mts_leases.is_sync",
        (),
    ))
    .await;
    assert!(has && !sync, "recovered the row, the space asynchronous");
}

/// A backup's checkpoint is a follower's, so that the leader goes on
/// serving; the hold on object deletions is the leader's, and both end with
/// the backup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_is_taken_on_a_follower_and_holds_deletions_on_the_leader() {
    let set = ReplicaSet::start();
    let store = Store::connect(&set.config()).await.unwrap();
    let subject = testing::unique_subject("replicas-backup");
    let marker = b"a message the follower's checkpoint has";
    store
        .publish(
            &subject,
            &HashMap::new(),
            Some(marker),
            None,
            marker.len() as u64,
        )
        .await
        .unwrap();
    let admin = set.members[0].admin_client().await;
    let (published,): (u64,) = answered(admin.eval(
        "local n = 0 for _, v in pairs(box.info.vclock) do n = n + v end return n",
        (),
    ))
    .await;
    let checkpoint = store
        .backup_start(Duration::from_secs(60), Duration::from_secs(30))
        .await
        .unwrap();
    let leader = set.members[0].address();
    assert_ne!(checkpoint.address, leader, "taken on a follower");
    let (snap, size) = checkpoint
        .files
        .iter()
        .find(|(name, _)| name.ends_with(".snap"))
        .expect("a snapshot among the files")
        .clone();
    let bytes = store
        .backup_read(&checkpoint, &snap, 0, size)
        .await
        .unwrap();
    assert_eq!(bytes.len() as u64, size);
    assert!(bytes.starts_with(b"SNAP"));
    // A checkpoint is named after the log position it holds.
    let position: u64 = snap.trim_end_matches(".snap").parse().unwrap();
    assert!(
        position >= published,
        "the follower's checkpoint ({position}) holds all the leader had ({published})"
    );
    let held = "return box.space.mts_leases:select({}, {iterator = 'ALL'})";
    let rows = |rows: Vec<Vec<tarant::Value>>| {
        rows.iter()
            .filter(|row| format!("{:?}", row[1]).contains("backup"))
            .count()
    };
    let (during,): (Vec<Vec<tarant::Value>>,) = answered(admin.eval(held, ())).await;
    assert_eq!(rows(during), 1, "deletions held on the leader");
    store.backup_stop(&checkpoint).await.unwrap();
    let (after,): (Vec<Vec<tarant::Value>>,) = answered(admin.eval(held, ())).await;
    assert_eq!(rows(after), 0, "the hold lifted");
    // The follower let its checkpoint go: reading it now is refused.
    assert!(
        store.backup_read(&checkpoint, &snap, 0, 4).await.is_err(),
        "unpinned on the follower"
    );
}
