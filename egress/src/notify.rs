//! Push notifications of new commits and releases. For each subject with
//! open Subscribe or Consume streams, one task per process long-polls
//! Tarantool (`mts_wait`, a `fiber.cond` wait) and fans what it saw out to
//! every stream through a watch channel: the subject's new last sequence,
//! and a count of releases (messages deliverable again to one of its
//! consumers: a nack, a release, a lease that ran out), which wakes idle
//! Consume streams at once. The task ends when the last stream goes away.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mts_storage::store::{Store, Watch};
use tokio::sync::watch;

/// What a subject's watcher tells its streams.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Signal {
    /// The subject's last sequence.
    pub last: u64,
    /// How many releases this process has seen on the subject.
    pub releases: u64,
}

/// The per-subject waiters of one egress process.
pub struct SubjectWatchers {
    store: Store,
    wait: Duration,
    active: Mutex<HashMap<String, watch::Sender<Signal>>>,
}

impl SubjectWatchers {
    /// Waiters that long-poll `store` for up to `wait` at a time.
    pub fn new(store: Store, wait: Duration) -> Self {
        Self {
            store,
            wait,
            active: Mutex::default(),
        }
    }

    /// A receiver of the subject's signal, its last sequence at least
    /// `known_last`. Starts the subject's waiter if none runs.
    pub fn watch(self: &Arc<Self>, subject: &str, known_last: u64) -> watch::Receiver<Signal> {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sender) = active.get(subject) {
            sender.send_if_modified(|signal| {
                let newer = known_last > signal.last;
                signal.last = signal.last.max(known_last);
                newer
            });
            return sender.subscribe();
        }
        let (sender, receiver) = watch::channel(Signal {
            last: known_last,
            releases: 0,
        });
        active.insert(subject.to_owned(), sender.clone());
        tokio::spawn(Arc::clone(self).follow(subject.to_owned(), sender));
        receiver
    }

    /// How many subjects have a waiter now.
    pub fn active_subjects(&self) -> usize {
        self.active.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    async fn follow(self: Arc<Self>, subject: String, sender: watch::Sender<Signal>) {
        let mut backoff = Duration::from_millis(100);
        let mut seen = Watch::default();
        loop {
            seen.last = seen.last.max(sender.borrow().last);
            tokio::select! {
                () = sender.closed() => {
                    let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
                    // A stream may have subscribed since `closed` fired.
                    if sender.receiver_count() == 0 {
                        active.remove(&subject);
                        return;
                    }
                }
                waited = self.store.watch(&subject, seen, self.wait) => match waited {
                    Ok(watched) => {
                        backoff = Duration::from_millis(100);
                        seen = watched.now;
                        sender.send_if_modified(|signal| {
                            let newer = seen.last > signal.last;
                            signal.last = signal.last.max(seen.last);
                            if watched.released {
                                signal.releases += 1;
                            }
                            newer || watched.released
                        });
                    }
                    Err(err) => {
                        tracing::warn!(%subject, %err, retry_in = ?backoff, "waiting for commits failed");
                        tokio::time::sleep(mts_storage::backoff::jittered(backoff)).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                },
            }
        }
    }
}
