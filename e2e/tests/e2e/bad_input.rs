//! Every validation rule, on every RPC it applies to, gives its status code
//! and names the offending field.

use std::collections::HashMap;

use futures::StreamExt;
use mts_proto::pb::{
    AckRequest, FetchRequest, GetLastSequenceRequest, PublishRequest, SubscribeRequest,
};
use mts_testkit as testing;
use tonic::Code;
use tonic_types::StatusExt;

use crate::system::System;

const MAX_PAYLOAD: u64 = 300 * 1024;

fn headers(n: usize, value_len: usize) -> HashMap<String, String> {
    (0..n)
        .map(|i| (format!("h{i}"), "v".repeat(value_len)))
        .collect()
}

/// Subjects that break a rule, with the words the reason must contain.
fn bad_subjects() -> Vec<(String, &'static str)> {
    vec![
        (String::new(), "must not be empty"),
        ("s".repeat(256), "limit is 255"),
        ("has space".into(), "whitespace"),
        ("tab\there".into(), "whitespace"),
        ("new\nline".into(), "whitespace"),
        ("orders.*".into(), "wildcards"),
        ("orders.>".into(), "wildcards"),
        ("caf\u{e9}".into(), "printable ASCII"),
        ("bell\u{7}".into(), "printable ASCII"),
    ]
}

fn bad_durables() -> Vec<(String, &'static str)> {
    vec![
        (String::new(), "must not be empty"),
        ("d".repeat(129), "limit is 128"),
        ("my durable".into(), "whitespace"),
        ("d*".into(), "wildcards"),
    ]
}

fn check(status: tonic::Status, code: Code, field: &str, reason: &str, case: &str) {
    assert_eq!(status.code(), code, "{case}: {status:?}");
    assert!(
        status.message().contains(field),
        "{case}: message {:?} should name {field}",
        status.message()
    );
    assert!(
        status.message().contains(reason),
        "{case}: message {:?} should say {reason}",
        status.message()
    );
    if code == Code::InvalidArgument {
        let details = status.get_error_details();
        let violations = &details
            .bad_request()
            .expect("bad request details")
            .field_violations;
        assert_eq!(violations[0].field, field, "{case}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_rule_maps_to_its_status() {
    let mut config = testing::config();
    config.ingress.max_payload_bytes = MAX_PAYLOAD;
    let system = System::start(config).await;
    let mut publisher = system.publisher().await;
    let mut subscriber = system.subscriber().await;
    let good = testing::unique_subject("bad-input");

    for (subject, reason) in bad_subjects() {
        let case = format!("publish subject {subject:?}");
        let status = publisher
            .publish(PublishRequest {
                message_id: String::new(),
                subject: subject.clone(),
                data: Default::default(),
                headers: HashMap::new(),
                ordering_key: String::new(),
            })
            .await
            .unwrap_err();
        check(status, Code::InvalidArgument, "subject", reason, &case);

        let status = subscriber
            .subscribe(SubscribeRequest {
                subject: subject.clone(),
                start_sequence: None,
                durable_name: "d".into(),
            })
            .await
            .unwrap_err();
        check(
            status,
            Code::InvalidArgument,
            "subject",
            reason,
            &format!("subscribe subject {subject:?}"),
        );

        let status = subscriber
            .fetch(FetchRequest {
                subject: subject.clone(),
                durable_name: "d".into(),
                batch_size: 1,
                omit_large_payloads: false,
            })
            .await
            .unwrap_err();
        check(
            status,
            Code::InvalidArgument,
            "subject",
            reason,
            &format!("fetch subject {subject:?}"),
        );

        let status = subscriber
            .ack_message(AckRequest {
                subject: subject.clone(),
                durable_name: "d".into(),
                sequence: 1,
            })
            .await
            .unwrap_err();
        check(
            status,
            Code::InvalidArgument,
            "subject",
            reason,
            &format!("ack subject {subject:?}"),
        );

        let status = subscriber
            .get_last_sequence(GetLastSequenceRequest {
                subject: subject.clone(),
            })
            .await
            .unwrap_err();
        check(
            status,
            Code::InvalidArgument,
            "subject",
            reason,
            &format!("last subject {subject:?}"),
        );
    }

    for (durable, reason) in bad_durables() {
        let status = subscriber
            .subscribe(SubscribeRequest {
                subject: good.clone(),
                start_sequence: None,
                durable_name: durable.clone(),
            })
            .await
            .unwrap_err();
        check(
            status,
            Code::InvalidArgument,
            "durable_name",
            reason,
            &format!("subscribe durable {durable:?}"),
        );
        let status = subscriber
            .fetch(FetchRequest {
                subject: good.clone(),
                durable_name: durable.clone(),
                batch_size: 1,
                omit_large_payloads: false,
            })
            .await
            .unwrap_err();
        check(
            status,
            Code::InvalidArgument,
            "durable_name",
            reason,
            &format!("fetch durable {durable:?}"),
        );
        let status = subscriber
            .ack_message(AckRequest {
                subject: good.clone(),
                durable_name: durable.clone(),
                sequence: 1,
            })
            .await
            .unwrap_err();
        check(
            status,
            Code::InvalidArgument,
            "durable_name",
            reason,
            &format!("ack durable {durable:?}"),
        );
    }

    let header_cases = [
        (headers(65, 1), "65 headers"),
        (headers(2, 8 * 1024), "bytes of names and values"),
        (
            HashMap::from([(String::new(), "v".to_string())]),
            "header name must not be empty",
        ),
    ];
    for (headers, reason) in header_cases {
        let status = publisher
            .publish(PublishRequest {
                message_id: String::new(),
                subject: good.clone(),
                data: Default::default(),
                headers,
                ordering_key: String::new(),
            })
            .await
            .unwrap_err();
        check(
            status,
            Code::InvalidArgument,
            "headers",
            reason,
            "publish headers",
        );
    }
    // The limits themselves are fine.
    publisher
        .publish(PublishRequest {
            message_id: String::new(),
            subject: good.clone(),
            data: Default::default(),
            headers: headers(64, 200),
            ordering_key: String::new(),
        })
        .await
        .unwrap();
    publisher
        .publish(PublishRequest {
            message_id: String::new(),
            subject: good.clone(),
            data: vec![0u8; MAX_PAYLOAD as usize].into(),
            headers: HashMap::new(),
            ordering_key: String::new(),
        })
        .await
        .unwrap();

    let status = publisher
        .publish(PublishRequest {
            message_id: String::new(),
            subject: good.clone(),
            data: vec![0u8; MAX_PAYLOAD as usize + 1].into(),
            headers: HashMap::new(),
            ordering_key: String::new(),
        })
        .await
        .unwrap_err();
    check(
        status,
        Code::InvalidArgument,
        "data",
        "limit is 307200 bytes",
        "payload too large",
    );

    let status = subscriber
        .fetch(FetchRequest {
            subject: good.clone(),
            durable_name: "d".into(),
            batch_size: 1001,
            omit_large_payloads: false,
        })
        .await
        .unwrap_err();
    check(
        status,
        Code::InvalidArgument,
        "batch_size",
        "limit of 1000",
        "batch too large",
    );
    for batch_size in [-5, 0, 1000] {
        let fetched: Vec<_> = subscriber
            .fetch(FetchRequest {
                subject: good.clone(),
                durable_name: format!("batch{batch_size}"),
                batch_size,
                omit_large_payloads: false,
            })
            .await
            .unwrap()
            .into_inner()
            .collect()
            .await;
        assert_eq!(fetched.len(), 2, "batch_size {batch_size} is accepted");
    }

    let status = subscriber
        .ack_message(AckRequest {
            subject: good.clone(),
            durable_name: "d".into(),
            sequence: 0,
        })
        .await
        .unwrap_err();
    check(
        status,
        Code::InvalidArgument,
        "sequence",
        "at least 1",
        "ack 0",
    );
    let status = subscriber
        .ack_message(AckRequest {
            subject: good.clone(),
            durable_name: "d".into(),
            sequence: 3,
        })
        .await
        .unwrap_err();
    check(
        status,
        Code::FailedPrecondition,
        "sequence 3",
        "last sequence",
        "ack beyond last",
    );
    let never = testing::unique_subject("never");
    let status = subscriber
        .ack_message(AckRequest {
            subject: never.clone(),
            durable_name: "d".into(),
            sequence: 1,
        })
        .await
        .unwrap_err();
    check(
        status,
        Code::FailedPrecondition,
        "sequence 1",
        "is 0",
        "ack on an empty subject",
    );
    let last = subscriber
        .get_last_sequence(GetLastSequenceRequest { subject: never })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(last.last_sequence, 0, "never published is 0, not an error");
    system.stop().await;
}
