//! Turning a leased message into a wire message: the payload (inline, or
//! read from the object store), headers, commit time and delivery count.

use mts_proto::pb::Message;
use mts_shared::blob::{self, BlobStore};
use mts_shared::store::Leased;

use tracing::Instrument;

use crate::Error;

/// Header telling clients without the `delivery_count` field how often a
/// message has been delivered.
pub const DELIVERY_COUNT_HEADER: &str = "mts-delivery-count";

/// A protobuf timestamp from nanoseconds since the Unix epoch.
pub fn timestamp(ns: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(ns / 1_000_000_000).unwrap_or(i64::MAX),
        nanos: i32::try_from(ns % 1_000_000_000).unwrap_or(0),
    }
}

/// Headers that tell clients without the newer fields about the payload.
pub const PAYLOAD_SIZE_HEADER: &str = "mts-payload-size";
/// Hex SHA-256 of the payload.
pub const PAYLOAD_SHA256_HEADER: &str = "mts-payload-sha256";
/// "true" when the payload was left out; read it with FetchPayload.
pub const PAYLOAD_OMITTED_HEADER: &str = "mts-payload-omitted";

/// Completes a leased message with its payload, or marks the payload as
/// left out when it is larger than `max_inline` bytes.
/// A `deliver` span linked to the publish's, when spans are exported (only
/// then: it is one span per message on the delivery path).
pub async fn deliver(blobs: BlobStore, leased: Leased, max_inline: u64) -> Result<Message, Error> {
    if !mts_shared::telemetry::exporting() {
        return complete(blobs, leased, max_inline).await;
    }
    let span = tracing::info_span!(
        "deliver",
        subject = %leased.message.subject,
        sequence = leased.message.seq,
        deliveries = leased.deliveries,
    );
    mts_shared::telemetry::link_to_stored(&span, &leased.message.headers);
    complete(blobs, leased, max_inline).instrument(span).await
}

async fn complete(blobs: BlobStore, leased: Leased, max_inline: u64) -> Result<Message, Error> {
    let stored = leased.message;
    let mut headers = stored.headers;
    headers.insert(DELIVERY_COUNT_HEADER.into(), leased.deliveries.to_string());
    let sha256 = stored.sha256.unwrap_or_default();
    let omitted = stored.object_key.is_some() && stored.size > max_inline;
    if omitted {
        headers.insert(PAYLOAD_OMITTED_HEADER.into(), "true".into());
        headers.insert(PAYLOAD_SIZE_HEADER.into(), stored.size.to_string());
        headers.insert(PAYLOAD_SHA256_HEADER.into(), sha256.clone());
    }
    let data = match (&stored.object_key, stored.data) {
        _ if omitted => Default::default(),
        (Some(key), _) => match blobs.get(key).await {
            Ok(bytes) => bytes,
            Err(blob::Error::NotFound(_)) => {
                return Err(Error::MissingPayload {
                    subject: stored.subject,
                    sequence: stored.seq,
                    key: key.clone(),
                });
            }
            Err(err) => return Err(Error::Blob(err)),
        },
        (None, Some(inline)) => inline.into_vec().into(),
        (None, None) => Default::default(),
    };
    Ok(Message {
        subject: stored.subject,
        sequence: stored.seq,
        data,
        headers,
        timestamp: Some(timestamp(stored.ts_ns)),
        delivery_count: leased.deliveries,
        size: stored.size,
        sha256,
        payload_omitted: omitted,
    })
}
