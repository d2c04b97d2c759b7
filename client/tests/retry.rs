//! Retries against a stand-in ingress that refuses on purpose (an error path
//! the real services cannot be made to take on demand): every try of one
//! publish carries the same message id, and a refusal for good is not tried
//! again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mts_client::{Client, Message, Retry};
use mts_proto::pb::ingress_service_server::{IngressService, IngressServiceServer};
use mts_proto::pb::{PublishFrame, PublishRequest, PublishResponse};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// Answers the first `refusals` publishes with `code`, then stores.
struct Refusing {
    code: tonic::Code,
    refusals: usize,
    seen: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl IngressService for Refusing {
    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        let mut seen = self.seen.lock().unwrap();
        seen.push(request.into_inner().message_id);
        if seen.len() <= self.refusals {
            return Err(Status::new(self.code, "refused by the test"));
        }
        Ok(Response::new(PublishResponse {
            sequence: 7,
            ..PublishResponse::default()
        }))
    }

    async fn publish_stream(
        &self,
        _: Request<Streaming<PublishFrame>>,
    ) -> Result<Response<PublishResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    type PublishManyStream = ReceiverStream<Result<PublishResponse, Status>>;

    async fn publish_many(
        &self,
        _: Request<Streaming<PublishRequest>>,
    ) -> Result<Response<Self::PublishManyStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

async fn refusing(code: tonic::Code, refusals: usize) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::default();
    let service = Refusing {
        code,
        refusals,
        seen: Arc::clone(&seen),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IngressServiceServer::new(service))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (endpoint, seen)
}

/// A client of `endpoint` that tries 5 times, quickly.
async fn quick_client(endpoint: &str) -> Client {
    Client::builder(endpoint, endpoint)
        .retry(Retry {
            attempts: 5,
            first_wait: Duration::from_millis(10),
            max_wait: Duration::from_millis(50),
        })
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn every_try_of_a_publish_carries_one_message_id() {
    let (endpoint, seen) = refusing(tonic::Code::Unavailable, 3).await;
    let client = quick_client(&endpoint).await;
    let published = client.publish(Message::new("s", "x")).await.unwrap();
    assert_eq!((published.sequence, published.attempts), (7, 4));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4);
    assert!(!seen[0].is_empty());
    assert!(
        seen.iter().all(|id| *id == published.message_id),
        "{seen:?}"
    );
}

#[tokio::test]
async fn a_refusal_for_good_is_not_tried_again_and_tries_are_bounded() {
    let (endpoint, seen) = refusing(tonic::Code::InvalidArgument, 1).await;
    let client = quick_client(&endpoint).await;
    let err = client.publish(Message::new("s", "x")).await.unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    assert_eq!(seen.lock().unwrap().len(), 1);

    let (endpoint, seen) = refusing(tonic::Code::Unavailable, 100).await;
    let client = quick_client(&endpoint).await;
    let err = client
        .publish(Message::new("s", "x").message_id("mine"))
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert_eq!(*seen.lock().unwrap(), vec!["mine"; 5]);
}
