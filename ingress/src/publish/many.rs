//! PublishMany: a stream of messages, each answered in the order sent. Inline
//! messages are queued for group commit as they are read, so a publisher
//! that sends ahead has many in one Tarantool call; the window below bounds
//! how far ahead the server reads. An offloaded message waits for those
//! before it, and those after it wait for it: a stream's messages are stored
//! in the order sent.

use std::time::Instant;

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use mts_proto::pb::{PublishRequest, PublishResponse};
use mts_runtime::auth::{Caller, Permission};
use mts_runtime::metrics::Metrics;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use tracing::Instrument;

use crate::Error;
use crate::publish::{Checked, Ingress, Offloaded, record};
use crate::rate_limit;
use crate::trace::with_trace;

/// Messages read ahead of their answers.
const WINDOW: usize = 256;

type Answer = std::pin::Pin<Box<dyn Future<Output = PublishResponse> + Send>>;

/// The answers to `requests`, produced by a task of their own.
pub(crate) fn serve(
    ingress: Ingress,
    caller: Caller,
    trace: Vec<(String, String)>,
    requests: Streaming<PublishRequest>,
) -> ReceiverStream<Result<PublishResponse, Status>> {
    let (answers, receiver) = mpsc::channel(WINDOW);
    let publisher = Publisher {
        ingress,
        caller,
        trace,
    };
    tokio::spawn(publisher.run(requests, answers).in_current_span());
    ReceiverStream::new(receiver)
}

struct Publisher {
    ingress: Ingress,
    caller: Caller,
    trace: Vec<(String, String)>,
}

impl Publisher {
    async fn run(
        self,
        mut requests: Streaming<PublishRequest>,
        answers: mpsc::Sender<Result<PublishResponse, Status>>,
    ) {
        let mut in_flight: FuturesOrdered<Answer> = FuturesOrdered::new();
        let mut received = 0u64;
        loop {
            tokio::select! {
                biased;
                Some(answer) = in_flight.next(), if !in_flight.is_empty() => {
                    if answers.send(Ok(answer)).await.is_err() {
                        break;
                    }
                }
                next = requests.message(), if in_flight.len() < WINDOW => match next {
                    Ok(Some(request)) => {
                        received += 1;
                        self.throttle().await;
                        match self.start(request) {
                            Started::Answer(answer) => in_flight.push_back(answer),
                            Started::Offloaded(message) => {
                                // Everything before it is stored first.
                                while let Some(answer) = in_flight.next().await {
                                    if answers.send(Ok(answer)).await.is_err() {
                                        return;
                                    }
                                }
                                let started = Instant::now();
                                let outcome = self.ingress.publish_offloaded(message).await;
                                let answer =
                                    answer(self.ingress.metrics.as_deref(), outcome, started);
                                if answers.send(Ok(answer)).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(%status, received, "publish stream broke off");
                        break;
                    }
                },
            }
        }
        // Messages already queued are stored regardless; answer them while
        // the publisher listens.
        while let Some(answer) = in_flight.next().await {
            if answers.send(Ok(answer)).await.is_err() {
                break;
            }
        }
        tracing::debug!(received, "publish stream ended");
    }

    /// A stream's messages count against the caller's rate limit one by
    /// one; over it, the stream is slowed down, not failed.
    async fn throttle(&self) {
        let Some(limiter) = &self.ingress.limiter else {
            return;
        };
        let client = rate_limit::client_of(&self.caller);
        while let Err(wait) = limiter.take(client, Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }

    fn start(&self, mut request: PublishRequest) -> Started {
        let started = Instant::now();
        let checked = self
            .caller
            .authorize(Permission::Publish, &request.subject)
            .map_err(Error::from)
            .and_then(|()| {
                with_trace(&mut request.headers, self.trace.clone());
                self.ingress.check(request)
            });
        match checked {
            Ok(Checked::Inline(message)) => {
                let outcome = self.ingress.publish_inline(message);
                // Only what the answer needs: this runs for every message.
                let metrics = self.ingress.metrics.clone();
                Started::Answer(Box::pin(async move {
                    answer(metrics.as_deref(), outcome.await, started)
                }))
            }
            Ok(Checked::Offloaded(message)) => Started::Offloaded(message),
            Err(err) => {
                let answer = answer(self.ingress.metrics.as_deref(), Err(err), started);
                Started::Answer(Box::pin(std::future::ready(answer)))
            }
        }
    }
}

enum Started {
    /// Its answer, to await in order.
    Answer(Answer),
    /// To upload once everything before it is stored.
    Offloaded(Offloaded),
}

/// The answer to one message: its reply, or its failure as a gRPC code and
/// message in the reply's status fields.
fn answer(
    metrics: Option<&Metrics>,
    outcome: Result<PublishResponse, Error>,
    started: Instant,
) -> PublishResponse {
    match outcome {
        Ok(reply) => {
            record(metrics, &reply, started);
            reply
        }
        Err(err) => {
            let status = Status::from(err);
            match status.code() {
                // A client's mistake, or a full hot tier (a state the
                // metrics and the tiering warnings already tell of): one
                // line per message would flood the log.
                tonic::Code::InvalidArgument
                | tonic::Code::PermissionDenied
                | tonic::Code::ResourceExhausted => {
                    tracing::debug!(%status, "message of a publish stream refused");
                }
                _ => tracing::warn!(%status, "message of a publish stream failed"),
            }
            PublishResponse {
                status_code: status.code() as i64,
                error_message: status.message().to_owned(),
                ..PublishResponse::default()
            }
        }
    }
}
