//! OpenTelemetry export against the real binaries and an OTLP/gRPC collector
//! run by the test: the publish span continues the caller's trace, the stored
//! `traceparent` is the publish span's, and the egress's delivery span links
//! to it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mts_proto::pb::egress_service_client::EgressServiceClient;
use mts_proto::pb::ingress_service_client::IngressServiceClient;
use mts_proto::pb::{FetchRequest, PublishRequest};
use mts_proto::service_names::{EGRESS, INGRESS};
use mts_testkit as testing;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tokio_stream::wrappers::TcpListenerStream;

use crate::binaries::Process;

#[derive(Debug, Clone)]
struct ExportedSpan {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    /// (trace id, span id) of each link.
    links: Vec<(String, String)>,
}

/// Keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<ExportedSpan>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|resource| &resource.attributes)
                .find(|attribute| attribute.key == "service.name")
                .and_then(
                    |attribute| match attribute.value.as_ref()?.value.as_ref()? {
                        Value::StringValue(name) => Some(name.clone()),
                        _ => None,
                    },
                )
                .unwrap_or_default();
            for span in resource_spans
                .scope_spans
                .into_iter()
                .flat_map(|scope| scope.spans)
            {
                spans.push(ExportedSpan {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex::encode(span.trace_id),
                    span_id: hex::encode(span.span_id),
                    parent_span_id: hex::encode(span.parent_span_id),
                    links: span
                        .links
                        .into_iter()
                        .map(|link| (hex::encode(link.trace_id), hex::encode(link.span_id)))
                        .collect(),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    async fn start() -> (Self, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let collector = Self::default();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener));
        tokio::spawn(server);
        (collector, endpoint)
    }

    fn spans(&self) -> Vec<ExportedSpan> {
        self.0.lock().unwrap().clone()
    }
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN_ID: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread")]
async fn a_delivery_span_links_to_the_publish_span_that_continues_the_callers_trace() {
    let (collector, endpoint) = Collector::start().await;
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let ingress = Process::start_with("ingress", INGRESS, 5, &otel).await;
    let egress = Process::start_with("egress", EGRESS, 5, &otel).await;
    let subject = testing::unique_subject("otlp");

    let mut publish = tonic::Request::new(PublishRequest {
        subject: subject.clone(),
        data: b"traced".to_vec().into(),
        ..Default::default()
    });
    publish.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01")
            .parse()
            .unwrap(),
    );
    IngressServiceClient::connect(format!("http://{}", ingress.addr))
        .await
        .unwrap()
        .publish(publish)
        .await
        .unwrap();

    let mut fetched = EgressServiceClient::connect(format!("http://{}", egress.addr))
        .await
        .unwrap()
        .fetch(FetchRequest {
            subject: subject.clone(),
            durable_name: "traced".into(),
            batch_size: 1,
            omit_large_payloads: false,
        })
        .await
        .unwrap()
        .into_inner();
    let message = fetched
        .message()
        .await
        .unwrap()
        .expect("the published message");
    let stored = message.headers["traceparent"].clone();
    let parts: Vec<&str> = stored.split('-').collect();
    assert_eq!(parts.len(), 4, "{stored}");
    assert_eq!(
        parts[1], TRACE_ID,
        "the stored context left the caller's trace"
    );
    let publish_span_id = parts[2].to_owned();
    assert_ne!(
        publish_span_id, CALLER_SPAN_ID,
        "the caller's context was stored instead of the publish span's"
    );

    testing::eventually("the publish and delivery spans are exported", || {
        let spans = collector.spans();
        let published = spans.iter().any(|span| span.span_id == publish_span_id);
        let delivered = spans.iter().any(|span| {
            span.name == "deliver"
                && span
                    .links
                    .contains(&(TRACE_ID.into(), publish_span_id.clone()))
        });
        async move { published && delivered }
    })
    .await;

    let spans = collector.spans();
    let publish_span = spans
        .iter()
        .find(|span| span.span_id == publish_span_id)
        .unwrap();
    assert_eq!(publish_span.service, "minitoolstream-ingress");
    assert_eq!(publish_span.trace_id, TRACE_ID);
    // The chain from the publish span up ends at the caller's span.
    let mut parent = publish_span.parent_span_id.clone();
    let mut hops = 0;
    while parent != CALLER_SPAN_ID {
        let up = spans
            .iter()
            .find(|span| span.span_id == parent)
            .unwrap_or_else(|| panic!("span {parent} missing or not under the caller: {spans:#?}"));
        assert_eq!(up.service, "minitoolstream-ingress");
        parent = up.parent_span_id.clone();
        hops += 1;
        assert!(hops < 5, "{spans:#?}");
    }
    let delivery = spans.iter().find(|span| span.name == "deliver").unwrap();
    assert_eq!(delivery.service, "minitoolstream-egress");
    assert_ne!(
        delivery.trace_id, TRACE_ID,
        "the fetch was not part of the publish's trace; the delivery only links to it"
    );

    ingress.signal();
    egress.signal();
    assert_eq!(ingress.exit(Duration::from_secs(10)).await.0, Some(0));
    assert_eq!(egress.exit(Duration::from_secs(10)).await.0, Some(0));
}
