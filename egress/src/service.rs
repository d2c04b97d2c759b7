//! The egress RPCs: thin adapters that validate, call an inner function and
//! map its error to a status.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use mts_proto::pb::egress_service_server::EgressService;
use mts_proto::pb::{
    AckRequest, AckResponse, FetchRequest, GetLastSequenceRequest, GetLastSequenceResponse,
    Message, Notification, SubscribeRequest,
};
use mts_shared::blob::{self, BlobStore};
use mts_shared::store::{AckOutcome, Store, StoredMessage};
use mts_shared::validate;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::Error;
use crate::notify::SubjectWatchers;

/// Batch size when the client asks for 0 or less.
const DEFAULT_BATCH: u32 = 10;
/// Largest batch one Fetch may ask for.
const MAX_BATCH: i32 = 1000;
/// Offloaded payloads read from the object store at once per Fetch.
const PAYLOAD_READS_IN_FLIGHT: usize = 4;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The egress service state; cheap to clone.
#[derive(Clone)]
pub struct Egress {
    store: Store,
    blobs: BlobStore,
    watchers: Arc<SubjectWatchers>,
    draining: watch::Receiver<bool>,
}

impl Egress {
    /// A service reading through `store` and `blobs`; open streams end when
    /// `draining` turns true.
    pub fn new(
        store: Store,
        blobs: BlobStore,
        watchers: Arc<SubjectWatchers>,
        draining: watch::Receiver<bool>,
    ) -> Self {
        Self {
            store,
            blobs,
            watchers,
            draining,
        }
    }

    async fn open_subscription(
        &self,
        request: SubscribeRequest,
    ) -> Result<mpsc::Receiver<Result<Notification, Status>>, Error> {
        validate::subject(&request.subject)?;
        validate::durable_name(&request.durable_name)?;
        let start = request.start_sequence.unwrap_or(0);
        let (notified, last) = self
            .store
            .subscribe(&request.subject, &request.durable_name, start)
            .await?;
        let updates = self.watchers.watch(&request.subject, last);
        let (sender, receiver) = mpsc::channel(16);
        tokio::spawn(push_notifications(
            request.subject,
            notified,
            last,
            updates,
            sender,
            self.draining.clone(),
        ));
        Ok(receiver)
    }

    async fn fetch_batch(&self, request: FetchRequest) -> Result<Vec<StoredMessage>, Error> {
        validate::subject(&request.subject)?;
        validate::durable_name(&request.durable_name)?;
        let limit = match request.batch_size {
            n if n <= 0 => DEFAULT_BATCH,
            n if n > MAX_BATCH => {
                return Err(validate::Error::new(
                    "batch_size",
                    format!("{n} is above the limit of {MAX_BATCH}"),
                )
                .into());
            }
            n => n.unsigned_abs(),
        };
        Ok(self
            .store
            .fetch(&request.subject, &request.durable_name, limit)
            .await?)
    }

    async fn ack(&self, request: AckRequest) -> Result<u64, Error> {
        validate::subject(&request.subject)?;
        validate::durable_name(&request.durable_name)?;
        if request.sequence == 0 {
            return Err(validate::Error::new("sequence", "must be at least 1").into());
        }
        match self
            .store
            .ack(&request.subject, &request.durable_name, request.sequence)
            .await?
        {
            AckOutcome::Acked { position } => Ok(position),
            AckOutcome::BeyondLast { last } => Err(Error::AckBeyondLast {
                subject: request.subject,
                sequence: request.sequence,
                last,
            }),
        }
    }
}

/// Sends a notification whenever the last sequence passes what the
/// subscriber was last told, until the client leaves or the server drains.
async fn push_notifications(
    subject: String,
    mut notified: u64,
    mut last: u64,
    mut updates: watch::Receiver<u64>,
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
                last = last.max(*updates.borrow_and_update());
            }
            () = sender.closed() => return,
            // The watch guard must not live across the send below.
            () = async { let _ = draining.wait_for(|draining| *draining).await; } => {
                let _ = sender
                    .send(Err(Status::unavailable(
                        "egress is shutting down; reconnect to continue the subscription",
                    )))
                    .await;
                return;
            }
        }
    }
}

fn timestamp(ts_ns: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(ts_ns / 1_000_000_000).unwrap_or(i64::MAX),
        nanos: i32::try_from(ts_ns % 1_000_000_000).unwrap_or(0),
    }
}

/// Completes a stored message with its payload.
async fn deliver(blobs: BlobStore, stored: StoredMessage) -> Result<Message, Error> {
    let data = match (&stored.object_key, stored.data) {
        (Some(key), _) => match blobs.get(key).await {
            Ok(bytes) => bytes,
            Err(blob::Error::NotFound(_)) => {
                return Err(Error::MissingPayload {
                    subject: stored.subject,
                    sequence: stored.seq,
                    key: key.clone(),
                });
            }
            Err(err) => return Err(Error::Blob(err)),
        },
        (None, Some(inline)) => inline.into_vec().into(),
        (None, None) => Default::default(),
    };
    Ok(Message {
        subject: stored.subject,
        sequence: stored.seq,
        data,
        headers: stored.headers,
        timestamp: Some(timestamp(stored.ts_ns)),
    })
}

#[tonic::async_trait]
impl EgressService for Egress {
    type SubscribeStream = ResponseStream<Notification>;
    type FetchStream = ResponseStream<Message>;

    #[instrument(skip_all, fields(subject = %request.get_ref().subject, durable = %request.get_ref().durable_name))]
    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let receiver = self
            .open_subscription(request.into_inner())
            .await
            .inspect_err(|err| tracing::warn!(%err, "subscribe failed"))?;
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    #[instrument(skip_all, fields(subject = %request.get_ref().subject, durable = %request.get_ref().durable_name))]
    async fn fetch(
        &self,
        request: Request<FetchRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        let batch = self
            .fetch_batch(request.into_inner())
            .await
            .inspect_err(|err| tracing::warn!(%err, "fetch failed"))?;
        tracing::debug!(messages = batch.len(), "fetched");
        let blobs = self.blobs.clone();
        let messages = futures::stream::iter(batch)
            .map(move |stored| deliver(blobs.clone(), stored))
            .buffered(PAYLOAD_READS_IN_FLIGHT)
            .map(|delivered| {
                delivered
                    .inspect_err(|err| tracing::warn!(%err, "fetch failed mid-batch"))
                    .map_err(Status::from)
            });
        // A failed payload read ends the batch: later messages must not
        // arrive without the earlier one, or an ack could skip it.
        let until_first_error = messages.scan(false, |failed, item| {
            let out = if *failed { None } else { Some(item) };
            if let Some(Err(_)) = &out {
                *failed = true;
            }
            std::future::ready(out)
        });
        Ok(Response::new(Box::pin(until_first_error)))
    }

    #[instrument(skip_all, fields(subject = %request.get_ref().subject))]
    async fn get_last_sequence(
        &self,
        request: Request<GetLastSequenceRequest>,
    ) -> Result<Response<GetLastSequenceResponse>, Status> {
        let subject = request.into_inner().subject;
        let last = async {
            validate::subject(&subject)?;
            Ok::<_, Error>(self.store.last_seq(&subject).await?)
        }
        .await
        .inspect_err(|err| tracing::warn!(%err, "get last sequence failed"))?;
        Ok(Response::new(GetLastSequenceResponse {
            last_sequence: last,
        }))
    }

    #[instrument(skip_all, fields(subject = %request.get_ref().subject, durable = %request.get_ref().durable_name, sequence = request.get_ref().sequence))]
    async fn ack_message(
        &self,
        request: Request<AckRequest>,
    ) -> Result<Response<AckResponse>, Status> {
        let position = self
            .ack(request.into_inner())
            .await
            .inspect_err(|err| tracing::warn!(%err, "ack failed"))?;
        tracing::debug!(position, "acked");
        Ok(Response::new(AckResponse {
            success: true,
            error_message: String::new(),
        }))
    }
}
