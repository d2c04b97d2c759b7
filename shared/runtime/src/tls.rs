//! TLS on the gRPC port with certificates that change under a running
//! process: the certificate, key and client CA files are read again every
//! `tls_reload_interval_ms`, and a change (cert-manager renews a Secret in
//! place) applies to every connection accepted after it. Connections are
//! accepted here and handed to tonic already encrypted, each handshake on a
//! task of its own so that a slow client holds up no other.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use mts_config::Config;

/// How long a client may take over its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for tonic to take them.
const ACCEPTED_BACKLOG: usize = 64;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct Error(String);

/// The files TLS is made from.
#[derive(Debug, Clone)]
struct Files {
    cert: String,
    key: String,
    client_ca: Option<String>,
}

impl Files {
    /// Their contents, read together.
    fn read(&self) -> Result<Contents, Error> {
        let read =
            |path: &str| std::fs::read(path).map_err(|e| Error(format!("cannot read {path}: {e}")));
        Ok(Contents {
            cert: read(&self.cert)?,
            key: read(&self.key)?,
            client_ca: self.client_ca.as_deref().map(read).transpose()?,
        })
    }
}

#[derive(PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Contents {
    /// The server configuration they make: HTTP/2 only, mTLS with a client
    /// CA.
    fn server_config(&self) -> Result<ServerConfig, Error> {
        let certs = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error(format!("tls_cert_file: {e}")))?;
        if certs.is_empty() {
            return Err(Error("tls_cert_file holds no certificate".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(&self.key)
            .map_err(|e| Error(format!("tls_key_file: {e}")))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error(e.to_string()))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for ca in CertificateDer::pem_slice_iter(pem) {
                    let ca = ca.map_err(|e| Error(format!("tls_client_ca_file: {e}")))?;
                    roots
                        .add(ca)
                        .map_err(|e| Error(format!("tls_client_ca_file: {e}")))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| Error(format!("tls_client_ca_file: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| Error(format!("tls_cert_file and tls_key_file: {e}")))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// The server's TLS configuration, replaced when its files change.
pub struct Reloading {
    files: Files,
    /// The configuration in use and the file contents it was made from.
    current: RwLock<(Arc<ServerConfig>, Contents)>,
}

impl Reloading {
    /// TLS from `config`'s files, or `None` for plaintext. Unreadable or
    /// unusable files fail here, at start-up.
    pub fn from_config(config: &Config) -> Result<Option<Arc<Self>>, Error> {
        if config.tls.cert_file.is_empty() {
            return Ok(None);
        }
        let files = Files {
            cert: config.tls.cert_file.clone(),
            key: config.tls.key_file.clone(),
            client_ca: Some(config.tls.client_ca_file.clone()).filter(|f| !f.is_empty()),
        };
        let contents = files.read()?;
        let server = Arc::new(contents.server_config()?);
        Ok(Some(Arc::new(Self {
            files,
            current: RwLock::new((server, contents)),
        })))
    }

    fn current(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(current) => Arc::clone(&current.0),
            Err(poisoned) => Arc::clone(&poisoned.into_inner().0),
        }
    }

    /// Reads the files again; a change that makes a usable configuration
    /// replaces the current one. A half-written renewal (a key that does not
    /// match its certificate yet) keeps the current one until the next look.
    fn reload(&self) {
        let contents = match self.files.read() {
            Ok(contents) => contents,
            Err(err) => {
                tracing::warn!(%err, "TLS files unreadable; keeping the current certificate");
                return;
            }
        };
        let unchanged = self
            .current
            .read()
            .map(|current| current.1 == contents)
            .unwrap_or(false);
        if unchanged {
            return;
        }
        match contents.server_config() {
            Ok(server) => {
                if let Ok(mut current) = self.current.write() {
                    *current = (Arc::new(server), contents);
                }
                tracing::info!(cert = %self.files.cert, "TLS files changed; new connections use them");
            }
            Err(err) => {
                tracing::warn!(%err, "changed TLS files are not usable yet; keeping the current certificate");
            }
        }
    }

    /// Reads the files again every `every`, for as long as the process runs.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        let mut ticks = tokio::time::interval(every.max(Duration::from_millis(100)));
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let this = Arc::clone(&self);
            // File reads block: off the runtime's threads.
            let _ = tokio::task::spawn_blocking(move || this.reload()).await;
        }
    }
}

/// The connections `listener` accepts, Nagle's algorithm off, each through
/// its TLS handshake with the configuration current when it arrived. Ends
/// (and drops the listener) when tonic stops taking connections.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<Reloading>,
) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (accepted, connections) = mpsc::channel(ACCEPTED_BACKLOG);
    tokio::spawn(async move {
        loop {
            let (socket, peer) = tokio::select! {
                next = listener.accept() => match next {
                    Ok(next) => next,
                    Err(err) => {
                        // Out of file descriptors and the like: a pause, not an end.
                        tracing::warn!(%err, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = accepted.closed() => return,
            };
            let _ = socket.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            let accepted = accepted.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
                    Ok(Ok(stream)) => {
                        let _ = accepted.send(Ok(stream)).await;
                    }
                    Ok(Err(err)) => tracing::debug!(%err, %peer, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake took too long"),
                }
            });
        }
    });
    ReceiverStream::new(connections)
}
