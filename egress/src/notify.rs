//! Push notifications of new commits. For each subject with open Subscribe
//! streams, one task per process long-polls Tarantool (`mts_wait`, a
//! `fiber.cond` wait) and fans the new last sequence out to every stream
//! through a watch channel. The task ends when the last stream goes away.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mts_storage::store::Store;
use tokio::sync::watch;

/// The per-subject waiters of one egress process.
pub struct SubjectWatchers {
    store: Store,
    wait: Duration,
    active: Mutex<HashMap<String, watch::Sender<u64>>>,
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

    /// A receiver of the subject's last sequence, starting at least at
    /// `known_last`. Starts the subject's waiter if none runs.
    pub fn watch(self: &Arc<Self>, subject: &str, known_last: u64) -> watch::Receiver<u64> {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sender) = active.get(subject) {
            sender.send_if_modified(|last| {
                let newer = known_last > *last;
                *last = (*last).max(known_last);
                newer
            });
            return sender.subscribe();
        }
        let (sender, receiver) = watch::channel(known_last);
        active.insert(subject.to_owned(), sender.clone());
        tokio::spawn(Arc::clone(self).follow(subject.to_owned(), sender));
        receiver
    }

    /// How many subjects have a waiter now.
    pub fn active_subjects(&self) -> usize {
        self.active.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    async fn follow(self: Arc<Self>, subject: String, sender: watch::Sender<u64>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let known = *sender.borrow();
            tokio::select! {
                () = sender.closed() => {
                    let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
                    // A stream may have subscribed since `closed` fired.
                    if sender.receiver_count() == 0 {
                        active.remove(&subject);
                        return;
                    }
                }
                waited = self.store.wait_beyond(&subject, known, self.wait) => match waited {
                    Ok(last) => {
                        backoff = Duration::from_millis(100);
                        sender.send_if_modified(|current| {
                            let newer = last > *current;
                            *current = (*current).max(last);
                            newer
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
