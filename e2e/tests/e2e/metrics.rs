//! `/metrics` on the admin port is scraped and parsed, and the counters move
//! with the calls made.

use std::collections::HashMap;

use mts_proto::pb::PublishRequest;
use mts_testkit as testing;

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
    config.server.metrics_port = ingress_metrics;
    let system = System::start_with(config.clone(), {
        let mut egress = config.clone();
        egress.server.metrics_port = egress_metrics;
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
                ordering_key: String::new(),
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
            ordering_key: String::new(),
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
        values[r#"minitoolstream_dependency_call_duration_seconds_count{dependency="tarantool",operation="mts_publish_batch"}"#],
        3.0
    );
    // One after another: three group commits of one message each.
    assert_eq!(values["minitoolstream_group_commit_messages_count"], 3.0);
    assert_eq!(values["minitoolstream_group_commit_messages_sum"], 3.0);

    // An offloaded publish: its bytes, and one S3 upload.
    publisher
        .publish(PublishRequest {
            subject: subject.clone(),
            data: vec![0u8; 300 * 1024].into(),
            headers: HashMap::new(),
            message_id: String::new(),
            ordering_key: String::new(),
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
            omit_large_payloads: false,
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

/// The sample names a scrape's metric families allow: `# TYPE` lines name
/// every family, with or without series yet.
fn exported_sample_names(scrape: &str) -> std::collections::HashSet<String> {
    let mut names = std::collections::HashSet::new();
    for line in scrape.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(family), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_count", "_sum", "_created"],
            _ => &[""],
        };
        for suffix in suffixes {
            names.insert(format!("{family}{suffix}"));
        }
    }
    names
}

/// `minitoolstream_…` metric names used in `text`.
fn referenced_metrics(text: &str) -> std::collections::BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut found = std::collections::BTreeSet::new();
    let mut at = 0;
    while let Some(offset) = text[at..].find("minitoolstream_") {
        let start = at + offset;
        let preceded =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |n| start + n);
        if !preceded {
            found.insert(text[start..end].to_owned());
        }
        at = end;
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn alerts_and_dashboard_use_only_exported_metrics() {
    // A family shows in a scrape once it has a series, so every kind of
    // event is made to happen. Its own Tarantool, so that this egress holds
    // the maintenance lease that exports consumer lag.
    let mut tarantool = testing::TarantoolProcess::start();
    let mut config = tarantool.config();
    config.egress.maintenance_interval_ms = 100;
    config.tarantool.timeout_ms = 1000;
    let (ingress_metrics, egress_metrics) = (testing::free_port(), testing::free_port());
    config.server.metrics_port = ingress_metrics;
    let system = System::start_with(config.clone(), {
        let mut egress = config.clone();
        egress.server.metrics_port = egress_metrics;
        egress
    })
    .await;
    let subject = testing::unique_subject("families");
    let mut publisher = system.publisher().await;
    for size in [10, config.ingress.inline_threshold_bytes as usize + 1] {
        publisher
            .publish(PublishRequest {
                subject: subject.clone(),
                data: vec![1u8; size].into(),
                headers: HashMap::new(),
                message_id: String::new(),
                ordering_key: String::new(),
            })
            .await
            .unwrap();
    }
    // Deliveries, an open stream, a pending backlog and an unacked lease.
    let delivered = system.fetch(&subject, "lagging", 1).await;
    assert_eq!(delivered.len(), 1);
    let mut subscriber = system.subscriber().await;
    let stream = subscriber
        .subscribe(mts_proto::pb::SubscribeRequest {
            subject: subject.clone(),
            start_sequence: None,
            durable_name: "watching".into(),
        })
        .await
        .unwrap();
    // A dependency error: a publish while Tarantool is down.
    tarantool.kill();
    let refused = publisher
        .publish(PublishRequest {
            subject: subject.clone(),
            data: b"x".to_vec().into(),
            headers: HashMap::new(),
            message_id: String::new(),
            ordering_key: String::new(),
        })
        .await
        .unwrap_err();
    // Tarantool cannot be asked whether the commit happened: unknown, not "not stored".
    assert_eq!(refused.code(), tonic::Code::DeadlineExceeded, "{refused:?}");
    assert!(refused.message().contains("outcome unknown"), "{refused:?}");
    tarantool.restart();

    let exported = || async {
        let mut names = exported_sample_names(&testing::scrape_metrics(ingress_metrics).await);
        names.extend(exported_sample_names(
            &testing::scrape_metrics(egress_metrics).await,
        ));
        names
    };
    testing::eventually("consumer lag is exported", || async {
        exported()
            .await
            .contains("minitoolstream_consumer_oldest_unacked_age_seconds")
    })
    .await;
    let exported = exported().await;

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for file in [
        "k8s/overlays/prod/prometheusrule.yaml",
        "k8s/overlays/prod/dashboards/minitoolstream.json",
        "monitoring/alerts.test.yaml",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let used = referenced_metrics(&text);
        assert!(used.len() >= 5, "{file} uses {used:?}");
        let unknown: Vec<_> = used
            .iter()
            .filter(|name| !exported.contains(*name))
            .collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics the services do not export: {unknown:?}"
        );
    }
    drop(stream);
    system.stop().await;
}

#[test]
fn metric_references_are_found_whole() {
    let used = referenced_metrics(
        "rate(minitoolstream_a_total[5m]) / my_minitoolstream_b + minitoolstream_c",
    );
    assert_eq!(
        used.into_iter().collect::<Vec<_>>(),
        ["minitoolstream_a_total", "minitoolstream_c"]
    );
}
