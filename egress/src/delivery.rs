//! Turning a leased message into a wire message: the payload (inline, or
//! read from the object store), headers, commit time and delivery count.

use futures::{FutureExt, Stream, StreamExt};
use mts_proto::pb::Message;
use mts_storage::object_store::{self, ObjectStore};
use mts_storage::store::Leased;

use tracing::Instrument;

use crate::Error;
use crate::wire::timestamp;

/// Header telling clients without the `delivery_count` field how often a
/// message has been delivered.
pub const DELIVERY_COUNT_HEADER: &str = "mts-delivery-count";

/// Headers that tell clients without the newer fields about the payload.
pub const PAYLOAD_SIZE_HEADER: &str = "mts-payload-size";
/// Hex SHA-256 of the payload.
pub const PAYLOAD_SHA256_HEADER: &str = "mts-payload-sha256";
/// "true" when the payload was left out; read it with FetchPayload.
pub const PAYLOAD_OMITTED_HEADER: &str = "mts-payload-omitted";

/// How large payloads go out with messages.
#[derive(Debug, Clone, Copy)]
pub struct PayloadLimits {
    /// For clients that ask (`omit_large_payloads`): larger payloads are left
    /// out, to be read with FetchPayload.
    pub omit_above: u64,
    /// For every other client: the largest payload sent inline; a larger one
    /// fails the call, never arriving as an empty `data`.
    pub inline_max: u64,
}

/// What a request asked for, with the server's limits.
#[derive(Debug, Clone, Copy)]
pub struct Payloads {
    /// The server's limits.
    pub limits: PayloadLimits,
    /// Whether the client reads large payloads with FetchPayload.
    pub omit_large: bool,
}

impl Payloads {
    /// Whether the payload of `message` is left out.
    fn omits(self, message: &mts_storage::store::StoredMessage) -> bool {
        self.omit_large && message.object_key.is_some() && message.size > self.limits.omit_above
    }

    /// Whether the payload of `message` is read whole from the object store.
    pub fn reads_whole(self, message: &mts_storage::store::StoredMessage) -> bool {
        message.object_key.is_some() && !self.omits(message)
    }
}

/// Completes a leased message with its payload, or leaves the payload out
/// when the client asked for that and it is large; a payload too large to
/// send inline to a client that did not ask fails with `PayloadTooLarge`.
/// A `deliver` span linked to the publish's, when spans are exported (only
/// then: it is one span per message on the delivery path).
pub async fn deliver(
    object_store: ObjectStore,
    leased: Leased,
    payloads: Payloads,
) -> Result<Message, Error> {
    if !mts_runtime::telemetry::exporting() {
        return complete(object_store, leased, payloads).await;
    }
    let span = tracing::info_span!(
        "deliver",
        subject = %leased.message.subject,
        sequence = leased.message.seq,
        deliveries = leased.deliveries,
    );
    mts_runtime::telemetry::link_to_stored(&span, &leased.message.headers);
    complete(object_store, leased, payloads)
        .instrument(span)
        .await
}

async fn complete(
    object_store: ObjectStore,
    leased: Leased,
    payloads: Payloads,
) -> Result<Message, Error> {
    check_inline_size(&leased.message, payloads)?;
    let read = match &leased.message.object_key {
        Some(key) if payloads.reads_whole(&leased.message) => match object_store.get(key).await {
            Ok(bytes) => Some(bytes),
            Err(object_store::Error::NotFound(_)) => {
                return Err(Error::MissingPayload {
                    subject: leased.message.subject,
                    sequence: leased.message.seq,
                    key: key.clone(),
                });
            }
            Err(err) => return Err(Error::ObjectStore(err)),
        },
        _ => None,
    };
    Ok(assemble(leased, payloads, read))
}

/// The wire message of `leased` when there is nothing to read for it: its
/// payload is inline, or left out.
fn wire_message(leased: Leased, payloads: Payloads) -> Result<Message, Error> {
    check_inline_size(&leased.message, payloads)?;
    Ok(assemble(leased, payloads, None))
}

/// A payload too large to send inline to a client that did not ask for it
/// to be left out fails with `PayloadTooLarge`.
fn check_inline_size(
    stored: &mts_storage::store::StoredMessage,
    payloads: Payloads,
) -> Result<(), Error> {
    if !payloads.omits(stored) && stored.size > payloads.limits.inline_max {
        return Err(Error::PayloadTooLarge {
            subject: stored.subject.clone(),
            sequence: stored.seq,
            size: stored.size,
            limit: payloads.limits.inline_max,
        });
    }
    Ok(())
}

/// The wire message of `leased`, size already checked, with `read` the
/// payload read from the object store when it was offloaded and not left out.
fn assemble(leased: Leased, payloads: Payloads, read: Option<bytes::Bytes>) -> Message {
    let omitted = payloads.omits(&leased.message);
    let stored = leased.message;
    let mut headers = stored.headers;
    headers.insert(DELIVERY_COUNT_HEADER.into(), leased.deliveries.to_string());
    let sha256 = stored.sha256.unwrap_or_default();
    if omitted {
        headers.insert(PAYLOAD_OMITTED_HEADER.into(), "true".into());
        headers.insert(PAYLOAD_SIZE_HEADER.into(), stored.size.to_string());
        headers.insert(PAYLOAD_SHA256_HEADER.into(), sha256.clone());
    }
    let data = match (read, stored.data) {
        _ if omitted => Default::default(),
        (Some(read), _) => read,
        (None, Some(inline)) => inline,
        (None, None) => Default::default(),
    };
    Message {
        subject: stored.subject,
        sequence: stored.seq,
        data,
        headers,
        timestamp: Some(timestamp(stored.ts_ns)),
        delivery_count: leased.deliveries,
        size: stored.size,
        sha256,
        payload_omitted: omitted,
        not_held: None,
    }
}

/// Offloaded payloads read from the object store at once per Fetch.
const PAYLOAD_READS_IN_FLIGHT: usize = 4;
/// The wire messages of a batch, payloads read a few at a time (one at a
/// time when any is large and sent whole, so memory holds one such payload),
/// ending at the first failure so that no later message arrives without an
/// earlier one.
pub(crate) fn wire_messages(
    object_store: ObjectStore,
    batch: Vec<Leased>,
    payloads: Payloads,
) -> impl Stream<Item = Result<Message, Error>> + Send {
    let large = batch.iter().any(|leased| {
        payloads.reads_whole(&leased.message) && leased.message.size > payloads.limits.omit_above
    });
    let in_flight = if large { 1 } else { PAYLOAD_READS_IN_FLIGHT };
    let spans = mts_runtime::telemetry::exporting();
    // Only a payload read from the object store (or a span) takes a future
    // of its own, boxed: an object read's future is large, and the buffer
    // would move it around for every message.
    let messages = futures::stream::iter(batch)
        .map(move |leased| {
            if spans || payloads.reads_whole(&leased.message) {
                Box::pin(deliver(object_store.clone(), leased, payloads)).left_future()
            } else {
                std::future::ready(wire_message(leased, payloads)).right_future()
            }
        })
        .buffered(in_flight);
    messages.scan(false, |failed, item| {
        let out = if *failed { None } else { Some(item) };
        if let Some(Err(_)) = &out {
            *failed = true;
        }
        std::future::ready(out)
    })
}
