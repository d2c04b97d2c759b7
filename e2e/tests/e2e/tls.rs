//! TLS and mutual TLS on the gRPC port, with certificates made in the test.

use std::collections::HashMap;
use std::path::Path;

use mts_proto::pb::PublishRequest;
use mts_proto::pb::ingress_service_client::IngressServiceClient;
use mts_proto::service_names::INGRESS;
use mts_testkit::{self as testing, Running};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

async fn publish_over(
    addr: std::net::SocketAddr,
    tls: Option<ClientTlsConfig>,
) -> Result<u64, String> {
    let endpoint = match tls {
        Some(tls) => Endpoint::from_shared(format!("https://localhost:{}", addr.port()))
            .unwrap()
            .tls_config(tls)
            .map_err(|e| e.to_string())?,
        None => Endpoint::from_shared(format!("http://{addr}")).unwrap(),
    };
    let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
    let reply = IngressServiceClient::new(channel)
        .publish(PublishRequest {
            subject: testing::unique_subject("tls"),
            data: b"secret".to_vec().into(),
            headers: HashMap::new(),
            message_id: String::new(),
            ordering_key: String::new(),
        })
        .await
        .map_err(|s| format!("{s:?}"))?;
    Ok(reply.into_inner().sequence)
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_and_mutual_tls() {
    let pki = testing::pki("publisher.example");
    let dir = std::env::temp_dir().join(format!("mts-tls-{}", testing::unique_subject("d")));
    std::fs::create_dir_all(&dir).unwrap();
    let mut config = testing::config();
    config.tls.cert_file = write(&dir, "server.pem", &pki.server.0);
    config.tls.key_file = write(&dir, "server.key", &pki.server.1);
    let trusting = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("localhost");

    let tls = Running::start_over(
        INGRESS,
        config.clone(),
        mts_ingress::run,
        Some(trusting.clone()),
    )
    .await;
    assert_eq!(publish_over(tls.addr, Some(trusting.clone())).await, Ok(1));
    assert!(
        publish_over(tls.addr, None).await.is_err(),
        "plaintext is refused on a TLS port"
    );
    tls.stop().await.unwrap();

    config.tls.client_ca_file = write(&dir, "ca.pem", &pki.ca);
    let with_identity = trusting
        .clone()
        .identity(Identity::from_pem(&pki.client.0, &pki.client.1));
    let mutual = Running::start_over(
        INGRESS,
        config,
        mts_ingress::run,
        Some(with_identity.clone()),
    )
    .await;
    assert_eq!(publish_over(mutual.addr, Some(with_identity)).await, Ok(1));
    let refused = publish_over(mutual.addr, Some(trusting)).await;
    assert!(
        refused.is_err(),
        "a client without a certificate is refused: {refused:?}"
    );
    mutual.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn certificates_renewed_in_place_apply_without_a_restart() {
    let (old, new) = (testing::pki("before"), testing::pki("after"));
    let dir = std::env::temp_dir().join(format!("mts-tls-{}", testing::unique_subject("r")));
    std::fs::create_dir_all(&dir).unwrap();
    let mut config = testing::config();
    config.tls.cert_file = write(&dir, "tls.crt", &old.server.0);
    config.tls.key_file = write(&dir, "tls.key", &old.server.1);
    config.tls.client_ca_file = write(&dir, "ca.crt", &old.ca);
    config.tls.reload_interval_ms = 200;
    let client_of = |pki: &testing::Pki| {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&pki.ca))
            .identity(Identity::from_pem(&pki.client.0, &pki.client.1))
            .domain_name("localhost")
    };
    let service =
        Running::start_over(INGRESS, config, mts_ingress::run, Some(client_of(&old))).await;
    assert!(
        publish_over(service.addr, Some(client_of(&old)))
            .await
            .is_ok()
    );
    assert!(
        publish_over(service.addr, Some(client_of(&new)))
            .await
            .is_err(),
        "the new CA is not trusted yet, nor trusts the new client"
    );

    // As cert-manager renews a Secret mounted in a pod: files replaced in place.
    write(&dir, "tls.key", &new.server.1);
    write(&dir, "tls.crt", &new.server.0);
    write(&dir, "ca.crt", &new.ca);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match publish_over(service.addr, Some(client_of(&new))).await {
            Ok(_) => break,
            Err(err) => assert!(
                std::time::Instant::now() < deadline,
                "the renewed certificate was not taken within 10 s: {err}"
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        publish_over(service.addr, Some(client_of(&old)))
            .await
            .is_err(),
        "the old client CA no longer admits anyone"
    );
    let anonymous = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&new.ca))
        .domain_name("localhost");
    assert!(
        publish_over(service.addr, Some(anonymous)).await.is_err(),
        "after the reload, clients must still present a certificate"
    );
    let old_identity = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&new.ca))
        .identity(Identity::from_pem(&old.client.0, &old.client.1))
        .domain_name("localhost");
    assert!(
        publish_over(service.addr, Some(old_identity))
            .await
            .is_err(),
        "a certificate of the replaced client CA is refused"
    );
    service.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
