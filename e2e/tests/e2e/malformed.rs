//! Requests that once ended INTERNAL or were believed when they should not
//! be: undecodable bodies, made-up methods, forged service headers, numbers
//! past what Lua holds as a plain number, times past the store's clock.

use std::collections::HashMap;

use bytes::{Buf, BufMut, Bytes};
use futures::StreamExt;
use mts_proto::pb::publish_frame::Frame;
use mts_proto::pb::{
    ConsumerConfig, CreateOrUpdateConsumerRequest, DeliverPolicy, PublishFrame, PublishHeader,
    PublishRequest, SetSubjectLimitsRequest, SubjectLimits, SubscribeRequest,
};
use mts_testkit as testing;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;

use crate::system::System;

/// Sends bodies as given, whatever they are.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

async fn raw_call(endpoint: String, path: &'static str, body: Bytes) -> tonic::Status {
    let channel = tonic::transport::Endpoint::from_shared(endpoint)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(body),
        PathAndQuery::from_static(path),
        Raw,
    )
    .await
    .expect_err("the call fails")
}

#[tokio::test(flavor = "multi_thread")]
async fn undecodable_requests_are_the_callers_mistake() {
    let system = System::start(testing::config()).await;
    // Field 1 (subject), length 2, bytes that are not UTF-8.
    let bad_utf8 = Bytes::from_static(&[0x0a, 0x02, 0xff, 0xfe]);
    let random = Bytes::from_static(&[0xde, 0xad, 0xbe, 0xef, 0x07, 0x13, 0x99]);
    let cases = [
        (
            system.ingress.endpoint(),
            "/minitoolstream.IngressService/Publish",
            bad_utf8.clone(),
        ),
        (
            system.ingress.endpoint(),
            "/minitoolstream.IngressService/Publish",
            random.clone(),
        ),
        (
            system.egress.endpoint(),
            "/minitoolstream.EgressService/GetLastSequence",
            bad_utf8,
        ),
        (
            system.egress.endpoint(),
            "/minitoolstream.EgressService/SetSubjectLimits",
            random,
        ),
    ];
    for (endpoint, path, body) in cases {
        let status = raw_call(endpoint, path, body).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{path}: {status:?}");
        assert!(
            status.message().contains("could not be decoded"),
            "{status:?}"
        );
    }
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn made_up_methods_share_one_metrics_label() {
    let mut config = testing::config();
    let port = testing::free_port();
    config.server.metrics_port = port;
    let system = System::start_with(config.clone(), testing::config()).await;
    for i in 0..5 {
        let path: &'static str =
            Box::leak(format!("/minitoolstream.IngressService/Nope{i}").into_boxed_str());
        let status = raw_call(system.ingress.endpoint(), path, Bytes::new()).await;
        assert_eq!(status.code(), Code::Unimplemented);
    }
    let status = raw_call(system.ingress.endpoint(), "/no.Such/Thing", Bytes::new()).await;
    assert_eq!(status.code(), Code::Unimplemented);
    let text = testing::scrape_metrics(port).await;
    assert!(
        text.contains(
            r#"minitoolstream_grpc_requests_total{method="unknown",code="UNIMPLEMENTED"} 6"#
        ),
        "{text}"
    );
    assert!(!text.contains("Nope"), "{text}");
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn publishers_cannot_set_the_services_own_headers() {
    let system = System::start(testing::config()).await;
    let mut publisher = system.publisher().await;
    let subject = testing::unique_subject("forged");
    let forged = HashMap::from([("mts-payload-omitted".to_string(), "true".to_string())]);
    let request = PublishRequest {
        subject: subject.clone(),
        data: Bytes::from_static(b"real payload"),
        headers: forged.clone(),
        message_id: String::new(),
        ordering_key: String::new(),
    };
    let check = |status: tonic::Status, rpc: &str| {
        assert_eq!(status.code(), Code::InvalidArgument, "{rpc}: {status:?}");
        assert!(
            status.message().contains("mts-payload-omitted"),
            "{rpc}: {status:?}"
        );
    };
    check(
        publisher.publish(request.clone()).await.unwrap_err(),
        "Publish",
    );

    let mut answers = publisher
        .publish_many(futures::stream::iter([request.clone()]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.next().await.unwrap().unwrap();
    check(
        tonic::Status::new(Code::from(answer.status_code as i32), answer.error_message),
        "PublishMany",
    );

    let frames = [
        PublishFrame {
            frame: Some(Frame::Header(PublishHeader {
                subject: subject.clone(),
                headers: HashMap::from([("MTS-Delivery-Count".to_string(), "1".to_string())]),
                total_size: Some(3),
                message_id: String::new(),
                ordering_key: String::new(),
            })),
        },
        PublishFrame {
            frame: Some(Frame::Chunk(Bytes::from_static(b"abc"))),
        },
    ];
    let status = publisher
        .publish_stream(futures::stream::iter(frames))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("MTS-Delivery-Count"),
        "{status:?}"
    );

    let fetched = system.fetch(&subject, "reader", 10).await;
    assert!(fetched.is_empty(), "nothing was stored: {fetched:?}");
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn large_numbers_and_far_times_get_true_answers() {
    let system = System::start(testing::config()).await;
    let mut subscriber = system.subscriber().await;
    let subject = testing::unique_subject("numbers");
    for start in [100_000_000_000_000u64, 1 << 53, u64::MAX] {
        subscriber
            .subscribe(SubscribeRequest {
                subject: subject.clone(),
                start_sequence: Some(start),
                durable_name: format!("sub{start}"),
            })
            .await
            .unwrap_or_else(|s| panic!("subscribe from {start}: {s:?}"));
        let info = subscriber
            .create_or_update_consumer(CreateOrUpdateConsumerRequest {
                subject: subject.clone(),
                durable_name: format!("con{start}"),
                config: Some(ConsumerConfig {
                    deliver_policy: DeliverPolicy::DeliverByStartSequence.into(),
                    start_sequence: start,
                    ..ConsumerConfig::default()
                }),
            })
            .await
            .unwrap_or_else(|s| panic!("consumer from {start}: {s:?}"))
            .into_inner();
        assert_eq!(info.ack_floor, start - 1);
    }

    let year_9999 = subscriber
        .create_or_update_consumer(CreateOrUpdateConsumerRequest {
            subject: subject.clone(),
            durable_name: "far-future".into(),
            config: Some(ConsumerConfig {
                deliver_policy: DeliverPolicy::DeliverByStartTime.into(),
                start_time: Some(prost_types::Timestamp {
                    seconds: 253_402_300_799,
                    nanos: 0,
                }),
                ..ConsumerConfig::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(year_9999.code(), Code::InvalidArgument, "{year_9999:?}");
    assert!(year_9999.message().contains("after 2554"), "{year_9999:?}");
    assert!(!year_9999.message().contains("after 1970"), "{year_9999:?}");

    for age in [31_536_000_000_000u64, u64::MAX] {
        let refused = subscriber
            .set_subject_limits(SetSubjectLimitsRequest {
                subject: subject.clone(),
                limits: Some(SubjectLimits {
                    max_age_ms: Some(age),
                    ..SubjectLimits::default()
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{age}: {refused:?}");
        assert!(
            refused.message().contains("0 keeps messages forever"),
            "{refused:?}"
        );
    }
    let century = subscriber
        .set_subject_limits(SetSubjectLimitsRequest {
            subject: subject.clone(),
            limits: Some(SubjectLimits {
                max_age_ms: Some(mts_config::MAX_RETENTION_AGE_MS),
                ..SubjectLimits::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        century.limits.unwrap().max_age_ms,
        Some(mts_config::MAX_RETENTION_AGE_MS)
    );
    system.stop().await;
}
