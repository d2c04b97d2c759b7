//! Authentication and per-subject authorization on every RPC: the matrix of
//! RPC × token kind, the subject wildcard forms, optional auth and RS256.

use std::time::{SystemTime, UNIX_EPOCH};

use futures::stream;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mts_config::Config;
use mts_proto::pb::consume_request::Request as ConsumeFrame;
use mts_proto::pb::publish_frame::Frame;
use mts_proto::pb::*;
use mts_testkit as testing;
use serde_json::{Value, json};
use tonic::{Code, Request};

use crate::system::System;

const SECRET: &str = "auth-matrix-secret";
const ISSUER: &str = "mts-test";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(permissions: &[&str], subjects: &[&str]) -> Value {
    json!({"client_id": "tester", "permissions": permissions, "allowed_subjects": subjects, "iss": ISSUER, "exp": now() + 600})
}

fn hs256(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn auth_config(require: bool) -> Config {
    let mut config = testing::config();
    config.auth.enabled = true;
    config.auth.require_auth = require;
    config.auth.jwt_secret = SECRET.into();
    config.auth.jwt_issuer = ISSUER.into();
    config
}

#[derive(Clone, Copy, Debug)]
enum Rpc {
    Publish,
    PublishStream,
    PublishMany,
    Subscribe,
    Fetch,
    GetLastSequence,
    AckMessage,
    CreateOrUpdateConsumer,
    GetConsumerInfo,
    DeleteConsumer,
    Ack,
    Nack,
    Consume,
    FetchPayload,
    SetSubjectLimits,
    GetSubjectInfo,
    SeekConsumer,
    ExtendLease,
    Reject,
    PurgeSubject,
    DeleteSubject,
}

/// Every RPC that names a subject; the purge and the deletion last, as
/// they empty it. (The listings are checked on their own: they show only
/// what a token allows.)
const EVERY_RPC: [Rpc; 21] = [
    Rpc::Publish,
    Rpc::PublishStream,
    Rpc::PublishMany,
    Rpc::Subscribe,
    Rpc::Fetch,
    Rpc::GetLastSequence,
    Rpc::AckMessage,
    Rpc::CreateOrUpdateConsumer,
    Rpc::GetConsumerInfo,
    Rpc::DeleteConsumer,
    Rpc::Ack,
    Rpc::Nack,
    Rpc::Consume,
    Rpc::FetchPayload,
    Rpc::SetSubjectLimits,
    Rpc::GetSubjectInfo,
    Rpc::SeekConsumer,
    Rpc::ExtendLease,
    Rpc::Reject,
    Rpc::PurgeSubject,
    Rpc::DeleteSubject,
];

/// The permission an RPC needs (Consume needs fetch and ack; fetch is tested).
fn needs(rpc: Rpc) -> &'static str {
    match rpc {
        Rpc::Publish | Rpc::PublishStream | Rpc::PublishMany => "publish",
        Rpc::Subscribe | Rpc::GetLastSequence | Rpc::GetConsumerInfo | Rpc::GetSubjectInfo => {
            "subscribe"
        }
        Rpc::Fetch | Rpc::Consume | Rpc::FetchPayload => "fetch",
        Rpc::AckMessage | Rpc::Ack | Rpc::Nack | Rpc::ExtendLease | Rpc::Reject => "ack",
        Rpc::CreateOrUpdateConsumer
        | Rpc::DeleteConsumer
        | Rpc::SetSubjectLimits
        | Rpc::SeekConsumer
        | Rpc::PurgeSubject
        | Rpc::DeleteSubject => "admin",
    }
}

fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

/// Calls `rpc` on `subject` with `token`; the status code it ended with.
async fn call(system: &System, rpc: Rpc, token: Option<&str>, subject: &str) -> Code {
    let mut ingress = system.publisher().await;
    let mut egress = system.subscriber().await;
    let subject = subject.to_string();
    let durable = "matrix".to_string();
    macro_rules! req {
        ($message:expr) => {
            with_token($message, token)
        };
    }
    let outcome = match rpc {
        Rpc::Publish => ingress
            .publish(req!(PublishRequest {
                subject,
                data: b"x".to_vec().into(),
                headers: Default::default(),
                message_id: String::new(),
                ordering_key: String::new(),
            }))
            .await
            .map(drop),
        Rpc::PublishStream => {
            let frames = [
                Frame::Header(PublishHeader {
                    subject,
                    headers: Default::default(),
                    total_size: None,
                    message_id: String::new(),
                    ordering_key: String::new(),
                }),
                Frame::Chunk(b"x".to_vec().into()),
                Frame::End(PublishEnd {
                    sha256: String::new(),
                }),
            ]
            .map(|frame| PublishFrame { frame: Some(frame) });
            ingress
                .publish_stream(with_token(stream::iter(frames), token))
                .await
                .map(drop)
        }
        // The stream opens for any verified caller; each message is
        // authorized on its own and answered with its code.
        Rpc::PublishMany => {
            let message = PublishRequest {
                subject,
                data: b"x".to_vec().into(),
                headers: Default::default(),
                message_id: String::new(),
                ordering_key: String::new(),
            };
            match ingress
                .publish_many(with_token(stream::iter([message]), token))
                .await
            {
                Ok(answers) => match answers.into_inner().message().await {
                    Ok(Some(answer)) if answer.status_code == 0 => Ok(()),
                    Ok(Some(answer)) => Err(tonic::Status::new(
                        Code::from(answer.status_code as i32),
                        answer.error_message,
                    )),
                    Ok(None) => Err(tonic::Status::internal("no answer")),
                    Err(status) => Err(status),
                },
                Err(status) => Err(status),
            }
        }
        Rpc::Subscribe => egress
            .subscribe(req!(SubscribeRequest {
                subject,
                start_sequence: None,
                durable_name: durable,
            }))
            .await
            .map(drop),
        Rpc::Fetch => egress
            .fetch(req!(FetchRequest {
                subject,
                durable_name: durable,
                batch_size: 1,
                omit_large_payloads: false,
            }))
            .await
            .map(drop),
        Rpc::GetLastSequence => egress
            .get_last_sequence(req!(GetLastSequenceRequest { subject }))
            .await
            .map(drop),
        Rpc::AckMessage => egress
            .ack_message(req!(AckRequest {
                durable_name: durable,
                subject,
                sequence: 1,
            }))
            .await
            .map(drop),
        Rpc::CreateOrUpdateConsumer => egress
            .create_or_update_consumer(req!(CreateOrUpdateConsumerRequest {
                subject,
                durable_name: durable,
                config: None,
            }))
            .await
            .map(drop),
        Rpc::GetConsumerInfo => egress
            .get_consumer_info(req!(ConsumerRequest {
                subject,
                durable_name: durable,
            }))
            .await
            .map(drop),
        Rpc::DeleteConsumer => egress
            .delete_consumer(req!(ConsumerRequest {
                subject,
                durable_name: durable,
            }))
            .await
            .map(drop),
        Rpc::Ack => egress
            .ack(req!(AckSequencesRequest {
                subject,
                durable_name: durable,
                sequences: vec![1],
            }))
            .await
            .map(drop),
        Rpc::Nack => egress
            .nack(req!(NackRequest {
                subject,
                durable_name: durable,
                sequences: vec![1],
                delay_ms: 0,
            }))
            .await
            .map(drop),
        Rpc::Consume => {
            let start = ConsumeRequest {
                request: Some(ConsumeFrame::Start(ConsumeStart {
                    subject,
                    durable_name: durable,
                    max_in_flight: 1,
                    omit_large_payloads: false,
                    report_not_held: false,
                })),
            };
            egress
                .consume(with_token(stream::iter([start]), token))
                .await
                .map(drop)
        }
        Rpc::FetchPayload => egress
            .fetch_payload(req!(FetchPayloadRequest {
                subject,
                sequence: 1,
                offset: 0,
            }))
            .await
            .map(drop),
        Rpc::SetSubjectLimits => egress
            .set_subject_limits(req!(SetSubjectLimitsRequest {
                subject,
                limits: None,
            }))
            .await
            .map(drop),
        Rpc::GetSubjectInfo => egress
            .get_subject_info(req!(SubjectRequest { subject }))
            .await
            .map(drop),
        Rpc::SeekConsumer => egress
            .seek_consumer(req!(SeekConsumerRequest {
                subject,
                durable_name: durable,
                to: Some(seek_consumer_request::To::Sequence(1)),
            }))
            .await
            .map(drop),
        Rpc::ExtendLease => egress
            .extend_lease(req!(ExtendLeaseRequest {
                subject,
                durable_name: durable,
                sequences: vec![1],
                extend_ms: 0,
            }))
            .await
            .map(drop),
        Rpc::Reject => egress
            .reject(req!(RejectRequest {
                subject,
                durable_name: durable,
                sequences: vec![1],
                reason: String::new(),
            }))
            .await
            .map(drop),
        Rpc::PurgeSubject => egress
            .purge_subject(req!(PurgeSubjectRequest {
                subject,
                through_sequence: 0,
            }))
            .await
            .map(drop),
        Rpc::DeleteSubject => egress
            .delete_subject(req!(SubjectRequest { subject }))
            .await
            .map(drop),
    };
    outcome.err().map_or(Code::Ok, |status| status.code())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_rpc_checks_the_token_the_permission_and_the_subject() {
    let system = System::start(auth_config(true)).await;
    let subject = testing::unique_subject("authz");
    let valid = hs256(&claims(&["*"], &["test.authz.>"]), SECRET);
    let forged = hs256(&claims(&["*"], &["*"]), "not-the-secret");
    let mut expired = claims(&["*"], &["*"]);
    expired["exp"] = json!(now() - 3600);
    let expired = hs256(&expired, SECRET);
    let mut wrong_issuer = claims(&["*"], &["*"]);
    wrong_issuer["iss"] = json!("someone-else");
    let wrong_issuer = hs256(&wrong_issuer, SECRET);
    let elsewhere = hs256(&claims(&["*"], &["elsewhere.>"]), SECRET);

    // Something to read, publish with the valid token first.
    assert_eq!(
        call(&system, Rpc::Publish, Some(&valid), &subject).await,
        Code::Ok
    );

    let mut failures = Vec::new();
    for rpc in EVERY_RPC {
        let all_but: Vec<&str> = ["publish", "subscribe", "fetch", "ack", "admin"]
            .into_iter()
            .filter(|p| *p != needs(rpc))
            .collect();
        let lacking = hs256(&claims(&all_but, &["*"]), SECRET);
        let cases = [
            ("no token", None, Some(Code::Unauthenticated)),
            (
                "forged signature",
                Some(forged.as_str()),
                Some(Code::Unauthenticated),
            ),
            (
                "expired",
                Some(expired.as_str()),
                Some(Code::Unauthenticated),
            ),
            (
                "wrong issuer",
                Some(wrong_issuer.as_str()),
                Some(Code::Unauthenticated),
            ),
            (
                "missing permission",
                Some(lacking.as_str()),
                Some(Code::PermissionDenied),
            ),
            (
                "subject not allowed",
                Some(elsewhere.as_str()),
                Some(Code::PermissionDenied),
            ),
            ("valid", Some(valid.as_str()), None),
        ];
        for (case, token, expected) in cases {
            let code = call(&system, rpc, token, &subject).await;
            let ok = match expected {
                Some(expected) => code == expected,
                None => !matches!(code, Code::Unauthenticated | Code::PermissionDenied),
            };
            if !ok {
                failures.push(format!(
                    "{rpc:?} with {case}: {code:?}, expected {expected:?}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn listings_need_admin_and_show_only_the_subjects_a_token_allows() {
    let system = System::start(auth_config(true)).await;
    let subject = testing::unique_subject("authz-list");
    let valid = hs256(&claims(&["*"], &["test.authz-list.>"]), SECRET);
    let elsewhere = hs256(&claims(&["*"], &["elsewhere.>"]), SECRET);
    let not_admin = hs256(&claims(&["subscribe", "fetch"], &["*"]), SECRET);
    for rpc in [Rpc::Publish, Rpc::CreateOrUpdateConsumer] {
        assert_eq!(call(&system, rpc, Some(&valid), &subject).await, Code::Ok);
    }
    let mut egress = system.subscriber().await;
    let subjects = |token: &str| {
        with_token(
            ListSubjectsRequest {
                prefix: subject.clone(),
                page_size: 0,
                page_token: String::new(),
            },
            Some(token),
        )
    };
    let consumers = |token: &str| {
        with_token(
            ListConsumersRequest {
                subject: String::new(),
                page_size: 1000,
                page_token: String::new(),
            },
            Some(token),
        )
    };
    let denied = egress
        .list_subjects(subjects(&not_admin))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = egress
        .list_consumers(consumers(&not_admin))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let mine = egress
        .list_subjects(subjects(&valid))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.subjects.len(), 1);
    assert_eq!(mine.subjects[0].subject, subject);
    let theirs = egress
        .list_subjects(subjects(&elsewhere))
        .await
        .unwrap()
        .into_inner();
    assert!(theirs.subjects.is_empty(), "{theirs:?}");
    let listed = egress
        .list_consumers(consumers(&elsewhere))
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed
            .consumers
            .iter()
            .all(|c| c.subject.starts_with("elsewhere.")),
        "{listed:?}"
    );
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn subject_wildcards_and_optional_auth() {
    let system = System::start(auth_config(false)).await;
    let base = testing::unique_subject("wild");
    let deeper = format!("{base}.eu.paris");
    let one = format!("{base}.eu");
    let cases = [
        (vec![base.clone()], base.as_str(), Code::Ok),
        (vec![base.clone()], one.as_str(), Code::PermissionDenied),
        (vec![format!("{base}.*")], one.as_str(), Code::Ok),
        (
            vec![format!("{base}.*")],
            deeper.as_str(),
            Code::PermissionDenied,
        ),
        (vec![format!("{base}.>")], deeper.as_str(), Code::Ok),
        (
            vec![format!("{base}.>")],
            base.as_str(),
            Code::PermissionDenied,
        ),
        (vec!["*".to_string()], deeper.as_str(), Code::Ok),
    ];
    for (patterns, subject, expected) in cases {
        let patterns: Vec<&str> = patterns.iter().map(String::as_str).collect();
        let token = hs256(&claims(&["publish"], &patterns), SECRET);
        assert_eq!(
            call(&system, Rpc::Publish, Some(&token), subject).await,
            expected,
            "{patterns:?} on {subject}"
        );
    }
    // Optional auth: no token is anonymous and allowed; a bad token is still refused.
    assert_eq!(call(&system, Rpc::Publish, None, &base).await, Code::Ok);
    let forged = hs256(&claims(&["*"], &["*"]), "wrong");
    assert_eq!(
        call(&system, Rpc::Publish, Some(&forged), &base).await,
        Code::Unauthenticated
    );
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rs256_tokens_are_verified_with_the_public_key() {
    let dir = std::env::temp_dir().join(format!("mts-rs256-{}", testing::unique_subject("k")));
    std::fs::create_dir_all(&dir).unwrap();
    let (private, public) = rsa_pair(&dir, "key");
    let mut config = testing::config();
    config.auth.enabled = true;
    config.auth.jwt_public_key_file = public.to_str().unwrap().into();
    config.auth.jwt_issuer = ISSUER.into();
    let system = System::start(config).await;
    let subject = testing::unique_subject("rs256");
    let signed = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims(&["publish"], &["*"]),
        &EncodingKey::from_rsa_pem(&std::fs::read(&private).unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(
        call(&system, Rpc::Publish, Some(&signed), &subject).await,
        Code::Ok
    );
    let hs = hs256(&claims(&["publish"], &["*"]), SECRET);
    assert_eq!(
        call(&system, Rpc::Publish, Some(&hs), &subject).await,
        Code::Unauthenticated
    );
    std::fs::remove_dir_all(&dir).unwrap();
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn each_client_has_its_own_publish_rate() {
    let mut config = auth_config(true);
    config.ingress.publish_rate_per_second = 5;
    config.ingress.publish_burst = 5;
    let system = System::start(config).await;
    let subject = testing::unique_subject("rate");
    let token = |client: &str| {
        let mut claims = claims(&["publish"], &["*"]);
        claims["client_id"] = json!(client);
        hs256(&claims, SECRET)
    };
    let (alice, bob) = (token("alice"), token("bob"));
    for _ in 0..5 {
        assert_eq!(
            call(&system, Rpc::Publish, Some(&alice), &subject).await,
            Code::Ok
        );
    }
    let mut ingress = system.publisher().await;
    let refused = ingress
        .publish(with_token(
            PublishRequest {
                subject: subject.clone(),
                data: b"x".to_vec().into(),
                headers: Default::default(),
                message_id: String::new(),
                ordering_key: String::new(),
            },
            Some(&alice),
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("client alice"),
        "{}",
        refused.message()
    );
    let retry = tonic_types::StatusExt::get_error_details(&refused)
        .retry_info()
        .cloned()
        .expect("a retry hint");
    assert!(retry.retry_delay.is_some());
    assert_eq!(
        call(&system, Rpc::Publish, Some(&bob), &subject).await,
        Code::Ok,
        "bob has his own budget"
    );
    // Refused publishes stored nothing: 5 from alice, 1 from bob.
    assert_eq!(
        call(&system, Rpc::PublishStream, Some(&alice), &subject).await,
        Code::ResourceExhausted
    );
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    assert_eq!(
        call(&system, Rpc::Publish, Some(&alice), &subject).await,
        Code::Ok,
        "one token back after 200 ms"
    );
    let last = system
        .subscriber()
        .await
        .get_last_sequence(with_token(
            GetLastSequenceRequest {
                subject: subject.clone(),
            },
            Some(&hs256(&claims(&["*"], &["*"]), SECRET)),
        ))
        .await
        .unwrap()
        .into_inner()
        .last_sequence;
    assert_eq!(last, 7);
    system.stop().await;
}

/// An RSA key pair that openssl makes in `dir`: the private and the public
/// key's PEM files.
fn rsa_pair(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let (private, public) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.pub")),
    );
    for args in [
        vec![
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            private.to_str().unwrap(),
        ],
        vec![
            "rsa",
            "-in",
            private.to_str().unwrap(),
            "-pubout",
            "-out",
            public.to_str().unwrap(),
        ],
    ] {
        let done = std::process::Command::new("openssl")
            .args(&args)
            .output()
            .expect("openssl");
        assert!(
            done.status.success(),
            "{}",
            String::from_utf8_lossy(&done.stderr)
        );
    }
    (private, public)
}

/// A token with `claims`, signed RS256 by the private key at `private`,
/// naming key id `kid` when given.
fn rs256(claims: &Value, private: &std::path::Path, kid: Option<&str>) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_owned);
    let key = EncodingKey::from_rsa_pem(&std::fs::read(private).unwrap()).unwrap();
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

/// The public half of `private` as a JWK with id `kid`.
fn jwk(private: &std::path::Path, kid: &str) -> jsonwebtoken::jwk::Jwk {
    let key = EncodingKey::from_rsa_pem(&std::fs::read(private).unwrap()).unwrap();
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap();
    jwk.common.key_id = Some(kid.to_owned());
    jwk
}

/// Serves the key set `served` holds at the moment of each request.
async fn jwks_server(served: std::sync::Arc<std::sync::Mutex<String>>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/.well-known/jwks.json",
        listener.local_addr().unwrap()
    );
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let body = served.lock().unwrap().clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buffer = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buffer[..n]),
                    }
                }
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(reply.as_bytes()).await;
            });
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread")]
async fn verification_keys_rotate_under_a_running_service() {
    let dir = std::env::temp_dir().join(format!("mts-keys-{}", testing::unique_subject("r")));
    std::fs::create_dir_all(&dir).unwrap();
    let [a, b, c, d] = ["a", "b", "c", "d"].map(|name| rsa_pair(&dir, name));
    let set = |keys: Vec<jsonwebtoken::jwk::Jwk>| {
        serde_json::to_string(&jsonwebtoken::jwk::JwkSet { keys }).unwrap()
    };
    let served = std::sync::Arc::new(std::sync::Mutex::new(set(vec![jwk(&a.0, "a")])));
    let key_file = dir.join("file-key.pub");
    std::fs::copy(&c.1, &key_file).unwrap();
    let mut config = testing::config();
    config.auth.enabled = true;
    config.auth.jwt_issuer = ISSUER.into();
    config.auth.jwt_jwks_url = jwks_server(std::sync::Arc::clone(&served)).await;
    config.auth.jwt_public_key_file = key_file.to_str().unwrap().into();
    config.auth.jwt_keys_refresh_seconds = 1;
    config.auth.jwt_audience = "minitoolstream, other".into();
    let system = System::start(config).await;
    let subject = testing::unique_subject("rotation");
    let mut publish = claims(&["publish"], &["*"]);
    publish["aud"] = json!("minitoolstream");
    let code = |token: String| {
        let (system, subject) = (&system, subject.clone());
        async move { call(system, Rpc::Publish, Some(&token), &subject).await }
    };

    assert_eq!(code(rs256(&publish, &a.0, Some("a"))).await, Code::Ok);
    assert_eq!(
        code(rs256(&publish, &c.0, None)).await,
        Code::Ok,
        "the file's key"
    );
    assert_eq!(
        code(rs256(&publish, &b.0, Some("b"))).await,
        Code::Unauthenticated,
        "b is in no set yet"
    );
    let mut elsewhere = publish.clone();
    elsewhere["aud"] = json!("another-application");
    assert_eq!(
        code(rs256(&elsewhere, &a.0, Some("a"))).await,
        Code::Unauthenticated,
        "a token meant for another audience"
    );

    // The identity provider rotates: b in, a out.
    *served.lock().unwrap() = set(vec![jwk(&b.0, "b")]);
    // And the mounted key file is replaced by d's.
    std::fs::copy(&d.1, &key_file).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while code(rs256(&publish, &b.0, Some("b"))).await != Code::Ok
        || code(rs256(&publish, &d.0, None)).await != Code::Ok
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the rotated keys were not taken within 20 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(
        code(rs256(&publish, &a.0, Some("a"))).await,
        Code::Unauthenticated,
        "a left the set"
    );
    assert_eq!(
        code(rs256(&publish, &c.0, None)).await,
        Code::Unauthenticated,
        "c left the file"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    system.stop().await;
}
