//! What commands print: `key=value` lines for people, JSON with `--json`.

use base64::Engine;
use mts_client::wire::{ConsumerInfo, DeliverPolicy, SubjectInfo};
use mts_client::{Delivery, Published};
use serde_json::{Value, json};

use crate::time;

/// Prints `value` as one JSON line, or `line` for people.
pub fn emit(json: bool, value: Value, line: impl FnOnce() -> String) {
    if json {
        println!("{value}");
    } else {
        println!("{}", line());
    }
}

/// Prints `items` as one JSON array, or as a table under `header`.
pub fn list<T>(
    json: bool,
    items: &[T],
    to_json: impl Fn(&T) -> Value,
    header: &str,
    row: impl Fn(&T) -> String,
) {
    if json {
        println!("{}", Value::Array(items.iter().map(to_json).collect()));
    } else {
        println!("{header}");
        for item in items {
            println!("{}", row(item));
        }
    }
}

pub fn published(published: &Published) -> Value {
    json!({
        "sequence": published.sequence,
        "duplicate": published.duplicate,
        "size": published.size,
        "sha256": published.sha256,
        "message_id": published.message_id,
    })
}

pub fn published_line(published: &Published) -> String {
    format!(
        "sequence={} size={} sha256={} duplicate={} message_id={}",
        published.sequence,
        published.size,
        published.sha256,
        published.duplicate,
        published.message_id
    )
}

/// A received message: its metadata, what became of it and, when printed,
/// its payload.
pub fn delivery(delivery: &Delivery, outcome: &Value, with_data: bool) -> Value {
    let mut value = json!({
        "subject": delivery.subject,
        "sequence": delivery.sequence,
        "size": delivery.size,
        "sha256": delivery.sha256,
        "delivery_count": delivery.delivery_count,
        "timestamp": time::format_system(delivery.timestamp),
        "headers": delivery.headers,
        "outcome": outcome,
    });
    if with_data {
        value["data"] = match std::str::from_utf8(&delivery.data) {
            Ok(text) => json!(text),
            Err(_) => json!({
                "base64": base64::engine::general_purpose::STANDARD.encode(&delivery.data)
            }),
        };
    }
    value
}

/// `sequence=… size=… sha256=…` and the publisher's headers.
pub fn delivery_line(delivery: &Delivery) -> String {
    let mut line = format!(
        "sequence={} size={} sha256={} delivery_count={}",
        delivery.sequence, delivery.size, delivery.sha256, delivery.delivery_count
    );
    let mut headers: Vec<_> = delivery
        .headers
        .iter()
        .filter(|(name, _)| !name.starts_with("mts-"))
        .collect();
    headers.sort();
    for (name, value) in headers {
        line.push_str(&format!(" {name}={value}"));
    }
    line
}

fn deliver_policy(policy: i32) -> &'static str {
    match DeliverPolicy::try_from(policy) {
        Ok(DeliverPolicy::DeliverNew) => "new",
        Ok(DeliverPolicy::DeliverByStartSequence) => "sequence",
        Ok(DeliverPolicy::DeliverByStartTime) => "time",
        _ => "all",
    }
}

pub fn consumer(info: &ConsumerInfo) -> Value {
    let config = info.config.clone().unwrap_or_default();
    json!({
        "subject": info.subject,
        "durable_name": info.durable_name,
        "config": {
            "ack_wait_ms": config.ack_wait_ms,
            "max_deliver": config.max_deliver,
            "max_ack_pending": config.max_ack_pending,
            "deliver_policy": deliver_policy(config.deliver_policy),
            "start_sequence": config.start_sequence,
            "start_time": time::format(config.start_time.as_ref()),
            "dead_letter_subject": config.dead_letter_subject,
            "inactive_threshold_ms": config.inactive_threshold_ms,
        },
        "created": time::format(info.created.as_ref()),
        "ack_floor": info.ack_floor,
        "last_delivered": info.last_delivered,
        "last_sequence": info.last_sequence,
        "num_pending": info.num_pending,
        "num_ack_pending": info.num_ack_pending,
        "num_redelivered": info.num_redelivered,
        "num_rejected": info.num_rejected,
        "oldest_unacked_age_ms": info.oldest_unacked_age_ms,
        "last_active": time::format(info.last_active.as_ref()),
    })
}

pub fn consumer_row(info: &ConsumerInfo) -> String {
    format!(
        "{:<40} {:<20} {:>10} {:>10} {:>10} {:>12}",
        info.subject,
        info.durable_name,
        info.ack_floor,
        info.num_pending,
        info.num_ack_pending,
        info.oldest_unacked_age_ms
    )
}

pub const CONSUMER_HEADER: &str = "SUBJECT                                  DURABLE               ACK_FLOOR    PENDING   UNACKED  OLDEST_MS";

/// Every field, one `name: value` per line, from the JSON form.
pub fn fields(value: &Value) -> String {
    let mut lines = Vec::new();
    flatten("", value, &mut lines);
    lines.join("\n")
}

fn flatten(prefix: &str, value: &Value, lines: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (name, inner) in map {
                let name = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}.{name}")
                };
                flatten(&name, inner, lines);
            }
        }
        Value::Null => lines.push(format!("{prefix}: (default)")),
        Value::String(text) => lines.push(format!("{prefix}: {text}")),
        other => lines.push(format!("{prefix}: {other}")),
    }
}

pub fn subject(info: &SubjectInfo) -> Value {
    let limits = info.limits.clone().unwrap_or_default();
    json!({
        "subject": info.subject,
        "first_sequence": info.first_sequence,
        "last_sequence": info.last_sequence,
        "messages": info.messages,
        "bytes": info.bytes,
        "cold_messages": info.cold_messages,
        "cold_bytes": info.cold_bytes,
        "num_consumers": info.num_consumers,
        "limits": {
            "max_age_ms": limits.max_age_ms,
            "max_messages": limits.max_messages,
            "max_bytes": limits.max_bytes,
            "discard": limits.discard,
        },
    })
}

pub fn subject_row(info: &SubjectInfo) -> String {
    format!(
        "{:<40} {:>10} {:>10} {:>10} {:>14} {:>9}",
        info.subject,
        info.first_sequence,
        info.last_sequence,
        info.messages,
        info.bytes,
        info.num_consumers
    )
}

pub const SUBJECT_HEADER: &str = "SUBJECT                                       FIRST       LAST   MESSAGES          BYTES CONSUMERS";
