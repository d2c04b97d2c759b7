//! A per-client publish rate limit, as a tower layer in front of the ingress
//! service. The client is the `client_id` of a verified token (anonymous
//! callers share one budget), each with a token bucket; a publish beyond it
//! is answered RESOURCE_EXHAUSTED with a retry hint, before it is decoded;
//! a PublishMany stream is slowed down to the rate instead (see `many`).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use mts_runtime::auth::{Authenticator, Caller};
use tonic::server::NamedService;
use tonic_types::{ErrorDetails, StatusExt};

/// The one call that is limited per message rather than per call.
const PUBLISH_MANY_PATH: &str = "/minitoolstream.IngressService/PublishMany";

/// Buckets kept before idle ones are forgotten.
const MAX_CLIENTS: usize = 10_000;

struct Bucket {
    tokens: f64,
    refreshed: Instant,
}

/// Token buckets by client id.
pub struct Limiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl Limiter {
    /// `per_second` publishes sustained, `burst` at once.
    pub fn new(per_second: u64, burst: u64) -> Self {
        Self {
            per_second: per_second as f64,
            burst: burst.max(1) as f64,
            buckets: Mutex::default(),
        }
    }

    /// Takes one token for `client`, or says how long until one is there.
    pub fn take(&self, client: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_CLIENTS && !buckets.contains_key(client) {
            // Full buckets can go: a returning client starts full anyway.
            let burst = self.burst;
            let rate = self.per_second;
            buckets.retain(|_, b| {
                b.tokens + now.duration_since(b.refreshed).as_secs_f64() * rate < burst
            });
        }
        let bucket = buckets.entry(client.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            refreshed: now,
        });
        let elapsed = now.duration_since(bucket.refreshed).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.burst);
        bucket.refreshed = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_second,
            ))
        }
    }
}

/// Whose bucket a caller draws from: anonymous callers share one.
pub fn client_of(caller: &Caller) -> &str {
    match caller {
        Caller::Client(claims) => &claims.client_id,
        Caller::Anonymous => "",
    }
}

/// Wraps the ingress service with the limit.
#[derive(Clone)]
pub struct RateLimited<S> {
    inner: S,
    limiter: Arc<Limiter>,
    auth: Arc<Authenticator>,
}

impl<S> RateLimited<S> {
    pub fn new(inner: S, limiter: Arc<Limiter>, auth: Arc<Authenticator>) -> Self {
        Self {
            inner,
            limiter,
            auth,
        }
    }
}

impl<S: NamedService> NamedService for RateLimited<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for RateLimited<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let mut headers = http::HeaderMap::new();
        if let Some(token) = request.headers().get("authorization") {
            headers.insert("authorization", token.clone());
        }
        let metadata = tonic::metadata::MetadataMap::from_headers(headers);
        // An unverifiable token is the handler's to refuse, with UNAUTHENTICATED.
        let caller = self.auth.authenticate(&metadata).ok();
        // A PublishMany stream counts its messages one by one instead.
        let per_message = request.uri().path() == PUBLISH_MANY_PATH;
        let client = caller.as_ref().filter(|_| !per_message).map(client_of);
        if let Some(client) = client
            && let Err(wait) = self.limiter.take(client, Instant::now())
        {
            let who = if client.is_empty() {
                "anonymous callers".to_owned()
            } else {
                format!("client {client}")
            };
            let status = tonic::Status::with_error_details(
                tonic::Code::ResourceExhausted,
                format!(
                    "{who} exceeded the publish rate limit; retry in {} ms",
                    wait.as_millis().max(1)
                ),
                ErrorDetails::with_retry_info(Some(wait)),
            );
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        if let Some(caller) = caller {
            // The handler takes it from here instead of verifying the token again.
            request.extensions_mut().insert(caller);
        }
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refill_at_the_rate_and_are_per_client() {
        let limiter = Limiter::new(10, 2);
        let start = Instant::now();
        assert_eq!(limiter.take("a", start), Ok(()));
        assert_eq!(limiter.take("a", start), Ok(()));
        let wait = limiter.take("a", start).unwrap_err();
        assert!(
            wait <= Duration::from_millis(100) && wait > Duration::ZERO,
            "{wait:?}"
        );
        assert_eq!(
            limiter.take("b", start),
            Ok(()),
            "another client has its own bucket"
        );
        assert_eq!(
            limiter.take("a", start + Duration::from_millis(100)),
            Ok(()),
            "one token after 100 ms"
        );
        assert!(
            limiter
                .take("a", start + Duration::from_millis(100))
                .is_err()
        );
    }
}
