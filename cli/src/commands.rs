//! Each command, on the client library.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use mts_client::wire::{ConsumerConfig, DeliverPolicy, SubjectLimits};
use mts_client::{Client, FILE_NAME_HEADER, Message, Seek};
use serde_json::json;

use crate::args::{Args, Command, ConsumerCommand, Deliver, PayloadCommand, SubjectCommand};
use crate::auth::{self, Signing, TokenRequest};
use crate::failure::Failure;
use crate::output::{self, emit};
use crate::progress::Progress;
use crate::receive::{self, Receiver};

pub async fn run(args: Args) -> Result<(), Failure> {
    let Args {
        connection,
        json,
        quiet,
        command,
    } = args;
    if let Command::Token {
        issuer,
        client_id,
        subjects,
        permissions,
        ttl_seconds,
        secret,
        secret_file,
        private_key_file,
    } = command
    {
        let read = |path: &Path| {
            std::fs::read(path).map_err(Failure::io(format!("reading {}", path.display())))
        };
        let key = match (secret, secret_file, private_key_file) {
            (Some(secret), None, None) => Signing::Secret(secret.into_bytes()),
            (None, Some(file), None) => Signing::Secret(read(&file)?),
            (None, None, Some(file)) => Signing::RsaPrivateKey(read(&file)?),
            _ => {
                return Err(Failure::Usage(
                    "give one of --secret, --secret-file, --private-key-file".into(),
                ));
            }
        };
        let token = auth::mint(TokenRequest {
            issuer: &issuer,
            client_id: &client_id,
            subjects: &subjects,
            permissions: &permissions,
            ttl_seconds,
            key,
        })?;
        println!("{token}");
        return Ok(());
    }
    let client = crate::connect::client(&connection).await?;
    match command {
        Command::Pub {
            subject,
            file,
            data,
            headers,
            message_id,
            ordering_key,
            name,
        } => {
            let mut message = Message::new(subject, data.clone().unwrap_or_default());
            message.headers = headers.into_iter().collect::<HashMap<_, _>>();
            message.message_id = message_id;
            message.ordering_key = ordering_key;
            if let Some(name) = name {
                message.headers.insert(FILE_NAME_HEADER.to_owned(), name);
            }
            publish(
                &client,
                message,
                data.is_none().then_some(file).flatten(),
                json,
                quiet,
            )
            .await
        }
        Command::Sub {
            subject,
            durable,
            save,
            count,
            max_in_flight,
        } => {
            let receiver = Receiver {
                client,
                out: save.out,
                durable,
                json,
                quiet,
            };
            receiver.follow(&subject, max_in_flight, count).await
        }
        Command::Fetch {
            subject,
            durable,
            batch,
            save,
            no_ack,
        } => {
            let receiver = Receiver {
                client,
                out: save.out,
                durable,
                json,
                quiet,
            };
            receiver.fetch(&subject, batch, !no_ack).await
        }
        Command::Last { subject } => {
            let last = client.last_sequence(&subject).await?;
            emit(
                json,
                json!({"subject": subject, "last_sequence": last}),
                || last.to_string(),
            );
            Ok(())
        }
        Command::Consumer(command) => consumer(&client, command, json).await,
        Command::Subject(command) => subject(&client, command, json).await,
        Command::Payload(PayloadCommand::Get {
            subject,
            sequence,
            out,
        }) => receive::payload_get(&client, &subject, sequence, out, json, quiet).await,
        Command::Token { .. } => Ok(()),
    }
}

/// A file (streamed, any size, retried from its start), standard input
/// (streamed once), or the message's own data (unary).
async fn publish(
    client: &Client,
    message: Message,
    file: Option<PathBuf>,
    json: bool,
    quiet: bool,
) -> Result<(), Failure> {
    let published = match file {
        None => client.publish(message).await?,
        Some(file) if file == Path::new("-") => {
            let progress = Progress::new("standard input", quiet);
            client
                .publish_stream(message, tokio::io::stdin(), None, |p| progress.update(p))
                .await?
        }
        Some(file) => {
            let progress = Progress::new(file.display().to_string(), quiet);
            client
                .publish_file(message, &file, |p| progress.update(p))
                .await?
        }
    };
    emit(json, output::published(&published), || {
        output::published_line(&published)
    });
    Ok(())
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

async fn consumer(client: &Client, command: ConsumerCommand, json: bool) -> Result<(), Failure> {
    match command {
        ConsumerCommand::Ls { subject } => {
            let consumers = client.consumers(subject.as_deref()).await?;
            output::list(
                json,
                &consumers,
                output::consumer,
                output::CONSUMER_HEADER,
                output::consumer_row,
            );
        }
        ConsumerCommand::Info { subject, durable } => {
            let info = client.consumer_info(&subject, &durable).await?;
            let value = output::consumer(&info);
            emit(json, value.clone(), || output::fields(&value));
        }
        ConsumerCommand::Add {
            subject,
            durable,
            ack_wait,
            max_deliver,
            max_ack_pending,
            deliver,
            dead_letter,
            no_dead_letter,
            inactive_threshold,
        } => {
            let mut config = ConsumerConfig {
                ack_wait_ms: ack_wait
                    .map(|wait| u32::try_from(wait.as_millis()).unwrap_or(u32::MAX)),
                max_deliver,
                max_ack_pending,
                dead_letter_subject: if no_dead_letter {
                    Some(String::new())
                } else {
                    dead_letter
                },
                inactive_threshold_ms: inactive_threshold.map(millis),
                ..ConsumerConfig::default()
            };
            match deliver {
                Deliver::All => config.set_deliver_policy(DeliverPolicy::DeliverAll),
                Deliver::New => config.set_deliver_policy(DeliverPolicy::DeliverNew),
                Deliver::Sequence(sequence) => {
                    config.set_deliver_policy(DeliverPolicy::DeliverByStartSequence);
                    config.start_sequence = sequence;
                }
                Deliver::Time(time) => {
                    config.set_deliver_policy(DeliverPolicy::DeliverByStartTime);
                    config.start_time = Some(time.into());
                }
            }
            let info = client.create_consumer(&subject, &durable, config).await?;
            let value = output::consumer(&info);
            emit(json, value.clone(), || {
                let verb = if info.created_now {
                    "created"
                } else {
                    "updated"
                };
                format!("{verb} {durable} on {subject}\n{}", output::fields(&value))
            });
        }
        ConsumerCommand::Rm { subject, durable } => {
            client.delete_consumer(&subject, &durable).await?;
            emit(
                json,
                json!({"subject": subject, "durable_name": durable, "deleted": true}),
                || format!("deleted {durable} on {subject}"),
            );
        }
        ConsumerCommand::Seek {
            subject,
            durable,
            to,
        } => {
            let to = match to {
                Deliver::Sequence(sequence) => Seek::Sequence(sequence),
                Deliver::Time(time) => Seek::Time(time),
                Deliver::All => Seek::Time(UNIX_EPOCH),
                Deliver::New => {
                    let last = client.last_sequence(&subject).await?;
                    Seek::Sequence(last + 1)
                }
            };
            let info = client.seek_consumer(&subject, &durable, to).await?;
            let value = output::consumer(&info);
            emit(json, value.clone(), || output::fields(&value));
        }
    }
    Ok(())
}

async fn subject(client: &Client, command: SubjectCommand, json: bool) -> Result<(), Failure> {
    match command {
        SubjectCommand::Ls { prefix } => {
            let subjects = client
                .subjects(prefix.as_deref().unwrap_or_default())
                .await?;
            output::list(
                json,
                &subjects,
                output::subject,
                output::SUBJECT_HEADER,
                output::subject_row,
            );
        }
        SubjectCommand::Info { subject } => {
            let info = client.subject_info(&subject).await?;
            let value = output::subject(&info);
            emit(json, value.clone(), || output::fields(&value));
        }
        SubjectCommand::Limits {
            subject,
            max_age,
            max_messages,
            max_bytes,
            discard,
        } => {
            let limits = SubjectLimits {
                max_age_ms: max_age.map(millis),
                max_messages,
                max_bytes,
                discard,
            };
            let info = client.set_subject_limits(&subject, limits).await?;
            let value = output::subject(&info);
            emit(json, value.clone(), || output::fields(&value));
        }
        SubjectCommand::Purge { subject, through } => {
            let purged = client.purge_subject(&subject, through).await?;
            let after = purged.subject.as_ref().map(output::subject);
            emit(
                json,
                json!({"subject": subject, "purged": purged.purged, "after": after}),
                || format!("purged {} messages of {subject}", purged.purged),
            );
        }
    }
    Ok(())
}
