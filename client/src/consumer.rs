//! Receiving with a durable consumer over one `Consume` stream, opened again
//! by itself when it breaks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use mts_proto::pb::consume_request::Request as Frame;
use mts_proto::pb::{
    AckSequences, AckSequencesRequest, ConsumeRequest, ConsumeStart, ExtendLeaseRequest,
    ExtendSequences, FetchRequest, NackRequest, NackSequences, RejectRequest, RejectSequences,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

use crate::client::Repeat;
use crate::error::stream_may_reopen;
use crate::{Client, Error, PayloadReader, Retry};

/// Settings of a [`Consumer`]; [`Client::consumer`] makes them.
#[derive(Debug, Clone)]
pub struct ConsumerBuilder {
    client: Client,
    start: ConsumeStart,
    reconnect: Retry,
}

impl Client {
    /// Settings for receiving the messages of `subject` with the durable
    /// consumer `durable`. One that does not exist is created with the
    /// service's defaults on first use; [`Client::create_consumer`] sets
    /// others.
    pub fn consumer(
        &self,
        subject: impl Into<String>,
        durable: impl Into<String>,
    ) -> ConsumerBuilder {
        ConsumerBuilder {
            client: self.clone(),
            start: ConsumeStart {
                subject: subject.into(),
                durable_name: durable.into(),
                max_in_flight: 100,
                omit_large_payloads: true,
                report_not_held: true,
            },
            reconnect: Retry {
                attempts: u32::MAX,
                first_wait: Duration::from_millis(100),
                max_wait: Duration::from_secs(5),
            },
        }
    }
}

impl Client {
    /// Leases up to `batch` messages of `subject` for the durable consumer
    /// `durable` (created with the service's defaults when it does not
    /// exist) and returns them; payloads above the service's inline
    /// delivery size are left out. Each is to be settled like a consumer's:
    /// unsettled, it is delivered again once its lease runs out.
    pub async fn fetch(
        &self,
        subject: &str,
        durable: &str,
        batch: u32,
    ) -> Result<Vec<Delivery>, Error> {
        let request = FetchRequest {
            subject: subject.to_owned(),
            durable_name: durable.to_owned(),
            batch_size: i32::try_from(batch).unwrap_or(i32::MAX),
            omit_large_payloads: true,
        };
        let egress = self.egress_client();
        // A fetch that may have leased a batch is not repeated: that batch
        // would wait out its leases while a second one is leased.
        let (mut messages, _) = self
            .retrying("fetch", Repeat::IfNotDone, || {
                let (mut egress, request) = (egress.clone(), request.clone());
                async move {
                    let request = self.request(request).await?;
                    Ok(egress.fetch(request).await.map(tonic::Response::into_inner))
                }
            })
            .await?;
        let link = Arc::new(Link {
            frames: Mutex::new(None),
            client: self.clone(),
            subject: subject.to_owned(),
            durable: durable.to_owned(),
        });
        let mut fetched = Vec::new();
        // A batch that breaks part way is not fetched again: what it leased
        // comes back once the leases run out.
        while let Some(message) = messages.message().await.map_err(|status| Error::Status {
            doing: "fetch",
            status,
        })? {
            fetched.push(Delivery::new(message, Arc::clone(&link)));
        }
        Ok(fetched)
    }

    /// Acks exactly `sequences`, which the consumer must hold (all, or
    /// none is acked: `FAILED_PRECONDITION` names those it does not);
    /// returns the consumer's ack floor.
    pub async fn ack(&self, subject: &str, durable: &str, sequences: &[u64]) -> Result<u64, Error> {
        let request = AckSequencesRequest {
            subject: subject.to_owned(),
            durable_name: durable.to_owned(),
            sequences: sequences.to_vec(),
        };
        self.egress_call(
            "ack",
            Repeat::IfNotDone,
            request,
            |mut egress, request| async move { egress.ack(request).await },
        )
        .await
        .map(|reply| reply.ack_floor)
    }
}

impl ConsumerBuilder {
    /// At most this many messages delivered and not yet acked, nacked or
    /// rejected at a time (100 by default): the service sends no more until
    /// some are settled.
    pub fn max_in_flight(mut self, max_in_flight: u32) -> Self {
        self.start.max_in_flight = max_in_flight;
        self
    }

    /// Whether payloads above the service's inline delivery size are left
    /// out of messages (true by default), to be read with
    /// [`Delivery::payload`] or [`Client::download`] without holding them
    /// whole in memory. False: every payload comes whole, and one above the
    /// service's delivery limit ends the stream with `RESOURCE_EXHAUSTED`.
    pub fn omit_large_payloads(mut self, omit: bool) -> Self {
        self.start.omit_large_payloads = omit;
        self
    }

    /// How a broken stream is opened again: by default for ever, waiting
    /// 0.1 s doubling to 5 s between tries. The count starts again once a
    /// message arrives. The first stream is opened as the client's calls
    /// are tried ([`ClientBuilder::retry`](crate::ClientBuilder::retry)).
    pub fn reconnect(mut self, retry: Retry) -> Self {
        self.reconnect = retry;
        self
    }

    /// Opens the stream: a bad name or a token without the rights fails
    /// here.
    pub async fn start(self) -> Result<Consumer, Error> {
        let first = self.client.retry;
        let mut consumer = Consumer {
            client: self.client,
            start: self.start,
            reconnect: self.reconnect,
            open: None,
            reconnects: 0,
            breaks: 0,
            not_applied: Arc::new(AtomicU64::new(0)),
        };
        // The first stream is tried as the client's calls are: a service
        // that is not there fails here rather than being waited for.
        consumer.open = Some(consumer.open_stream(first).await?);
        Ok(consumer)
    }
}

/// Receives the messages of a durable consumer as the service pushes them.
/// A stream that breaks — an egress restart, a connection closed for its
/// age, a network fault — is opened again by itself: the consumer's place
/// is kept by the service, and what was delivered on the broken stream and
/// not yet acked is delivered again. Flow control is the service's: at most
/// `max_in_flight` messages are outstanding. Dropping it ends its stream as
/// [`Consumer::close`] does, without waiting.
pub struct Consumer {
    client: Client,
    start: ConsumeStart,
    reconnect: Retry,
    open: Option<Open>,
    reconnects: u64,
    /// Breaks since the last message arrived.
    breaks: u32,
    /// Settlements the service reported it did not apply.
    not_applied: Arc<AtomicU64>,
}

/// One open stream.
struct Open {
    messages: Streaming<mts_proto::pb::Message>,
    link: Arc<Link>,
}

impl Drop for Open {
    fn drop(&mut self) {
        // Deliveries may outlive the stream; their sender must not keep it
        // open.
        self.link.close();
    }
}

/// How a delivery settles: on the stream it came on while that is open,
/// by unary calls afterwards.
struct Link {
    /// The stream's outgoing frames; taken when it ends.
    frames: Mutex<Option<mpsc::Sender<ConsumeRequest>>>,
    client: Client,
    /// The stream's (or batch's) subject and consumer.
    subject: String,
    durable: String,
}

impl Link {
    fn frames(&self) -> Option<mpsc::Sender<ConsumeRequest>> {
        self.frames.lock().ok().and_then(|frames| frames.clone())
    }

    fn close(&self) {
        if let Ok(mut frames) = self.frames.lock() {
            frames.take();
        }
    }
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("subject", &self.start.subject)
            .field("durable", &self.start.durable_name)
            .field("reconnects", &self.reconnects)
            .finish_non_exhaustive()
    }
}

impl Consumer {
    /// The next message. Waits for one; opens the stream again when it
    /// broke (at once the first time, then waiting longer between breaks
    /// that bring no message, as [`reconnect`](ConsumerBuilder::reconnect)
    /// says). Fails for what waiting cannot mend — the token lost its
    /// rights, a payload too large to send whole (`RESOURCE_EXHAUSTED`; see
    /// [`omit_large_payloads`](ConsumerBuilder::omit_large_payloads)), a
    /// payload lost — or once the tries run out.
    pub async fn next(&mut self) -> Result<Delivery, Error> {
        loop {
            let open = match &mut self.open {
                Some(open) => open,
                None => {
                    let open = self.open_stream(self.reconnect).await?;
                    self.reconnects += 1;
                    self.open.insert(open)
                }
            };
            let status = match open.messages.message().await {
                Ok(Some(message)) => match message.not_held {
                    Some(not_held) => {
                        self.not_applied
                            .fetch_add(not_held.sequences.len() as u64, Ordering::Relaxed);
                        tracing::warn!(
                            frame = %not_held.frame,
                            sequences = ?not_held.sequences,
                            "the service did not apply these: their leases had run out (extend them while working) and they will be delivered again"
                        );
                        continue;
                    }
                    None => {
                        self.breaks = 0;
                        return Ok(Delivery::new(message, Arc::clone(&open.link)));
                    }
                },
                Ok(None) => tonic::Status::unavailable("the service ended the stream"),
                Err(status) => status,
            };
            self.open = None;
            self.breaks += 1;
            let refused = !stream_may_reopen(&status) || status.code() == Code::ResourceExhausted;
            if refused || self.breaks >= self.reconnect.attempts {
                return Err(Error::Status {
                    doing: "consume",
                    status,
                });
            }
            tracing::info!(%status, subject = %self.start.subject, durable = %self.start.durable_name, "consume stream broke; opening it again");
            if self.breaks > 1 {
                tokio::time::sleep(self.reconnect.wait(self.breaks)).await;
            }
        }
    }

    /// How often the stream was opened again after it broke.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// How many acks, nacks, extensions and rejections sent on the stream
    /// the service reported it did not apply, because the message's lease
    /// had run out first: such a message is delivered again.
    pub fn not_applied(&self) -> u64 {
        self.not_applied.load(Ordering::Relaxed)
    }

    /// Ends the stream: the acks sent are applied, and what this consumer
    /// holds unsettled is given back for delivery at once (to any stream of
    /// the consumer). Deliveries kept after this settle by unary calls.
    pub async fn close(mut self) {
        if let Some(mut open) = self.open.take() {
            open.link.close();
            // Whatever still arrives was leased by the stream, and is given
            // back when it ends.
            while let Ok(Some(_)) = open.messages.message().await {}
        }
    }

    /// Opens a stream, trying again as `retry` says.
    async fn open_stream(&self, retry: Retry) -> Result<Open, Error> {
        let mut attempt = 1;
        loop {
            let status = match self.try_open().await? {
                Ok(open) => return Ok(open),
                Err(status) => status,
            };
            if !stream_may_reopen(&status) || attempt >= retry.attempts {
                return Err(Error::Status {
                    doing: "consume",
                    status,
                });
            }
            attempt += 1;
            let wait = retry.wait(attempt);
            tracing::debug!(%status, attempt, ?wait, "cannot open the consume stream yet");
            tokio::time::sleep(wait).await;
        }
    }

    async fn try_open(&self) -> Result<Result<Open, tonic::Status>, Error> {
        let (frames, outgoing) = mpsc::channel(64);
        // The channel has room for it before the call starts.
        let _ = frames.try_send(ConsumeRequest {
            request: Some(Frame::Start(self.start.clone())),
        });
        let request = self
            .client
            .stream_request(ReceiverStream::new(outgoing))
            .await?;
        let mut egress = self.client.egress_client();
        Ok(egress.consume(request).await.map(|messages| Open {
            messages: messages.into_inner(),
            link: Arc::new(Link {
                frames: Mutex::new(Some(frames)),
                client: self.client.clone(),
                subject: self.start.subject.clone(),
                durable: self.start.durable_name.clone(),
            }),
        }))
    }
}

/// A message delivered to a [`Consumer`] (or by [`Client::fetch`]), to be
/// settled once: acked when done, nacked to have it again, its lease
/// extended while work goes on ([`Delivery::keep_leased`] does it
/// periodically), or rejected for good. Unsettled, it is delivered again
/// once its lease (the consumer's `ack_wait`) runs out.
///
/// While the stream it came on is open, settling rides on that stream and
/// returns once sent: the service applies it unless the lease ran out first,
/// which [`Consumer::not_applied`] counts (and a warning says). After the
/// stream ended it is a call of its own, answered.
pub struct Delivery {
    /// The subject.
    pub subject: String,
    /// The message's sequence on its subject.
    pub sequence: u64,
    /// The payload; empty when it was left out ([`Delivery::payload_omitted`]).
    pub data: Bytes,
    /// The headers, the service's own (`mts-…`) included.
    pub headers: HashMap<String, String>,
    /// When the message was stored.
    pub timestamp: Option<SystemTime>,
    /// How often it has been delivered to this consumer, this time included.
    pub delivery_count: u32,
    /// The payload's size in bytes.
    pub size: u64,
    /// The payload's hex SHA-256 (empty for messages stored before digests
    /// were kept).
    pub sha256: String,
    /// True when the payload was left out for its size: read it with
    /// [`Delivery::payload`] or [`Client::download`].
    pub payload_omitted: bool,
    settle: Settle,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("subject", &self.subject)
            .field("sequence", &self.sequence)
            .field("size", &self.size)
            .field("delivery_count", &self.delivery_count)
            .field("payload_omitted", &self.payload_omitted)
            .finish_non_exhaustive()
    }
}

/// The longest lease extension the service grants.
const MAX_EXTENSION: Duration = Duration::from_secs(12 * 3600);
/// The longest reason a rejection may give, in bytes.
const MAX_REJECT_REASON: usize = 1024;
/// How long [`Delivery::keep_leased`] extends a lease each time, and how
/// often: a lease always has two thirds of this left.
const KEEP_FOR: Duration = Duration::from_secs(60);
const KEEP_EVERY: Duration = Duration::from_secs(20);

impl Delivery {
    fn new(message: mts_proto::pb::Message, link: Arc<Link>) -> Self {
        let timestamp = message.timestamp.and_then(|t| SystemTime::try_from(t).ok());
        Self {
            settle: Settle {
                link,
                sequence: message.sequence,
            },
            subject: message.subject,
            sequence: message.sequence,
            data: message.data,
            headers: message.headers,
            timestamp,
            delivery_count: message.delivery_count,
            size: message.size,
            sha256: message.sha256,
            payload_omitted: message.payload_omitted,
        }
    }

    /// The file name its publisher gave (header `file-name`, set by
    /// [`Client::publish_file`]), made safe to use as a name in a folder:
    /// no folders, no control characters, no `.` or `..`.
    pub fn file_name(&self) -> Option<String> {
        self.headers
            .get(crate::FILE_NAME_HEADER)
            .and_then(|name| crate::safe_file_name(name))
    }

    /// A reader that downloads the payload from the service: for a message
    /// whose payload was left out.
    pub fn payload(&self) -> PayloadReader {
        self.settle
            .link
            .client
            .payload(&self.subject, self.sequence)
    }

    /// Done with it: it is never delivered again to this consumer.
    pub async fn ack(&self) -> Result<(), Error> {
        self.settle.ack().await
    }

    /// Gives it back: it is delivered again after `delay` (at once for
    /// zero).
    pub async fn nack(&self, delay: Duration) -> Result<(), Error> {
        self.settle.nack(delay).await
    }

    /// Still at it: its lease runs out `by` from now (the consumer's
    /// `ack_wait` for zero; at most 12 hours), so it is not delivered
    /// again meanwhile.
    pub async fn extend(&self, by: Duration) -> Result<(), Error> {
        if by > MAX_EXTENSION {
            return Err(Error::Config(format!(
                "a lease can be extended by at most 12 hours at a time, not {by:?}; extend again later"
            )));
        }
        self.settle.extend(by).await
    }

    /// Keeps the lease from running out while the returned keeper lives:
    /// at once and then every 20 s it is extended to 60 s from then. For
    /// work of unknown length (a large download); drop the keeper, then
    /// settle.
    pub fn keep_leased(&self) -> LeaseKeeper {
        let settle = self.settle.clone();
        LeaseKeeper(tokio::spawn(async move {
            loop {
                if let Err(err) = settle.extend(KEEP_FOR).await {
                    tracing::warn!(%err, sequence = settle.sequence, "could not extend the lease");
                }
                tokio::time::sleep(KEEP_EVERY).await;
            }
        }))
    }

    /// Gives it up for good: it goes to the consumer's dead-letter subject
    /// with `reason` (in the header `mts-reject-reason`, at most 1,024
    /// bytes), or is dropped when the consumer has none.
    pub async fn reject(&self, reason: impl Into<String>) -> Result<(), Error> {
        let reason = reason.into();
        if reason.len() > MAX_REJECT_REASON {
            return Err(Error::Config(format!(
                "a rejection's reason is at most {MAX_REJECT_REASON} bytes, not {}",
                reason.len()
            )));
        }
        self.settle.reject(reason).await
    }
}

/// Extends a delivery's lease periodically until dropped
/// ([`Delivery::keep_leased`]).
#[derive(Debug)]
pub struct LeaseKeeper(tokio::task::JoinHandle<()>);

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Settles one delivered message: on its stream while that is open, by a
/// call of its own afterwards.
#[derive(Clone)]
struct Settle {
    link: Arc<Link>,
    sequence: u64,
}

impl Settle {
    async fn ack(&self) -> Result<(), Error> {
        let frame = Frame::Ack(AckSequences {
            sequences: vec![self.sequence],
        });
        if self.on_stream(frame).await {
            return Ok(());
        }
        self.link
            .client
            .ack(&self.link.subject, &self.link.durable, &[self.sequence])
            .await
            .map(drop)
    }

    async fn nack(&self, delay: Duration) -> Result<(), Error> {
        let delay_ms = millis(delay);
        let frame = Frame::Nack(NackSequences {
            sequences: vec![self.sequence],
            delay_ms,
        });
        if self.on_stream(frame).await {
            return Ok(());
        }
        let request = NackRequest {
            subject: self.link.subject.clone(),
            durable_name: self.link.durable.clone(),
            sequences: vec![self.sequence],
            delay_ms,
        };
        self.link
            .client
            .egress_call(
                "nack",
                Repeat::IfNotDone,
                request,
                |mut egress, request| async move { egress.nack(request).await },
            )
            .await
            .map(drop)
    }

    async fn extend(&self, by: Duration) -> Result<(), Error> {
        let extend_ms = millis(by);
        let frame = Frame::Extend(ExtendSequences {
            sequences: vec![self.sequence],
            extend_ms,
        });
        if self.on_stream(frame).await {
            return Ok(());
        }
        let request = ExtendLeaseRequest {
            subject: self.link.subject.clone(),
            durable_name: self.link.durable.clone(),
            sequences: vec![self.sequence],
            extend_ms,
        };
        self.link
            .client
            .egress_call(
                "extend",
                Repeat::Safe,
                request,
                |mut egress, request| async move { egress.extend_lease(request).await },
            )
            .await
            .map(drop)
    }

    async fn reject(&self, reason: String) -> Result<(), Error> {
        let frame = Frame::Reject(RejectSequences {
            sequences: vec![self.sequence],
            reason: reason.clone(),
        });
        if self.on_stream(frame).await {
            return Ok(());
        }
        let request = RejectRequest {
            subject: self.link.subject.clone(),
            durable_name: self.link.durable.clone(),
            sequences: vec![self.sequence],
            reason,
        };
        self.link
            .client
            .egress_call(
                "reject",
                Repeat::IfNotDone,
                request,
                |mut egress, request| async move { egress.reject(request).await },
            )
            .await
            .map(drop)
    }

    /// Sends `frame` on the stream the message came on; false when that
    /// stream has ended.
    async fn on_stream(&self, frame: Frame) -> bool {
        let Some(frames) = self.link.frames() else {
            return false;
        };
        frames
            .send(ConsumeRequest {
                request: Some(frame),
            })
            .await
            .is_ok()
    }
}

/// `duration` in whole milliseconds, as the wire takes it.
fn millis(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}
