//! Publishing many messages over one `PublishMany` stream, answers awaited
//! apart.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;

use mts_proto::pb::ingress_service_client::IngressServiceClient;
use mts_proto::pb::{PublishRequest, PublishResponse};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::client::Repeat;
use crate::{Client, Error, Message, Published};

/// A message sent and not yet answered.
struct Pending {
    request: PublishRequest,
    attempts: u32,
    reply: oneshot::Sender<Result<Published, Error>>,
    _slot: OwnedSemaphorePermit,
}

impl Pending {
    fn answer(self, outcome: Result<Published, Error>) {
        // The caller may have stopped waiting for it.
        let _ = self.reply.send(outcome);
    }
}

/// Publishes messages over one `PublishMany` stream, many in flight at once:
/// [`Publisher::send`] waits only while `max_in_flight` messages are
/// unanswered, and gives a future for each message's own answer. A message
/// the service could not take for now, or whose stream broke (a restart, the
/// server's maximum connection age), is sent again under its message id, as
/// the client's [`Retry`](crate::Retry) says: each is stored once. Cheap to
/// clone; the stream closes when the last clone is dropped and every message
/// is answered.
#[derive(Clone)]
pub struct Publisher {
    queue: mpsc::Sender<Pending>,
    slots: Arc<Semaphore>,
}

impl Client {
    /// A publisher with at most `max_in_flight` messages unanswered at a
    /// time (at least 1).
    pub fn publisher(&self, max_in_flight: usize) -> Publisher {
        let max_in_flight = max_in_flight.max(1);
        let (queue, queued) = mpsc::channel(max_in_flight);
        tokio::spawn(run(self.clone(), queued, max_in_flight));
        Publisher {
            queue,
            slots: Arc::new(Semaphore::new(max_in_flight)),
        }
    }
}

impl Publisher {
    /// Sends `message`, waiting while the publisher has `max_in_flight`
    /// messages unanswered; the future it returns gives the message's answer.
    pub async fn send(
        &self,
        message: Message,
    ) -> Result<impl Future<Output = Result<Published, Error>> + use<>, Error> {
        let slot = Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .map_err(|_| Error::Closed("publisher"))?;
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            request: message.into_request(),
            attempts: 0,
            reply,
            _slot: slot,
        };
        self.queue
            .send(pending)
            .await
            .map_err(|_| Error::Closed("publisher"))?;
        Ok(async move {
            answer
                .await
                .unwrap_or_else(|_| Err(Error::Closed("publisher")))
        })
    }
}

/// Keeps a `PublishMany` stream open while there is something to send, and
/// opens a new one when it breaks, sending again what it had not answered.
async fn run(client: Client, mut queued: mpsc::Receiver<Pending>, max_in_flight: usize) {
    let mut retry: VecDeque<Pending> = VecDeque::new();
    let mut broken_streams = 0;
    loop {
        // Wait for work before opening a stream.
        let first = match retry.pop_front() {
            Some(pending) => pending,
            None => match queued.recv().await {
                Some(pending) => pending,
                None => return,
            },
        };
        retry.push_front(first);
        let (requests, outgoing) = mpsc::channel::<PublishRequest>(max_in_flight);
        let mut ingress = IngressServiceClient::new(client.ingress.clone());
        let request = match client.stream_request(ReceiverStream::new(outgoing)).await {
            Ok(request) => request,
            Err(err) => {
                // The client's own token provider failed: nothing to send.
                let reason = match err {
                    Error::Token(reason) => reason,
                    other => other.to_string(),
                };
                for pending in retry.drain(..) {
                    pending.answer(Err(Error::Token(reason.clone())));
                }
                continue;
            }
        };
        let mut in_flight: VecDeque<Pending> = VecDeque::new();
        // Sends `pending` on the stream, keeping it to match the answer.
        let send = |pending: Pending, in_flight: &mut VecDeque<Pending>| {
            let request = pending.request.clone();
            in_flight.push_back(Pending {
                attempts: pending.attempts + 1,
                ..pending
            });
            requests.try_send(request).is_ok()
        };
        while let Some(pending) = retry.pop_front() {
            send(pending, &mut in_flight);
        }
        let answers = ingress.publish_many(request).await;
        let mut answers = match answers {
            Ok(answers) => answers.into_inner(),
            Err(status) => {
                broken(
                    &client,
                    &mut in_flight,
                    &mut retry,
                    status,
                    &mut broken_streams,
                )
                .await;
                continue;
            }
        };
        let mut closing = false;
        loop {
            tokio::select! {
                next = queued.recv(), if !closing && in_flight.len() < max_in_flight => match next {
                    Some(pending) => {
                        send(pending, &mut in_flight);
                    }
                    None => closing = true,
                },
                answer = answers.next() => match answer {
                    Some(Ok(answer)) => {
                        broken_streams = 0;
                        let Some(pending) = in_flight.pop_front() else {
                            break;
                        };
                        settle(&client, pending, answer, &mut retry);
                        if !retry.is_empty() {
                            // Sent again on this stream, behind the others.
                            while let Some(pending) = retry.pop_front() {
                                send(pending, &mut in_flight);
                            }
                        }
                        if closing && in_flight.is_empty() {
                            return;
                        }
                    }
                    Some(Err(status)) => {
                        broken(&client, &mut in_flight, &mut retry, status, &mut broken_streams).await;
                        break;
                    }
                    None => {
                        let status = tonic::Status::unavailable("the publish stream ended");
                        broken(&client, &mut in_flight, &mut retry, status, &mut broken_streams).await;
                        break;
                    }
                },
            }
            if closing && in_flight.is_empty() {
                return;
            }
        }
    }
}

/// An answer for `pending`: its outcome, or it goes back to be sent again.
fn settle(
    client: &Client,
    pending: Pending,
    answer: PublishResponse,
    retry: &mut VecDeque<Pending>,
) {
    if answer.status_code == 0 {
        let (message_id, attempts) = (pending.request.message_id.clone(), pending.attempts);
        pending.answer(Ok(Published::from_reply(answer, message_id, attempts)));
        return;
    }
    let code = i32::try_from(answer.status_code).map_or(tonic::Code::Unknown, tonic::Code::from);
    failed(
        client,
        pending,
        tonic::Status::new(code, answer.error_message),
        retry,
    );
}

/// `pending` failed with `status`: it goes back to be sent again, or is
/// answered with the error once it may not be tried again.
fn failed(client: &Client, pending: Pending, status: tonic::Status, retry: &mut VecDeque<Pending>) {
    let err = Error::Status {
        doing: "publish",
        status,
    };
    if client.may_try_again(&err, pending.attempts, Repeat::Safe) {
        retry.push_back(pending);
    } else {
        pending.answer(Err(err));
    }
}

/// The stream broke: what it had not answered is sent again on the next one
/// (after a wait), or answered with the error once out of tries.
async fn broken(
    client: &Client,
    in_flight: &mut VecDeque<Pending>,
    retry: &mut VecDeque<Pending>,
    status: tonic::Status,
    broken_streams: &mut u32,
) {
    tracing::debug!(%status, unanswered = in_flight.len(), "publish stream broke");
    for pending in in_flight.drain(..) {
        failed(client, pending, status.clone(), retry);
    }
    *broken_streams += 1;
    tokio::time::sleep(client.retry.wait(*broken_streams + 1)).await;
}
