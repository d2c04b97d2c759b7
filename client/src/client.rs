//! Connecting: endpoints, TLS, the token and how calls are retried.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use mts_proto::pb::egress_service_client::EgressServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::{Error, Token};

/// How calls that the service could not take for now are tried again.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Tries in all, the first included (1: never again).
    pub attempts: u32,
    /// The wait before the second try; doubled for each one after, with
    /// jitter.
    pub first_wait: Duration,
    /// The longest wait between two tries.
    pub max_wait: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            attempts: 8,
            first_wait: Duration::from_millis(100),
            max_wait: Duration::from_secs(5),
        }
    }
}

impl Retry {
    /// The wait before try number `attempt` (2 for the first retry).
    pub(crate) fn wait(&self, attempt: u32) -> Duration {
        let doubled = self
            .first_wait
            .saturating_mul(1 << attempt.saturating_sub(2).min(16));
        let wait = doubled.min(self.max_wait);
        // Up to a quarter less, so that many clients do not retry in step.
        wait.mul_f64(1.0 - rand::random::<f64>() / 4.0)
    }
}

/// Whether a call may be made again after a failure that leaves its
/// outcome unknown (its deadline passed, its connection broke mid-call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Repeat {
    /// A repeat changes nothing (a read, an upsert, a publish under its
    /// message id).
    Safe,
    /// A repeat could (an ack of what a first try acked fails; a purge
    /// purges what came since): tried again only when the service said it
    /// could not do it.
    IfNotDone,
}

/// Settings of a [`Client`]; [`ClientBuilder::connect`] makes one.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    ingress: String,
    egress: String,
    ca_file: Option<PathBuf>,
    identity: Option<(PathBuf, PathBuf)>,
    token: Option<Token>,
    timeout: Duration,
    connect_timeout: Duration,
    retry: Retry,
}

impl ClientBuilder {
    /// Trusts the CA in this PEM file for `https://` endpoints instead of the
    /// system's roots.
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Presents this certificate and key (PEM files) to the services, for
    /// mutual TLS.
    pub fn identity(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.identity = Some((cert.into(), key.into()));
        self
    }

    /// Sends this bearer token with every call.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(Token::Static(token.into()));
        self
    }

    /// Sends the token the provider gives, asked before every call.
    pub fn token_provider(mut self, token: Token) -> Self {
        self.token = Some(token);
        self
    }

    /// The longest a unary call may take (30 s by default).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The longest making a connection may take (5 s by default).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How calls the service could not take for now are tried again.
    pub fn retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    /// A client with these settings. Connections are made on first use, so
    /// that a client can be made while a service is still starting; bad
    /// endpoints and unreadable certificates are refused here.
    pub async fn connect(self) -> Result<Client, Error> {
        let tls = self.tls().await?;
        let channel = |address: &str| -> Result<Channel, Error> {
            if !address.starts_with("http://") && !address.starts_with("https://") {
                return Err(Error::Config(format!(
                    "endpoint {address:?} must start with http:// (plaintext) or https:// (TLS)"
                )));
            }
            let mut endpoint = Endpoint::from_shared(address.to_owned())
                .map_err(|e| Error::Config(format!("endpoint {address:?}: {e}")))?
                .connect_timeout(self.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_while_idle(true);
            if address.starts_with("https://") {
                endpoint = endpoint.tls_config(tls.clone()).map_err(|e| {
                    Error::Config(format!(
                        "TLS settings for {address}: {e} (a certificate or key that is not PEM?)"
                    ))
                })?;
            }
            Ok(endpoint.connect_lazy())
        };
        Ok(Client {
            ingress: channel(&self.ingress)?,
            egress: channel(&self.egress)?,
            token: self.token,
            timeout: self.timeout,
            retry: self.retry,
        })
    }

    async fn tls(&self) -> Result<ClientTlsConfig, Error> {
        let read = |path: PathBuf| async move {
            tokio::fs::read(&path)
                .await
                .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))
        };
        let mut tls = ClientTlsConfig::new();
        tls = match &self.ca_file {
            Some(path) => tls.ca_certificate(Certificate::from_pem(read(path.clone()).await?)),
            None => tls.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(Identity::from_pem(
                read(cert.clone()).await?,
                read(key.clone()).await?,
            ));
        }
        Ok(tls)
    }
}

/// A connection to the ingress and the egress; cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    pub(crate) ingress: Channel,
    pub(crate) egress: Channel,
    token: Option<Token>,
    pub(crate) timeout: Duration,
    pub(crate) retry: Retry,
}

impl Client {
    /// Settings for a client of the ingress at `ingress` and the egress at
    /// `egress` (`http://host:port`, or `https://host:port` for TLS).
    pub fn builder(ingress: impl Into<String>, egress: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            ingress: ingress.into(),
            egress: egress.into(),
            ca_file: None,
            identity: None,
            token: None,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            retry: Retry::default(),
        }
    }

    /// A client of these two endpoints with the default settings.
    pub async fn connect(
        ingress: impl Into<String>,
        egress: impl Into<String>,
    ) -> Result<Self, Error> {
        Self::builder(ingress, egress).connect().await
    }

    /// Makes `call` until it succeeds, fails for good, or has been tried
    /// as often as [`Retry`] allows; returns what it gave and the number of
    /// tries. Errors of the client's own (a token it cannot get) end it at
    /// once.
    pub(crate) async fn retrying<T, F, Fut>(
        &self,
        doing: &'static str,
        repeat: Repeat,
        mut call: F,
    ) -> Result<(T, u32), Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Result<T, tonic::Status>, Error>>,
    {
        let mut attempt = 1;
        loop {
            let err = match call().await? {
                Ok(value) => return Ok((value, attempt)),
                Err(status) => Error::Status { doing, status },
            };
            if !self.may_try_again(&err, attempt, repeat) {
                return Err(err);
            }
            attempt += 1;
            let wait = self.retry.wait(attempt);
            tracing::debug!(%err, attempt, ?wait, "not taken; trying again");
            tokio::time::sleep(wait).await;
        }
    }

    /// One unary egress call, `call(egress, request)`, tried as
    /// [`Retry`] says and `repeat` allows.
    pub(crate) async fn egress_call<Req, Resp, F, Fut>(
        &self,
        doing: &'static str,
        repeat: Repeat,
        request: Req,
        call: F,
    ) -> Result<Resp, Error>
    where
        Req: Clone,
        F: Fn(EgressServiceClient<Channel>, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let egress = self.egress_client();
        let call = &call;
        self.retrying(doing, repeat, || {
            let (egress, request) = (egress.clone(), request.clone());
            async move {
                let request = self.request(request).await?;
                Ok(call(egress, request).await.map(tonic::Response::into_inner))
            }
        })
        .await
        .map(|(reply, _)| reply)
    }

    /// Whether a call that failed with `err` after `attempts` tries is made
    /// again.
    pub(crate) fn may_try_again(&self, err: &Error, attempts: u32, repeat: Repeat) -> bool {
        let allowed = match repeat {
            Repeat::Safe => true,
            Repeat::IfNotDone => !err.outcome_unknown(),
        };
        allowed && err.is_retryable() && attempts < self.retry.attempts
    }

    /// A client of the egress that takes messages of any size: a payload
    /// sent whole may be far above tonic's 4 MiB default.
    pub(crate) fn egress_client(&self) -> EgressServiceClient<Channel> {
        EgressServiceClient::new(self.egress.clone()).max_decoding_message_size(usize::MAX)
    }

    /// `message` as a request with this client's token and timeout.
    pub(crate) async fn request<T>(&self, message: T) -> Result<tonic::Request<T>, Error> {
        let mut request = self.stream_request(message).await?;
        request.set_timeout(self.timeout);
        Ok(request)
    }

    /// `message` as a request with this client's token and no deadline: a
    /// stream lasts as long as its work (a large upload, a consumer).
    pub(crate) async fn stream_request<T>(&self, message: T) -> Result<tonic::Request<T>, Error> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = &self.token {
            let value = format!("Bearer {}", token.get().await?)
                .parse()
                .map_err(|_| Error::Token("the token is not valid header text".into()))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}
