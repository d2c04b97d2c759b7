//! Bearer tokens sent with every call.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::Error;

type Provide =
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<String, Error>> + Send>> + Send + Sync;

/// Where a client's bearer token comes from: one fixed token, or a provider
/// asked before every call (which may cache and refresh as it likes).
#[derive(Clone)]
pub enum Token {
    /// The same token on every call.
    Static(String),
    /// Asked before every call.
    Provider(Arc<Provide>),
}

impl Token {
    /// A token from `provide`, asked before every call.
    pub fn provider<F, Fut>(provide: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, Error>> + Send + 'static,
    {
        Self::Provider(Arc::new(move || Box::pin(provide())))
    }

    pub(crate) async fn get(&self) -> Result<String, Error> {
        match self {
            Self::Static(token) => Ok(token.clone()),
            Self::Provider(provide) => provide().await,
        }
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Static(_) => f.write_str("Token::Static(..)"),
            Self::Provider(_) => f.write_str("Token::Provider(..)"),
        }
    }
}
