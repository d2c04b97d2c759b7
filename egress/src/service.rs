//! The egress RPCs: thin adapters that authenticate, call the handler of
//! their RPC family (`subscribe`, `fetch`, `acks`, `admin`, `consume`,
//! `payload`) and map its error to a status.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use mts_proto::pb::egress_service_server::EgressService;
use mts_proto::pb::{
    AckRequest, AckResponse, AckSequencesRequest, AckSequencesResponse, ConsumeRequest,
    ConsumerInfo, ConsumerRequest, CreateOrUpdateConsumerRequest, DeleteConsumerResponse,
    ExtendLeaseRequest, ExtendLeaseResponse, FetchRequest, GetLastSequenceRequest,
    GetLastSequenceResponse, Message, NackRequest, NackResponse, Notification, RejectRequest,
    RejectResponse, SeekConsumerRequest, SubscribeRequest,
};
use mts_proto::pb::{
    DeleteSubjectResponse, FetchPayloadRequest, ListConsumersRequest, ListConsumersResponse,
    ListSubjectsRequest, ListSubjectsResponse, PayloadChunk, PurgeSubjectRequest,
    PurgeSubjectResponse, SetSubjectLimitsRequest, SubjectInfo, SubjectRequest,
};
use mts_runtime::auth::Permission;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::instrument;

use crate::handlers::Egress;
use crate::handlers::{consume, payload};
use crate::rules::consumer_names;
use crate::wire::subject_info;
use crate::{Error, wire};

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
    ExtendLeaseRequest,
    RejectRequest,
    SeekConsumerRequest,
    FetchPayloadRequest,
    SetSubjectLimitsRequest,
    SubjectRequest,
    PurgeSubjectRequest,
);

impl Egress {
    /// Authenticates the caller and checks `permission` on the request's subject.
    fn admit<T: Touches>(&self, request: &Request<T>, permission: Permission) -> Result<(), Error> {
        let caller = self.authenticate(request.metadata())?;
        caller.authorize(permission, request.get_ref().subject())?;
        Ok(())
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
        let messages = self
            .fetched(batch, request.get_ref().omit_large_payloads)
            .map(|delivered| {
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
        let last = self
            .last_sequence(&subject)
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
        Ok(Response::new(wire::consumer_info(state, false)))
    }

    #[instrument(skip_all, fields(subject = %request.get_ref().subject, durable = %request.get_ref().durable_name))]
    async fn seek_consumer(
        &self,
        request: Request<SeekConsumerRequest>,
    ) -> Result<Response<ConsumerInfo>, Status> {
        self.admit(&request, Permission::Admin)?;
        let info = self
            .seek(request.into_inner())
            .await
            .inspect_err(|err| tracing::warn!(%err, "seek failed"))?;
        Ok(Response::new(info))
    }

    #[instrument(skip_all, fields(subject = %request.get_ref().subject, durable = %request.get_ref().durable_name))]
    async fn delete_consumer(
        &self,
        request: Request<ConsumerRequest>,
    ) -> Result<Response<DeleteConsumerResponse>, Status> {
        self.admit(&request, Permission::Admin)?;
        let request = request.into_inner();
        let deleted = self
            .delete(&request.subject, &request.durable_name)
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

    #[instrument(skip_all, fields(subject = %request.get_ref().subject, durable = %request.get_ref().durable_name, count = request.get_ref().sequences.len()))]
    async fn extend_lease(
        &self,
        request: Request<ExtendLeaseRequest>,
    ) -> Result<Response<ExtendLeaseResponse>, Status> {
        self.admit(&request, Permission::Ack)?;
        let deadline_ns = self
            .extend_leases(request.into_inner())
            .await
            .inspect_err(|err| tracing::warn!(%err, "lease extension failed"))?;
        Ok(Response::new(ExtendLeaseResponse {
            deadline: Some(crate::wire::timestamp(deadline_ns)),
        }))
    }

    #[instrument(skip_all, fields(subject = %request.get_ref().subject, durable = %request.get_ref().durable_name, count = request.get_ref().sequences.len()))]
    async fn reject(
        &self,
        request: Request<RejectRequest>,
    ) -> Result<Response<RejectResponse>, Status> {
        self.admit(&request, Permission::Ack)?;
        let ack_floor = self
            .reject(request.into_inner())
            .await
            .inspect_err(|err| tracing::warn!(%err, "rejection failed"))?;
        Ok(Response::new(RejectResponse { ack_floor }))
    }

    #[instrument(skip_all, fields(subject = %request.get_ref().subject, sequence = request.get_ref().sequence, offset = request.get_ref().offset))]
    async fn fetch_payload(
        &self,
        request: Request<FetchPayloadRequest>,
    ) -> Result<Response<Self::FetchPayloadStream>, Status> {
        self.admit(&request, Permission::Fetch)?;
        let receiver = payload::open(self, request.into_inner())
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
        let state = self
            .set_limits(request)
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
        let state = self
            .subject_state(&subject)
            .await
            .inspect_err(|err| tracing::warn!(%err, "subject info failed"))?;
        Ok(Response::new(subject_info(state)))
    }

    #[instrument(skip_all, fields(prefix = %request.get_ref().prefix))]
    async fn list_subjects(
        &self,
        request: Request<ListSubjectsRequest>,
    ) -> Result<Response<ListSubjectsResponse>, Status> {
        let caller = self.authenticate(request.metadata())?;
        caller.permits(Permission::Admin).map_err(Error::from)?;
        let page = self
            .list_subjects(&caller, request.into_inner())
            .await
            .inspect_err(|err| tracing::warn!(%err, "listing subjects failed"))?;
        Ok(Response::new(page))
    }

    #[instrument(skip_all, fields(subject = %request.get_ref().subject))]
    async fn list_consumers(
        &self,
        request: Request<ListConsumersRequest>,
    ) -> Result<Response<ListConsumersResponse>, Status> {
        let caller = self.authenticate(request.metadata())?;
        caller.permits(Permission::Admin).map_err(Error::from)?;
        let page = self
            .list_consumers(&caller, request.into_inner())
            .await
            .inspect_err(|err| tracing::warn!(%err, "listing consumers failed"))?;
        Ok(Response::new(page))
    }

    #[instrument(skip_all, fields(subject = %request.get_ref().subject))]
    async fn purge_subject(
        &self,
        request: Request<PurgeSubjectRequest>,
    ) -> Result<Response<PurgeSubjectResponse>, Status> {
        self.admit(&request, Permission::Admin)?;
        let purged = self
            .purge(request.into_inner())
            .await
            .inspect_err(|err| tracing::warn!(%err, "purge failed"))?;
        Ok(Response::new(purged))
    }

    #[instrument(skip_all, fields(subject = %request.get_ref().subject))]
    async fn delete_subject(
        &self,
        request: Request<SubjectRequest>,
    ) -> Result<Response<DeleteSubjectResponse>, Status> {
        self.admit(&request, Permission::Admin)?;
        let deleted = self
            .delete_subject(&request.into_inner().subject)
            .await
            .inspect_err(|err| tracing::warn!(%err, "delete subject failed"))?;
        Ok(Response::new(deleted))
    }

    #[instrument(skip_all)]
    async fn consume(
        &self,
        request: Request<Streaming<ConsumeRequest>>,
    ) -> Result<Response<Self::ConsumeStream>, Status> {
        let caller = self.authenticate(request.metadata())?;
        let messages = consume::open(self.clone(), caller, request.into_inner())
            .await
            .inspect_err(|err| tracing::warn!(%err, "consume failed"))?;
        Ok(Response::new(Box::pin(messages)))
    }
}
