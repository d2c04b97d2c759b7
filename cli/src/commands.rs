//! The four commands.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::StreamExt;
use mts_proto::pb::consume_request::Request as ConsumeFrame;
use mts_proto::pb::egress_service_client::EgressServiceClient;
use mts_proto::pb::ingress_service_client::IngressServiceClient;
use mts_proto::pb::publish_frame::Frame;
use mts_proto::pb::{
    AckSequences, AckSequencesRequest, ConsumeRequest, ConsumeStart, FetchRequest,
    GetLastSequenceRequest, PublishEnd, PublishFrame, PublishHeader,
};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::args::{Args, Command};
use crate::auth::{Bearer, Egress, Signing, TokenRequest};
use crate::failure::Failure;
use crate::progress::Progress;
use crate::receive;

/// Bytes per chunk sent.
const CHUNK: usize = 1024 * 1024;

pub async fn run(args: Args) -> Result<(), Failure> {
    let token = Bearer::new(args.token.as_deref())?;
    let token = &token;
    match args.command {
        Command::Publish {
            subject,
            headers,
            message_id,
            file,
        } => {
            publish(
                &args.ingress,
                token,
                subject,
                headers.into_iter().collect(),
                message_id,
                &file,
            )
            .await
        }
        Command::Subscribe {
            subject,
            durable,
            out,
            count,
            max_in_flight,
        } => {
            subscribe(
                &args.egress,
                token,
                subject,
                durable,
                out,
                count,
                max_in_flight,
            )
            .await
        }
        Command::Fetch {
            subject,
            durable,
            batch,
            out,
            no_ack,
        } => fetch(&args.egress, token, subject, durable, batch, out, no_ack).await,
        Command::Token {
            issuer,
            client_id,
            subjects,
            permissions,
            ttl_seconds,
            secret,
            secret_file,
            private_key_file,
        } => {
            let read = |path: &std::path::Path| {
                std::fs::read(path).map_err(Failure::io(format!("reading {}", path.display())))
            };
            let key = match (secret, secret_file, private_key_file) {
                (Some(secret), None, None) => Signing::Secret(secret.into_bytes()),
                (None, Some(file), None) => Signing::Secret(read(&file)?),
                (None, None, Some(file)) => Signing::RsaPrivateKey(read(&file)?),
                _ => {
                    return Err(Failure::Token(
                        "give one of --secret, --secret-file, --private-key-file".into(),
                    ));
                }
            };
            let token = crate::auth::mint(TokenRequest {
                issuer: &issuer,
                client_id: &client_id,
                subjects: &subjects,
                permissions: &permissions,
                ttl_seconds,
                key,
            })?;
            println!("{token}");
            Ok(())
        }
        Command::Last { subject } => {
            let last = egress(&args.egress, token)
                .await?
                .get_last_sequence(GetLastSequenceRequest { subject })
                .await
                .map_err(Failure::call("last sequence"))?
                .into_inner()
                .last_sequence;
            println!("{last}");
            Ok(())
        }
    }
}

async fn channel(endpoint: &str) -> Result<Channel, Failure> {
    let connect = |error| Failure::Connect {
        endpoint: endpoint.to_owned(),
        error,
    };
    tonic::transport::Endpoint::from_shared(endpoint.to_owned())
        .map_err(connect)?
        .connect()
        .await
        .map_err(connect)
}

pub async fn egress(endpoint: &str, token: &Bearer) -> Result<Egress, Failure> {
    Ok(EgressServiceClient::with_interceptor(
        channel(endpoint).await?,
        token.clone(),
    ))
}

/// Streams the file with its size (when known) and, at the end, its SHA-256,
/// which the server checks before storing anything.
async fn publish(
    endpoint: &str,
    token: &Bearer,
    subject: String,
    headers: HashMap<String, String>,
    message_id: Option<String>,
    file: &Path,
) -> Result<(), Failure> {
    let mut client =
        IngressServiceClient::with_interceptor(channel(endpoint).await?, token.clone());
    let (mut source, total_size): (Box<dyn tokio::io::AsyncRead + Unpin + Send>, Option<u64>) =
        if file == Path::new("-") {
            (Box::new(tokio::io::stdin()), None)
        } else {
            let opened = tokio::fs::File::open(file)
                .await
                .map_err(Failure::io(format!("opening {}", file.display())))?;
            let size = opened
                .metadata()
                .await
                .ok()
                .filter(|m| m.is_file())
                .map(|m| m.len());
            (Box::new(opened), size)
        };
    let (frames, outbound) = mpsc::channel::<PublishFrame>(4);
    let frame = |frame| PublishFrame { frame: Some(frame) };
    let header = Frame::Header(PublishHeader {
        subject,
        headers,
        total_size,
        message_id: message_id.unwrap_or_default(),
        ordering_key: String::new(),
    });
    // The header is in the channel before the call starts; its capacity is 4.
    let _ = frames.send(frame(header)).await;
    let label = file.display().to_string();
    let reader = tokio::spawn(async move {
        let mut hasher = Sha256::new();
        let mut progress = Progress::new(format!("publishing {label}"), total_size);
        loop {
            let mut buffer = vec![0u8; CHUNK];
            let mut filled = 0;
            while filled < CHUNK {
                let read = source.read(&mut buffer[filled..]).await?;
                if read == 0 {
                    break;
                }
                filled += read;
            }
            if filled == 0 {
                break;
            }
            buffer.truncate(filled);
            hasher.update(&buffer);
            progress.advance(filled as u64);
            if frames
                .send(frame(Frame::Chunk(Bytes::from(buffer))))
                .await
                .is_err()
            {
                // The call ended early; its error says why.
                return Ok(());
            }
        }
        progress.finish();
        let end = Frame::End(PublishEnd {
            sha256: hex::encode(hasher.finalize()),
        });
        let _ = frames.send(frame(end)).await;
        Ok::<_, std::io::Error>(())
    });
    let reply = client.publish_stream(ReceiverStream::new(outbound)).await;
    match reader.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            return Err(Failure::Io {
                doing: format!("reading {}", file.display()),
                error,
            });
        }
        Err(panic) => {
            return Err(Failure::Io {
                doing: "reading".into(),
                error: std::io::Error::other(panic.to_string()),
            });
        }
    }
    let reply = reply.map_err(Failure::call("publish"))?.into_inner();
    println!(
        "sequence={} size={} sha256={} duplicate={} object={}",
        reply.sequence, reply.size, reply.sha256, reply.duplicate, reply.object_name
    );
    Ok(())
}

/// Follows the subject on a Consume stream, acknowledging each message once
/// it is saved.
async fn subscribe(
    endpoint: &str,
    token: &Bearer,
    subject: String,
    durable: String,
    out: Option<PathBuf>,
    count: Option<u64>,
    max_in_flight: u32,
) -> Result<(), Failure> {
    let mut client = egress(endpoint, token).await?;
    let (frames, outbound) = mpsc::channel(16);
    let start = ConsumeFrame::Start(ConsumeStart {
        subject: subject.clone(),
        durable_name: durable,
        max_in_flight,
        omit_large_payloads: true,
        report_not_held: false,
    });
    let _ = frames
        .send(ConsumeRequest {
            request: Some(start),
        })
        .await;
    let mut messages = client
        .consume(ReceiverStream::new(outbound))
        .await
        .map_err(Failure::call("subscribe"))?
        .into_inner();
    let mut received = 0;
    while count.is_none_or(|n| received < n) {
        let message = tokio::select! {
            next = messages.next() => match next {
                Some(message) => message.map_err(Failure::call("subscribe"))?,
                None => break,
            },
            _ = tokio::signal::ctrl_c() => break,
        };
        let sequence = message.sequence;
        receive::save(&mut client, message, out.as_deref()).await?;
        let ack = ConsumeFrame::Ack(AckSequences {
            sequences: vec![sequence],
        });
        if frames
            .send(ConsumeRequest { request: Some(ack) })
            .await
            .is_err()
        {
            break;
        }
        received += 1;
    }
    // Closing our side ends the stream; acks already sent are applied first.
    drop(frames);
    while messages.next().await.is_some() {}
    Ok(())
}

/// One batch: save every message, then acknowledge them together.
async fn fetch(
    endpoint: &str,
    token: &Bearer,
    subject: String,
    durable: String,
    batch: i32,
    out: Option<PathBuf>,
    no_ack: bool,
) -> Result<(), Failure> {
    let mut client = egress(endpoint, token).await?;
    let messages: Vec<_> = client
        .fetch(FetchRequest {
            subject: subject.clone(),
            durable_name: durable.clone(),
            batch_size: batch,
            omit_large_payloads: true,
        })
        .await
        .map_err(Failure::call("fetch"))?
        .into_inner()
        .collect()
        .await;
    let mut sequences = Vec::new();
    for message in messages {
        let message = message.map_err(Failure::call("fetch"))?;
        sequences.push(message.sequence);
        receive::save(&mut client, message, out.as_deref()).await?;
    }
    if !no_ack && !sequences.is_empty() {
        client
            .ack(AckSequencesRequest {
                subject,
                durable_name: durable,
                sequences,
            })
            .await
            .map_err(Failure::call("ack"))?;
    }
    Ok(())
}
