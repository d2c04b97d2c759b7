//! Turning a leased message into a wire message: the payload (inline, or
//! read from the object store), headers, commit time and delivery count.

use mts_proto::pb::Message;
use mts_shared::blob::{self, BlobStore};
use mts_shared::store::Leased;

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

/// Completes a leased message with its payload.
pub async fn deliver(blobs: BlobStore, leased: Leased) -> Result<Message, Error> {
    let stored = leased.message;
    let data = match (&stored.object_key, stored.data) {
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
    let mut headers = stored.headers;
    headers.insert(DELIVERY_COUNT_HEADER.into(), leased.deliveries.to_string());
    Ok(Message {
        subject: stored.subject,
        sequence: stored.seq,
        data,
        headers,
        timestamp: Some(timestamp(stored.ts_ns)),
        delivery_count: leased.deliveries,
    })
}
