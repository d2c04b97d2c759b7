//! Publishes one message and prints its sequence.
//!
//! ```sh
//! cargo run -p mts-client --example publish -- http://127.0.0.1:50051 demo.hello "hello"
//! ```

use mts_client::{Client, Message};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(ingress), Some(subject), Some(text)) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: publish INGRESS SUBJECT TEXT");
        std::process::exit(2);
    };
    // Publishing needs only the ingress; the egress endpoint is for delivery.
    let client = Client::connect(ingress.clone(), ingress).await?;
    let published = client.publish(Message::new(subject, text)).await?;
    println!(
        "stored as {} ({} bytes, sha256 {})",
        published.sequence, published.size, published.sha256
    );
    Ok(())
}
