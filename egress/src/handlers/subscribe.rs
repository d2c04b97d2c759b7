//! Subscribe: a notification whenever a subject's last sequence passes what
//! the subscriber was last told.

use mts_proto::pb::{Notification, SubscribeRequest};
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::Error;
use crate::handlers::{Egress, draining_status};
use crate::notify::Signal;
use crate::rules::consumer_names;

impl Egress {
    /// The subject's last sequence; 0 if nothing was ever published to it.
    pub(crate) async fn last_sequence(&self, subject: &str) -> Result<u64, Error> {
        mts_runtime::validate::subject(subject)?;
        Ok(self.store.last_seq(subject).await?)
    }

    pub(crate) async fn open_subscription(
        &self,
        request: SubscribeRequest,
    ) -> Result<mpsc::Receiver<Result<Notification, Status>>, Error> {
        consumer_names(&request.subject, &request.durable_name)?;
        let start = request.start_sequence.unwrap_or(0);
        let (notified, last) = self
            .store
            .subscribe(&request.subject, &request.durable_name, start)
            .await?;
        let updates = self.watchers.watch(&request.subject, last);
        let (sender, receiver) = mpsc::channel(16);
        let open = self.metrics.stream_opened("subscribe");
        tokio::spawn(push_notifications(
            open,
            request.subject,
            notified,
            last,
            updates,
            sender,
            self.draining.clone(),
        ));
        Ok(receiver)
    }
}

/// Sends a notification whenever the last sequence passes what the
/// subscriber was last told, until the client leaves or the server drains.
async fn push_notifications(
    _open: mts_runtime::metrics::StreamGuard,
    subject: String,
    mut notified: u64,
    mut last: u64,
    mut updates: watch::Receiver<Signal>,
    sender: mpsc::Sender<Result<Notification, Status>>,
    mut draining: watch::Receiver<bool>,
) {
    loop {
        if last > notified {
            let note = Notification {
                subject: subject.clone(),
                sequence: last,
            };
            if sender.send(Ok(note)).await.is_err() {
                return;
            }
            notified = last;
        }
        tokio::select! {
            changed = updates.changed() => {
                if changed.is_err() {
                    let _ = sender.send(Err(Status::unavailable("notifications stopped; reconnect"))).await;
                    return;
                }
                last = last.max(updates.borrow_and_update().last);
            }
            () = sender.closed() => return,
            // The watch guard must not live across the send below.
            () = async { let _ = draining.wait_for(|draining| *draining).await; } => {
                let _ = sender.send(Err(draining_status())).await;
                return;
            }
        }
    }
}
