//! Follows a subject with a durable consumer: each message's payload is
//! saved in a folder (downloaded when the service left it out), and only
//! then acked. The stream reopens by itself when it breaks.
//!
//! ```sh
//! cargo run -p mts-client --example consume -- http://127.0.0.1:50052 files.in archiver ./inbox
//! ```

use std::path::PathBuf;

use mts_client::{Client, Delivery};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(egress), Some(subject), Some(durable), Some(dir)) =
        (args.next(), args.next(), args.next(), args.next())
    else {
        eprintln!("usage: consume EGRESS SUBJECT DURABLE FOLDER");
        std::process::exit(2);
    };
    let dir = PathBuf::from(dir);
    tokio::fs::create_dir_all(&dir).await?;
    // Consuming needs only the egress; the ingress endpoint is for publishing.
    let client = Client::connect(egress.clone(), egress).await?;
    let mut consumer = client
        .consumer(subject, durable)
        .max_in_flight(8)
        .start()
        .await?;
    loop {
        let delivery = consumer.next().await?;
        match save(&client, &delivery, &dir).await {
            Ok(path) => {
                delivery.ack().await?;
                println!("{} saved as {}", delivery.sequence, path.display());
            }
            Err(err) => {
                // Given back, to be tried again in a minute.
                eprintln!("{} not saved: {err}", delivery.sequence);
                delivery.nack(std::time::Duration::from_secs(60)).await?;
            }
        }
    }
}

async fn save(
    client: &Client,
    delivery: &Delivery,
    dir: &std::path::Path,
) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let name = delivery
        .file_name()
        .unwrap_or_else(|| delivery.sequence.to_string());
    // Names of their own, so that two messages of one name both stay.
    let path = dir.join(format!("{}-{name}", delivery.sequence));
    let partial = dir.join(format!(".{}.part", delivery.sequence));
    if delivery.payload_omitted {
        // However long it takes, the message is not delivered again meanwhile.
        let _leased = delivery.keep_leased();
        // Resumes what an earlier try left; checks the SHA-256.
        client
            .download(&delivery.subject, delivery.sequence, &partial, |_| {})
            .await?;
    } else {
        tokio::fs::write(&partial, &delivery.data).await?;
    }
    tokio::fs::rename(&partial, &path).await?;
    Ok(path)
}
