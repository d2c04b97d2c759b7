//! The running services driven with the real grpcurl binary, as a person
//! following the README would.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use mts_storage::object_store::ObjectStore;
use mts_testkit as testing;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::system::System;

fn grpcurl_path() -> String {
    std::env::var("GRPCURL").unwrap_or_else(|_| "grpcurl".into())
}

/// Runs grpcurl with `body` on stdin; returns stdout, and stderr when it fails.
fn grpcurl(
    addr: SocketAddr,
    extra: &[&str],
    method: &str,
    body: Option<&str>,
) -> Result<String, String> {
    let mut command = Command::new(grpcurl_path());
    command.arg("-plaintext").args(extra);
    if body.is_some() {
        command.args(["-d", "@"]);
    }
    command.arg(addr.to_string());
    if !method.is_empty() {
        command.arg(method);
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run grpcurl ({}): {e}", grpcurl_path()));
    let mut stdin = child.stdin.take().unwrap();
    if let Some(body) = body {
        stdin.write_all(body.as_bytes()).unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// grpcurl prints a stream as concatenated JSON objects.
fn json_stream(text: &str) -> Vec<Value> {
    serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .map(|v| v.unwrap())
        .collect()
}

fn b64(data: &[u8]) -> String {
    BASE64.encode(data)
}

fn unb64(text: &str) -> Vec<u8> {
    BASE64.decode(text).expect("base64 from grpcurl")
}

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn as_u64(value: &Value) -> u64 {
    // protobuf JSON writes 64-bit integers as strings.
    match value {
        Value::String(s) => s.parse().unwrap(),
        Value::Number(n) => n.as_u64().unwrap(),
        Value::Null => 0,
        other => panic!("not an integer: {other}"),
    }
}

/// `grpcurl` off the async runtime.
async fn call(
    addr: SocketAddr,
    extra: &'static [&'static str],
    method: &'static str,
    body: Value,
) -> Result<String, String> {
    call_with_text(addr, extra, method, body.to_string()).await
}

/// `call` with a body of several JSON objects: a client stream.
async fn call_with_text(
    addr: SocketAddr,
    extra: &'static [&'static str],
    method: &'static str,
    body: String,
) -> Result<String, String> {
    tokio::task::spawn_blocking(move || grpcurl(addr, extra, method, Some(&body)))
        .await
        .unwrap()
}

/// A unary call that must succeed, parsed.
async fn ok(addr: SocketAddr, method: &'static str, body: Value) -> Value {
    let text = call(addr, &[], method, body)
        .await
        .unwrap_or_else(|e| panic!("{method}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method}: {e}: {text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_person_with_grpcurl_can_do_everything() {
    let config = testing::config();
    let system = System::start(config.clone()).await;
    let (ingress, egress) = (system.ingress.addr, system.egress.addr);
    let subject = testing::unique_subject("grpcurl");

    let listing = tokio::task::spawn_blocking(move || {
        (
            grpcurl(ingress, &[], "list", None),
            grpcurl(egress, &[], "list", None),
        )
    })
    .await
    .unwrap();
    let (ingress_list, egress_list) = (listing.0.unwrap(), listing.1.unwrap());
    assert!(
        ingress_list.contains("minitoolstream.IngressService"),
        "{ingress_list}"
    );
    assert!(
        egress_list.contains("minitoolstream.EgressService"),
        "{egress_list}"
    );
    assert!(
        ingress_list.contains("grpc.health.v1.Health"),
        "{ingress_list}"
    );

    let payloads: Vec<Vec<u8>> = vec![
        Vec::new(),
        (0..1024u32).map(|i| (i * 7 % 256) as u8).collect(),
        (0..1024 * 1024u32).map(|i| (i * 13 % 251) as u8).collect(),
    ];
    let mut object_names = Vec::new();
    for (i, payload) in payloads.iter().enumerate() {
        let body =
            json!({"subject": subject, "data": b64(payload), "headers": {"index": i.to_string()}});
        // The first publish carries a W3C trace context, which consumers get back.
        let traced: &'static [&'static str] = &[
            "-H",
            "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ];
        let extra: &'static [&'static str] = if i == 0 { traced } else { &[] };
        let reply: Value = serde_json::from_str(
            &call(
                ingress,
                extra,
                "minitoolstream.IngressService/Publish",
                body,
            )
            .await
            .unwrap(),
        )
        .unwrap();
        assert_eq!(as_u64(&reply["sequence"]), i as u64 + 1, "{reply}");
        object_names.push(reply["objectName"].as_str().unwrap_or("").to_string());
    }
    assert_eq!(object_names[0], "");
    assert_eq!(object_names[1], "");
    assert!(!object_names[2].is_empty(), "1 MiB goes to S3");
    assert!(
        ObjectStore::new(&config)
            .exists(&object_names[2])
            .await
            .unwrap()
    );

    // The stream stays open; -max-time ends grpcurl after the first notification arrived.
    let subscribe = json!({"subject": subject, "durable_name": "person"});
    let notifications = call(
        egress,
        &["-max-time", "2"],
        "minitoolstream.EgressService/Subscribe",
        subscribe,
    )
    .await
    .unwrap_err();
    let first = json_stream(notifications.split("ERROR").next().unwrap());
    assert_eq!(as_u64(&first[0]["sequence"]), 3, "{notifications}");
    assert_eq!(first[0]["subject"], subject);

    let fetch = json!({"subject": subject, "durable_name": "person", "batch_size": 10});
    let fetched = call(
        egress,
        &[],
        "minitoolstream.EgressService/Fetch",
        fetch.clone(),
    )
    .await
    .unwrap();
    let messages = json_stream(&fetched);
    assert_eq!(messages.len(), 3);
    for (i, message) in messages.iter().enumerate() {
        assert_eq!(as_u64(&message["sequence"]), i as u64 + 1);
        let data = unb64(message["data"].as_str().unwrap_or(""));
        assert_eq!(sha256(&data), sha256(&payloads[i]), "payload {i}");
        assert_eq!(message["headers"]["index"], i.to_string());
        assert_eq!(message["deliveryCount"], 1);
        let traceparent = &message["headers"]["traceparent"];
        if i == 0 {
            assert_eq!(
                traceparent,
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            );
        } else {
            assert!(traceparent.is_null(), "{message}");
        }
        assert!(message["timestamp"].is_string(), "{message}");
    }

    let acked = ok(
        egress,
        "minitoolstream.EgressService/AckMessage",
        json!({"subject": subject, "durable_name": "person", "sequence": 2}),
    )
    .await;
    assert_eq!(acked["success"], true);
    // Sequence 3 is still leased to "person": nothing to fetch until it is nacked.
    assert!(
        json_stream(
            &call(
                egress,
                &[],
                "minitoolstream.EgressService/Fetch",
                fetch.clone()
            )
            .await
            .unwrap()
        )
        .is_empty()
    );
    ok(
        egress,
        "minitoolstream.EgressService/Nack",
        json!({"subject": subject, "durable_name": "person", "sequences": [3]}),
    )
    .await;
    let again = json_stream(
        &call(egress, &[], "minitoolstream.EgressService/Fetch", fetch)
            .await
            .unwrap(),
    );
    assert_eq!(again.len(), 1);
    assert_eq!(as_u64(&again[0]["sequence"]), 3);
    assert_eq!(again[0]["deliveryCount"], 2, "redelivered");
    let floor = ok(
        egress,
        "minitoolstream.EgressService/Ack",
        json!({"subject": subject, "durable_name": "person", "sequences": [3]}),
    )
    .await;
    assert_eq!(as_u64(&floor["ackFloor"]), 3);
    let info = ok(
        egress,
        "minitoolstream.EgressService/GetConsumerInfo",
        json!({"subject": subject, "durable_name": "person"}),
    )
    .await;
    assert_eq!(as_u64(&info["ackFloor"]), 3, "{info}");
    assert_eq!(as_u64(&info["numAckPending"]), 0, "{info}");

    let last = ok(
        egress,
        "minitoolstream.EgressService/GetLastSequence",
        json!({"subject": subject}),
    )
    .await;
    assert_eq!(as_u64(&last["lastSequence"]), 3);

    for (addr, service) in [
        (ingress, "minitoolstream.IngressService"),
        (egress, "minitoolstream.EgressService"),
    ] {
        let health = ok(
            addr,
            "grpc.health.v1.Health/Check",
            json!({"service": service}),
        )
        .await;
        assert_eq!(health["status"], "SERVING");
    }

    let refused = call(
        ingress,
        &[],
        "minitoolstream.IngressService/Publish",
        json!({"subject": "has space", "data": ""}),
    )
    .await
    .unwrap_err();
    assert!(refused.contains("InvalidArgument"), "{refused}");
    assert!(refused.contains("whitespace at byte 3"), "{refused}");
    assert!(
        refused
            .contains(r#"{"field":"subject","description":"whitespace at byte 3 is not allowed"}"#),
        "the BadRequest detail is readable: {refused}"
    );

    // PublishMany: one JSON object per message in, one answer per message out.
    let many = [
        json!({"subject": subject, "data": b64(b"one")}),
        json!({"subject": "has space", "data": b64(b"two")}),
        json!({"subject": subject, "data": b64(b"three")}),
    ]
    .map(|message| message.to_string())
    .join("\n");
    let answers = json_stream(
        &call_with_text(
            ingress,
            &[],
            "minitoolstream.IngressService/PublishMany",
            many,
        )
        .await
        .unwrap(),
    );
    assert_eq!(answers.len(), 3, "{answers:?}");
    let last = as_u64(&answers[0]["sequence"]);
    assert!(last > 3, "after the earlier publishes: {answers:?}");
    assert_eq!(
        answers[1]["statusCode"], "3",
        "INVALID_ARGUMENT: {answers:?}"
    );
    assert!(
        answers[1]["errorMessage"]
            .as_str()
            .unwrap()
            .contains("whitespace at byte 3"),
        "{answers:?}"
    );
    assert_eq!(as_u64(&answers[2]["sequence"]), last + 1, "{answers:?}");
    system.stop().await;
}
