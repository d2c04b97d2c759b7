//! The egress RPCs: thin adapters that authenticate, validate, call an inner
//! function and map its error to a status (Consume and FetchPayload have
//! modules of their own).

use std::pin::Pin;

use futures::{Stream, StreamExt};
use mts_config::MAX_RETENTION_AGE_MS;
use mts_proto::pb::egress_service_server::EgressService;
use mts_proto::pb::{
    AckRequest, AckResponse, AckSequencesRequest, AckSequencesResponse, ConsumeRequest,
    ConsumerInfo, ConsumerRequest, CreateOrUpdateConsumerRequest, DeleteConsumerResponse,
    FetchRequest, GetLastSequenceRequest, GetLastSequenceResponse, Message, NackRequest,
    NackResponse, Notification, SubscribeRequest,
};
use mts_proto::pb::{
    FetchPayloadRequest, PayloadChunk, SetSubjectLimitsRequest, SubjectInfo, SubjectLimits,
    SubjectRequest,
};
use mts_runtime::auth::Permission;
use mts_runtime::validate;
use mts_storage::store::{AckOutcome, Leased, Limits, SubjectState};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::instrument;

use crate::delivery::{self, wire_messages};
use crate::rules::{consumer_names, held, sequence_list};
use crate::state::{Egress, draining_status};
use crate::{Error, consume, consumer};

/// Batch size when the client asks for 0 or less.
const DEFAULT_BATCH: u32 = 10;
/// Largest batch one Fetch may ask for.
const MAX_BATCH: i32 = 1000;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Requests that name the subject they touch.
pub(crate) trait Touches {
    fn subject(&self) -> &str;
}

macro_rules! touches {
    ($($request:ty),* $(,)?) => {$(
        impl Touches for $request {
            fn subject(&self) -> &str {
                &self.subject
            }
        }
    )*};
}

touches!(
    SubscribeRequest,
    FetchRequest,
    GetLastSequenceRequest,
    AckRequest,
    CreateOrUpdateConsumerRequest,
    ConsumerRequest,
    AckSequencesRequest,
    NackRequest,
    FetchPayloadRequest,
    SetSubjectLimitsRequest,
    SubjectRequest,
);

impl Egress {
    /// Authenticates the caller and checks `permission` on the request's subject.
    fn admit<T: Touches>(&self, request: &Request<T>, permission: Permission) -> Result<(), Error> {
        let caller = self.auth.authenticate(request.metadata())?;
        caller.authorize(permission, request.get_ref().subject())?;
        Ok(())
    }

    async fn open_subscription(
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

    async fn lease_batch(&self, request: &FetchRequest) -> Result<Vec<Leased>, Error> {
        consumer_names(&request.subject, &request.durable_name)?;
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
        let batch = self
            .store
            .fetch(&request.subject, &request.durable_name, limit)
            .await?
            .messages;
        self.count_deliveries(&batch);
        Ok(batch)
    }

    async fn cumulative_ack(&self, request: AckRequest) -> Result<u64, Error> {
        consumer_names(&request.subject, &request.durable_name)?;
        if request.sequence == 0 {
            return Err(validate::Error::new("sequence", "must be at least 1").into());
        }
        match self
            .store
            .ack_message(&request.subject, &request.durable_name, request.sequence)
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

    async fn put_consumer(
        &self,
        request: CreateOrUpdateConsumerRequest,
    ) -> Result<ConsumerInfo, Error> {
        consumer_names(&request.subject, &request.durable_name)?;
        let settings = consumer::settings(&request.subject, request.config)?;
        let created = self
            .store
            .create_or_update_consumer(&request.subject, &request.durable_name, &settings)
            .await?;
        let state = self
            .consumer_state(&request.subject, &request.durable_name)
            .await?;
        Ok(consumer::info(state, created))
    }

    async fn consumer_state(
        &self,
        subject: &str,
        durable: &str,
    ) -> Result<mts_storage::store::ConsumerState, Error> {
        self.store
            .consumer_info(subject, durable)
            .await?
            .ok_or_else(|| Error::ConsumerNotFound {
                subject: subject.to_owned(),
                durable: durable.to_owned(),
            })
    }

    async fn ack_sequences(&self, request: AckSequencesRequest) -> Result<u64, Error> {
        consumer_names(&request.subject, &request.durable_name)?;
        sequence_list(&request.sequences)?;
        let verdict = self
            .store
            .ack_sequences(&request.subject, &request.durable_name, &request.sequences)
            .await?;
        held(&request.subject, &request.durable_name, verdict)
    }

    async fn nack_sequences(&self, request: NackRequest) -> Result<(), Error> {
        consumer_names(&request.subject, &request.durable_name)?;
        sequence_list(&request.sequences)?;
        let verdict = self
            .store
            .nack(
                &request.subject,
                &request.durable_name,
                &request.sequences,
                request.delay_ms,
            )
            .await?;
        held(&request.subject, &request.durable_name, verdict)
    }
}

fn subject_info(state: SubjectState) -> SubjectInfo {
    SubjectInfo {
        subject: state.subject,
        first_sequence: state.first_seq,
        last_sequence: state.last_seq,
        messages: state.count,
        bytes: state.bytes,
        limits: Some(SubjectLimits {
            max_age_ms: state.limits.max_age_ms,
            max_messages: state.limits.max_messages,
            max_bytes: state.limits.max_bytes,
        }),
    }
}

/// Sends a notification whenever the last sequence passes what the
/// subscriber was last told, until the client leaves or the server drains.
async fn push_notifications(
    _open: mts_runtime::metrics::StreamGuard,
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
                let _ = sender.send(Err(draining_status())).await;
                return;
            }
        }
    }
}

#[tonic::async_trait]
impl EgressService for Egress {
    type SubscribeStream = ResponseStream<Notification>;
    type FetchStream = ResponseStream<Message>;
    type ConsumeStream = ResponseStream<Message>;
    type FetchPayloadStream = ResponseStream<PayloadChunk>;

    #[instrument(skip_all, fields(subject = %request.get_ref().subject, durable = %request.get_ref().durable_name))]
    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        self.admit(&request, Permission::Subscribe)?;
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
        self.admit(&request, Permission::Fetch)?;
        let batch = self
            .lease_batch(request.get_ref())
            .await
            .inspect_err(|err| tracing::warn!(%err, "fetch failed"))?;
        tracing::debug!(messages = batch.len(), "fetched");
        let payloads = delivery::Payloads {
            limits: self.payload_limits,
            omit_large: request.get_ref().omit_large_payloads,
        };
        let messages = wire_messages(self.object_store.clone(), batch, payloads).map(|delivered| {
            delivered
                .inspect_err(|err| tracing::warn!(%err, "fetch failed mid-batch"))
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(messages)))
    }

    #[instrument(skip_all, fields(subject = %request.get_ref().subject))]
    async fn get_last_sequence(
        &self,
        request: Request<GetLastSequenceRequest>,
    ) -> Result<Response<GetLastSequenceResponse>, Status> {
        self.admit(&request, Permission::Subscribe)?;
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
        self.admit(&request, Permission::Ack)?;
        let floor = self
            .cumulative_ack(request.into_inner())
            .await
            .inspect_err(|err| tracing::warn!(%err, "ack failed"))?;
        tracing::debug!(floor, "acked");
        Ok(Response::new(AckResponse {
            success: true,
            error_message: String::new(),
        }))
    }

    #[instrument(skip_all, fields(subject = %request.get_ref().subject, durable = %request.get_ref().durable_name))]
    async fn create_or_update_consumer(
        &self,
        request: Request<CreateOrUpdateConsumerRequest>,
    ) -> Result<Response<ConsumerInfo>, Status> {
        self.admit(&request, Permission::Admin)?;
        let info = self
            .put_consumer(request.into_inner())
            .await
            .inspect_err(|err| tracing::warn!(%err, "create or update consumer failed"))?;
        tracing::info!(created = info.created_now, "consumer configured");
        Ok(Response::new(info))
    }

    #[instrument(skip_all, fields(subject = %request.get_ref().subject, durable = %request.get_ref().durable_name))]
    async fn get_consumer_info(
        &self,
        request: Request<ConsumerRequest>,
    ) -> Result<Response<ConsumerInfo>, Status> {
        self.admit(&request, Permission::Subscribe)?;
        let request = request.into_inner();
        let state = async {
            consumer_names(&request.subject, &request.durable_name)?;
            self.consumer_state(&request.subject, &request.durable_name)
                .await
        }
        .await
        .inspect_err(|err| tracing::debug!(%err, "consumer info failed"))?;
        Ok(Response::new(consumer::info(state, false)))
    }

    #[instrument(skip_all, fields(subject = %request.get_ref().subject, durable = %request.get_ref().durable_name))]
    async fn delete_consumer(
        &self,
        request: Request<ConsumerRequest>,
    ) -> Result<Response<DeleteConsumerResponse>, Status> {
        self.admit(&request, Permission::Admin)?;
        let request = request.into_inner();
        let deleted = async {
            consumer_names(&request.subject, &request.durable_name)?;
            Ok::<_, Error>(
                self.store
                    .delete_consumer(&request.subject, &request.durable_name)
                    .await?,
            )
        }
        .await
        .inspect_err(|err| tracing::warn!(%err, "delete consumer failed"))?;
        if !deleted {
            return Err(Error::ConsumerNotFound {
                subject: request.subject,
                durable: request.durable_name,
            }
            .into());
        }
        tracing::info!("consumer deleted");
        Ok(Response::new(DeleteConsumerResponse { deleted }))
    }

    #[instrument(skip_all, fields(subject = %request.get_ref().subject, durable = %request.get_ref().durable_name, count = request.get_ref().sequences.len()))]
    async fn ack(
        &self,
        request: Request<AckSequencesRequest>,
    ) -> Result<Response<AckSequencesResponse>, Status> {
        self.admit(&request, Permission::Ack)?;
        let ack_floor = self
            .ack_sequences(request.into_inner())
            .await
            .inspect_err(|err| tracing::warn!(%err, "ack failed"))?;
        Ok(Response::new(AckSequencesResponse { ack_floor }))
    }

    #[instrument(skip_all, fields(subject = %request.get_ref().subject, durable = %request.get_ref().durable_name, count = request.get_ref().sequences.len()))]
    async fn nack(&self, request: Request<NackRequest>) -> Result<Response<NackResponse>, Status> {
        self.admit(&request, Permission::Ack)?;
        self.nack_sequences(request.into_inner())
            .await
            .inspect_err(|err| tracing::warn!(%err, "nack failed"))?;
        Ok(Response::new(NackResponse {}))
    }

    #[instrument(skip_all, fields(subject = %request.get_ref().subject, sequence = request.get_ref().sequence, offset = request.get_ref().offset))]
    async fn fetch_payload(
        &self,
        request: Request<FetchPayloadRequest>,
    ) -> Result<Response<Self::FetchPayloadStream>, Status> {
        self.admit(&request, Permission::Fetch)?;
        let receiver = crate::payload::open(self, request.into_inner())
            .await
            .inspect_err(|err| tracing::warn!(%err, "fetch payload failed"))?;
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    #[instrument(skip_all, fields(subject = %request.get_ref().subject))]
    async fn set_subject_limits(
        &self,
        request: Request<SetSubjectLimitsRequest>,
    ) -> Result<Response<SubjectInfo>, Status> {
        self.admit(&request, Permission::Admin)?;
        let request = request.into_inner();
        let state = async {
            validate::subject(&request.subject)?;
            let limits = request.limits.unwrap_or_default();
            if let Some(age) = limits.max_age_ms.filter(|age| *age > MAX_RETENTION_AGE_MS) {
                return Err(validate::Error::new(
                    "limits.max_age_ms",
                    format!(
                        "{age} is above the limit of {MAX_RETENTION_AGE_MS} (100 years); 0 keeps messages forever"
                    ),
                )
                .into());
            }
            let limits = Limits {
                max_age_ms: limits.max_age_ms,
                max_messages: limits.max_messages,
                max_bytes: limits.max_bytes,
            };
            self.store.set_subject_limits(&request.subject, limits).await?;
            Ok::<_, Error>(self.store.subject_info(&request.subject).await?)
        }
        .await
        .inspect_err(|err| tracing::warn!(%err, "set subject limits failed"))?;
        tracing::info!(limits = ?state.limits, "subject limits set");
        Ok(Response::new(subject_info(state)))
    }

    #[instrument(skip_all, fields(subject = %request.get_ref().subject))]
    async fn get_subject_info(
        &self,
        request: Request<SubjectRequest>,
    ) -> Result<Response<SubjectInfo>, Status> {
        self.admit(&request, Permission::Subscribe)?;
        let subject = request.into_inner().subject;
        let state = async {
            validate::subject(&subject)?;
            Ok::<_, Error>(self.store.subject_info(&subject).await?)
        }
        .await
        .inspect_err(|err| tracing::warn!(%err, "subject info failed"))?;
        Ok(Response::new(subject_info(state)))
    }

    #[instrument(skip_all)]
    async fn consume(
        &self,
        request: Request<Streaming<ConsumeRequest>>,
    ) -> Result<Response<Self::ConsumeStream>, Status> {
        let caller = self
            .auth
            .authenticate(request.metadata())
            .map_err(Error::from)?;
        let messages = consume::open(self.clone(), caller, request.into_inner())
            .await
            .inspect_err(|err| tracing::warn!(%err, "consume failed"))?;
        Ok(Response::new(Box::pin(messages)))
    }
}
