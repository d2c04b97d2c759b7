//! Without static S3 keys the services take credentials from the standard
//! AWS chain. Web identity (IRSA on EKS) as the process sees it: a token
//! file and a role in the environment, traded at STS for keys — here an STS
//! stand-in on loopback that hands out the test S3 server's own keys, so
//! the real S3 server accepts what the chain produced.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use mts_proto::pb::PublishRequest;
use mts_proto::pb::ingress_service_client::IngressServiceClient;
use mts_proto::service_names::INGRESS;
use mts_testkit as testing;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::binaries::Process;

/// Answers AssumeRoleWithWebIdentity with `access`/`secret` when the request
/// carries `token`; counts the calls it answered so.
async fn sts_stand_in(
    token: String,
    access: String,
    secret: String,
    lifetime: std::time::Duration,
) -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let answered = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&answered);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (token, access, secret) = (token.clone(), access.clone(), secret.clone());
            let counted = Arc::clone(&counted);
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 8192];
                // The whole form: the headers, then Content-Length bytes.
                loop {
                    let n = socket.read(&mut buffer).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buffer[..n]);
                    let text = String::from_utf8_lossy(&request).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if request.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                let text = String::from_utf8_lossy(&request);
                let (status, body) = if text.contains("Action=AssumeRoleWithWebIdentity")
                    && text.contains(&format!("WebIdentityToken={token}"))
                {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let expires = prost_types::Timestamp {
                        seconds: (std::time::SystemTime::now() + lifetime)
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap()
                            .as_secs() as i64,
                        nanos: 0,
                    };
                    (
                        "200 OK",
                        format!(
                            "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
                         <AssumeRoleWithWebIdentityResult><Credentials>\
                         <AccessKeyId>{access}</AccessKeyId><SecretAccessKey>{secret}</SecretAccessKey>\
                         <SessionToken>session-token</SessionToken><Expiration>{expires}</Expiration>\
                         </Credentials><SubjectFromWebIdentityToken>system:serviceaccount:minitoolstream:ingress</SubjectFromWebIdentityToken>\
                         <AssumedRoleUser><Arn>arn:aws:sts::123456789012:assumed-role/mts/s</Arn><AssumedRoleId>AROA:s</AssumedRoleId></AssumedRoleUser>\
                         </AssumeRoleWithWebIdentityResult><ResponseMetadata><RequestId>1</RequestId></ResponseMetadata>\
                         </AssumeRoleWithWebIdentityResponse>"
                        ),
                    )
                } else {
                    ("400 Bad Request", format!("unexpected request: {text}"))
                };
                let reply = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/xml\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(reply.as_bytes()).await;
            });
        }
    });
    (port, answered)
}

#[tokio::test]
async fn without_static_keys_web_identity_credentials_reach_the_object_store() {
    let config = testing::config();
    let dir = std::env::temp_dir().join(testing::unique_subject("web-identity"));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, "a-projected-service-account-token").unwrap();
    let (sts_port, answered) = sts_stand_in(
        "a-projected-service-account-token".into(),
        config.object_store.access_key_id.clone(),
        config.object_store.secret_access_key.clone(),
        // Short-lived, as STS's are: the client must trade the token again.
        std::time::Duration::from_secs(20),
    )
    .await;
    let sts = format!("http://127.0.0.1:{sts_port}");
    let token_path = token_file.to_str().unwrap().to_owned();
    let log = dir.join("ingress.log");
    let ingress = Process::start_logged(
        "ingress",
        INGRESS,
        5,
        &[
            ("MINIO_ACCESS_KEY_ID", ""),
            ("MINIO_SECRET_ACCESS_KEY", ""),
            ("AWS_WEB_IDENTITY_TOKEN_FILE", &token_path),
            ("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/mts"),
            ("AWS_ROLE_SESSION_NAME", "ingress"),
            ("AWS_ENDPOINT_URL_STS", &sts),
            // Nothing from this machine's own profile or instance.
            ("AWS_CONFIG_FILE", "/nonexistent"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
        &log,
    )
    .await;
    let mut client = IngressServiceClient::connect(format!("http://{}", ingress.addr))
        .await
        .unwrap();
    let subject = testing::unique_subject("web-identity");
    let reply = client
        .publish(PublishRequest {
            subject,
            data: vec![5u8; 600 * 1024].into(),
            ..PublishRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !reply.object_name.is_empty(),
        "offloaded to the object store: {reply:?}"
    );
    assert_eq!(
        answered.load(Ordering::SeqCst),
        1,
        "the keys came from STS, for the token in the file, and are cached"
    );
    // Publishes and health checks go on using them; before they expire
    // (within the client's buffer of about 10 s) they are fetched again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    let mut requests = 1;
    while answered.load(Ordering::SeqCst) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "credentials living 20 s were not fetched again within 40 s"
        );
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        client
            .publish(PublishRequest {
                subject: testing::unique_subject("web-identity"),
                data: vec![6u8; 600 * 1024].into(),
                ..PublishRequest::default()
            })
            .await
            .unwrap();
        requests += 1;
    }
    let calls = answered.load(Ordering::SeqCst);
    assert!(
        calls <= 3,
        "{calls} STS calls for {requests} publishes and the health checks: not cached"
    );
    ingress.signal();
    let _ = ingress.exit(std::time::Duration::from_secs(20)).await;
    std::fs::remove_dir_all(&dir).unwrap();
}
