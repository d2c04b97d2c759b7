//! `/metrics` on the admin port is scraped and parsed, and the counters move
//! with the calls made.

use std::collections::HashMap;

use mts_proto::pb::PublishRequest;
use mts_shared::testing;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::system::System;

async fn scrape(port: u16) -> String {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response.split("\r\n\r\n").nth(1).unwrap().to_string()
}

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
    config.metrics_port = ingress_metrics;
    let system = System::start_with(config.clone(), {
        let mut egress = config.clone();
        egress.metrics_port = 0;
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

    let values = samples(&scrape(ingress_metrics).await);
    let publish = "/minitoolstream.IngressService/Publish";
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
    system.stop().await;
}
