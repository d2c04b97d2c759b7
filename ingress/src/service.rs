//! The Publish RPCs: thin adapters that authenticate, hand the request to
//! the publish paths (unary here, `many` and `stream` for the streaming
//! RPCs) and map failures to status codes.

use mts_proto::pb::ingress_service_server::IngressService;
use mts_proto::pb::{PublishFrame, PublishRequest, PublishResponse};
use mts_runtime::auth::{Caller, Permission};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::instrument;

use crate::Error;
use crate::publish::{Checked, Ingress, detached};
use crate::trace::{trace_context, with_trace};

/// Whose share of the upload slots a streamed publish takes: the token's
/// client, else the caller's address.
fn upload_client(caller: &Caller, peer: Option<std::net::SocketAddr>) -> String {
    match caller {
        Caller::Client(claims) => format!("client {}", claims.client_id),
        Caller::Anonymous => match peer {
            Some(peer) => format!("address {}", peer.ip()),
            None => "anonymous".to_owned(),
        },
    }
}

#[tonic::async_trait]
impl IngressService for Ingress {
    #[instrument(skip_all, fields(subject = %request.get_ref().subject, bytes = request.get_ref().data.len()))]
    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        let caller = self.caller(&request)?;
        caller
            .authorize(Permission::Publish, &request.get_ref().subject)
            .map_err(Error::from)?;
        let started = std::time::Instant::now();
        let trace = trace_context(request.metadata());
        let mut message = request.into_inner();
        with_trace(&mut message.headers, trace);
        let reply = match self.check(message) {
            Ok(Checked::Inline(message)) => self.publish_inline(message).await,
            Ok(Checked::Offloaded(message)) => self.publish_offloaded(message).await,
            Err(err) => Err(err),
        }
        .inspect_err(|err| tracing::warn!(%err, "publish failed"))?;
        tracing::debug!(
            sequence = reply.sequence,
            duplicate = reply.duplicate,
            "published"
        );
        self.count(&reply, started);
        Ok(Response::new(reply))
    }

    type PublishManyStream = ReceiverStream<Result<PublishResponse, Status>>;

    #[instrument(skip_all)]
    async fn publish_many(
        &self,
        request: Request<Streaming<PublishRequest>>,
    ) -> Result<Response<Self::PublishManyStream>, Status> {
        let caller = self.caller(&request)?;
        let trace = trace_context(request.metadata());
        Ok(Response::new(crate::publish::many::serve(
            self.clone(),
            caller,
            trace,
            request.into_inner(),
        )))
    }

    #[instrument(skip_all)]
    async fn publish_stream(
        &self,
        request: Request<Streaming<PublishFrame>>,
    ) -> Result<Response<PublishResponse>, Status> {
        let caller = self.caller(&request)?;
        let client = upload_client(&caller, request.remote_addr());
        let started = std::time::Instant::now();
        let trace = trace_context(request.metadata());
        let ingress = self.clone();
        let frames = request.into_inner();
        let reply = detached(async move {
            crate::publish::stream::publish(&ingress, caller, &client, trace, frames).await
        })
        .await
        .inspect_err(|err| tracing::warn!(%err, "streamed publish failed"))?;
        tracing::info!(
            sequence = reply.sequence,
            bytes = reply.size,
            duplicate = reply.duplicate,
            "streamed publish stored"
        );
        self.count(&reply, started);
        Ok(Response::new(reply))
    }
}
