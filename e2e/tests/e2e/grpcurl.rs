//! The running services driven with the real grpcurl binary, as a person
//! following the README would.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use mts_shared::blob::BlobStore;
use mts_shared::testing;
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
    body: Option<&Value>,
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
        stdin.write_all(body.to_string().as_bytes()).unwrap();
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
        let reply = tokio::task::spawn_blocking(move || {
            grpcurl(
                ingress,
                &[],
                "minitoolstream.IngressService/Publish",
                Some(&body),
            )
        })
        .await
        .unwrap()
        .unwrap();
        let reply: Value = serde_json::from_str(&reply).unwrap();
        assert_eq!(as_u64(&reply["sequence"]), i as u64 + 1, "{reply}");
        object_names.push(reply["objectName"].as_str().unwrap_or("").to_string());
    }
    assert_eq!(object_names[0], "");
    assert_eq!(object_names[1], "");
    assert!(!object_names[2].is_empty(), "1 MiB goes to S3");
    assert!(
        BlobStore::new(&config)
            .exists(&object_names[2])
            .await
            .unwrap()
    );

    let subscribe = json!({"subject": subject, "durable_name": "person"});
    let notifications = tokio::task::spawn_blocking(move || {
        // The stream stays open; -max-time ends grpcurl after the first notification arrived.
        grpcurl(
            egress,
            &["-max-time", "2"],
            "minitoolstream.EgressService/Subscribe",
            Some(&subscribe),
        )
    })
    .await
    .unwrap()
    .unwrap_err();
    let first = json_stream(notifications.split("ERROR").next().unwrap());
    assert_eq!(as_u64(&first[0]["sequence"]), 3, "{notifications}");
    assert_eq!(first[0]["subject"], subject);

    let fetch = json!({"subject": subject, "durable_name": "person", "batch_size": 10});
    let fetched = {
        let fetch = fetch.clone();
        tokio::task::spawn_blocking(move || {
            grpcurl(
                egress,
                &[],
                "minitoolstream.EgressService/Fetch",
                Some(&fetch),
            )
        })
        .await
        .unwrap()
        .unwrap()
    };
    let messages = json_stream(&fetched);
    assert_eq!(messages.len(), 3);
    for (i, message) in messages.iter().enumerate() {
        assert_eq!(as_u64(&message["sequence"]), i as u64 + 1);
        let data = unb64(message["data"].as_str().unwrap_or(""));
        assert_eq!(sha256(&data), sha256(&payloads[i]), "payload {i}");
        assert_eq!(message["headers"]["index"], i.to_string());
        assert!(message["timestamp"].is_string(), "{message}");
    }

    let ack = json!({"subject": subject, "durable_name": "person", "sequence": 2});
    let acked = tokio::task::spawn_blocking(move || {
        grpcurl(
            egress,
            &[],
            "minitoolstream.EgressService/AckMessage",
            Some(&ack),
        )
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&acked).unwrap()["success"],
        true
    );
    let after_ack = tokio::task::spawn_blocking(move || {
        grpcurl(
            egress,
            &[],
            "minitoolstream.EgressService/Fetch",
            Some(&fetch),
        )
    })
    .await
    .unwrap()
    .unwrap();
    let remaining = json_stream(&after_ack);
    assert_eq!(remaining.len(), 1);
    assert_eq!(as_u64(&remaining[0]["sequence"]), 3);

    let last = json!({"subject": subject});
    let last = tokio::task::spawn_blocking(move || {
        grpcurl(
            egress,
            &[],
            "minitoolstream.EgressService/GetLastSequence",
            Some(&last),
        )
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        as_u64(&serde_json::from_str::<Value>(&last).unwrap()["lastSequence"]),
        3
    );

    for (addr, service) in [
        (ingress, "minitoolstream.IngressService"),
        (egress, "minitoolstream.EgressService"),
    ] {
        let body = json!({"service": service});
        let health = tokio::task::spawn_blocking(move || {
            grpcurl(addr, &[], "grpc.health.v1.Health/Check", Some(&body))
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&health).unwrap()["status"],
            "SERVING"
        );
    }

    let bad = json!({"subject": "has space", "data": ""});
    let refused = tokio::task::spawn_blocking(move || {
        grpcurl(
            ingress,
            &[],
            "minitoolstream.IngressService/Publish",
            Some(&bad),
        )
    })
    .await
    .unwrap()
    .unwrap_err();
    assert!(refused.contains("InvalidArgument"), "{refused}");
    assert!(refused.contains("whitespace at byte 3"), "{refused}");
    assert!(
        refused
            .contains(r#"{"field":"subject","description":"whitespace at byte 3 is not allowed"}"#),
        "the BadRequest detail is readable: {refused}"
    );
    system.stop().await;
}
