//! Saving a received message: its payload (downloaded with FetchPayload
//! when the server left it out), verified against its SHA-256 and written to
//! `<dir>/<sequence>` through a temporary file, so a saved file is complete.

use std::path::Path;

use crate::auth::Egress;
use futures::StreamExt;
use mts_proto::pb::{FetchPayloadRequest, Message};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::failure::Failure;
use crate::progress::Progress;

/// Payloads up to this size are printed when there is no output directory.
const PRINT_LIMIT: usize = 64 * 1024;

pub async fn save(
    client: &mut Egress,
    message: Message,
    dir: Option<&Path>,
) -> Result<(), Failure> {
    let Some(dir) = dir else {
        print(&message);
        return Ok(());
    };
    let path = dir.join(message.sequence.to_string());
    let partial = dir.join(format!("{}.part", message.sequence));
    let written = write(client, &message, &partial).await;
    let digest = match written {
        Ok(digest) => digest,
        Err(failure) => {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(failure);
        }
    };
    if !message.sha256.is_empty() && !message.sha256.eq_ignore_ascii_case(&digest) {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(Failure::Digest {
            sequence: message.sequence,
            expected: message.sha256,
            actual: digest,
        });
    }
    tokio::fs::rename(&partial, &path)
        .await
        .map_err(Failure::io(format!("saving {}", path.display())))?;
    println!(
        "sequence={} size={} sha256={} path={}",
        message.sequence,
        message.size,
        digest,
        path.display()
    );
    Ok(())
}

/// Writes the payload to `path`, returning its SHA-256.
async fn write(client: &mut Egress, message: &Message, path: &Path) -> Result<String, Failure> {
    let io = |doing: &str| Failure::io(format!("{doing} {}", path.display()));
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(io("creating"))?;
    let mut hasher = Sha256::new();
    if message.payload_omitted {
        let mut progress = Progress::new(
            format!("downloading {}", message.sequence),
            Some(message.size),
        );
        let mut chunks = client
            .fetch_payload(FetchPayloadRequest {
                subject: message.subject.clone(),
                sequence: message.sequence,
                offset: 0,
            })
            .await
            .map_err(Failure::call("download"))?
            .into_inner();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(Failure::call("download"))?;
            hasher.update(&chunk.data);
            file.write_all(&chunk.data).await.map_err(io("writing"))?;
            progress.advance(chunk.data.len() as u64);
        }
        progress.finish();
    } else {
        hasher.update(&message.data);
        file.write_all(&message.data).await.map_err(io("writing"))?;
    }
    file.sync_all().await.map_err(io("syncing"))?;
    Ok(hex::encode(hasher.finalize()))
}

fn print(message: &Message) {
    let mut line = format!(
        "sequence={} size={} sha256={}",
        message.sequence, message.size, message.sha256
    );
    let mut headers: Vec<_> = message
        .headers
        .iter()
        .filter(|(k, _)| !k.starts_with("mts-"))
        .collect();
    headers.sort();
    for (name, value) in headers {
        line.push_str(&format!(" {name}={value}"));
    }
    if message.payload_omitted || message.data.len() > PRINT_LIMIT {
        line.push_str(" (payload not printed; use --out DIR to save it)");
        println!("{line}");
    } else {
        println!("{line}\n{}", String::from_utf8_lossy(&message.data));
    }
}
