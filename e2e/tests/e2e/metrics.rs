//! `/metrics` on the admin port is scraped and parsed, and the counters move
//! with the calls made.

use std::collections::HashMap;

use mts_proto::pb::PublishRequest;
use mts_shared::testing;

use crate::system::System;

/// `name{labels} value` lines, keyed by everything before the value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn counters_move_with_the_calls() {
    let mut config = testing::config();
    let ingress_metrics = testing::free_port();
    let egress_metrics = testing::free_port();
    config.metrics_port = ingress_metrics;
    let system = System::start_with(config.clone(), {
        let mut egress = config.clone();
        egress.metrics_port = egress_metrics;
        egress
    })
    .await;
    let mut publisher = system.publisher().await;
    let subject = testing::unique_subject("metrics");
    for _ in 0..3 {
        publisher
            .publish(PublishRequest {
                message_id: String::new(),
                subject: subject.clone(),
                data: b"x".to_vec().into(),
                headers: HashMap::new(),
            })
            .await
            .unwrap();
    }
    publisher
        .publish(PublishRequest {
            message_id: String::new(),
            subject: "bad subject".into(),
            data: Default::default(),
            headers: HashMap::new(),
        })
        .await
        .unwrap_err();

    let publish = "/minitoolstream.IngressService/Publish";
    // A call is counted once the server is done with its reply, a moment
    // after the client has it.
    testing::eventually("four publishes are counted", || async {
        let values = samples(&testing::scrape_metrics(ingress_metrics).await);
        values
            .iter()
            .filter(|(series, _)| {
                series.starts_with(&format!(
                    r#"minitoolstream_grpc_requests_total{{method="{publish}""#
                ))
            })
            .map(|(_, value)| value)
            .sum::<f64>()
            == 4.0
    })
    .await;
    let values = samples(&testing::scrape_metrics(ingress_metrics).await);
    assert_eq!(
        values[&format!(r#"minitoolstream_grpc_requests_total{{method="{publish}",code="OK"}}"#)],
        3.0
    );
    assert_eq!(
        values[&format!(
            r#"minitoolstream_grpc_requests_total{{method="{publish}",code="INVALID_ARGUMENT"}}"#
        )],
        1.0
    );
    assert_eq!(
        values[&format!(
            r#"minitoolstream_grpc_request_duration_seconds_count{{method="{publish}"}}"#
        )],
        4.0
    );
    assert_eq!(
        values[r#"minitoolstream_dependency_up{dependency="tarantool"}"#],
        1.0
    );
    assert_eq!(
        values[r#"minitoolstream_dependency_up{dependency="s3"}"#],
        1.0
    );
    assert_eq!(
        values[r#"minitoolstream_publish_bytes_total{storage="inline"}"#],
        3.0
    );
    assert_eq!(
        values[r#"minitoolstream_dependency_call_duration_seconds_count{dependency="tarantool",operation="mts_publish"}"#],
        3.0
    );

    // An offloaded publish: its bytes, and one S3 upload.
    publisher
        .publish(PublishRequest {
            subject: subject.clone(),
            data: vec![0u8; 300 * 1024].into(),
            headers: HashMap::new(),
            message_id: String::new(),
        })
        .await
        .unwrap();
    let values = samples(&testing::scrape_metrics(ingress_metrics).await);
    assert_eq!(
        values[r#"minitoolstream_publish_bytes_total{storage="offloaded"}"#],
        307_200.0
    );
    assert_eq!(
        values[r#"minitoolstream_dependency_call_duration_seconds_count{dependency="s3",operation="PutObject"}"#],
        1.0
    );

    // Egress: an open stream, and four deliveries.
    let mut subscriber = system.subscriber().await;
    let stream = subscriber
        .subscribe(mts_proto::pb::SubscribeRequest {
            subject: subject.clone(),
            start_sequence: None,
            durable_name: "m".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let fetched = subscriber
        .fetch(mts_proto::pb::FetchRequest {
            subject: subject.clone(),
            durable_name: "m".into(),
            batch_size: 10,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(futures::StreamExt::count(fetched).await, 4);
    let values = samples(&testing::scrape_metrics(egress_metrics).await);
    assert_eq!(
        values[r#"minitoolstream_active_streams{kind="subscribe"}"#],
        1.0
    );
    assert_eq!(values["minitoolstream_deliveries_total"], 4.0);
    assert_eq!(values["minitoolstream_redeliveries_total"], 0.0);
    // Streams are counted by how they ended: the fetch in its OK trailers,
    // the subscription as CANCELLED once the client walks away.
    drop(stream);
    let subscribe = "/minitoolstream.EgressService/Subscribe";
    let fetch = "/minitoolstream.EgressService/Fetch";
    testing::eventually("the ended streams are counted", || async {
        let values = samples(&testing::scrape_metrics(egress_metrics).await);
        let count = |method: &str, code: &str| {
            values
                .get(&format!(
                    r#"minitoolstream_grpc_requests_total{{method="{method}",code="{code}"}}"#
                ))
                .copied()
        };
        count(subscribe, "CANCELLED") == Some(1.0)
            && count(subscribe, "OK").is_none()
            && count(fetch, "OK") == Some(1.0)
    })
    .await;
    system.stop().await;
}
