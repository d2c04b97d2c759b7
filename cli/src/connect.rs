//! A client of the services the command line names.

use mts_client::{Client, Retry, Token};

use crate::args::Connection;
use crate::failure::Failure;

pub async fn client(connection: &Connection) -> Result<Client, Failure> {
    let mut builder = Client::builder(&connection.ingress, &connection.egress)
        .timeout(connection.timeout)
        .retry(Retry {
            attempts: connection.tries.max(1),
            ..Retry::default()
        });
    if let Some(token) = &connection.token {
        builder = builder.token(token.trim());
    }
    if let Some(path) = &connection.token_file {
        let path = path.clone();
        builder = builder.token_provider(Token::provider(move || {
            let path = path.clone();
            async move {
                tokio::fs::read_to_string(&path)
                    .await
                    .map(|token| token.trim().to_owned())
                    .map_err(|e| {
                        mts_client::Error::Token(format!("cannot read {}: {e}", path.display()))
                    })
            }
        }));
    }
    if let Some(ca) = &connection.ca_file {
        builder = builder.ca_file(ca);
    }
    if let (Some(cert), Some(key)) = (&connection.cert, &connection.key) {
        builder = builder.identity(cert, key);
    }
    Ok(builder.connect().await?)
}
