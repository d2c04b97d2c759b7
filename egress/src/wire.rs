//! The egress's conversions between the wire and the store: consumer
//! settings (checked as a client sends them) and state, subject limits and
//! state, and timestamps.

use mts_proto::pb::{
    ConsumerConfig, ConsumerInfo, DeliverPolicy as WirePolicy, SubjectInfo, SubjectLimits,
};
use mts_runtime::validate;
use mts_storage::store::{
    ConsumerSettings, ConsumerState, DeliverPolicy, Discard, Limits, SubjectState,
};

/// Longest lease a consumer may ask for.
const MAX_ACK_WAIT_MS: u32 = 12 * 60 * 60 * 1000;
/// Shortest lease: anything less redelivers before a client could answer.
const MIN_ACK_WAIT_MS: u32 = 10;
/// Highest `max_ack_pending`; bounded so one fetch stays a short transaction.
const MAX_ACK_PENDING: u32 = 100_000;
/// Shortest inactivity threshold: well above how often an open stream
/// records its use (see consume.rs `TOUCH_EVERY`), so an idle but connected
/// consumer is never taken for an unused one.
pub const MIN_INACTIVE_THRESHOLD_MS: u64 = 60_000;
/// Longest inactivity threshold: a year.
const MAX_INACTIVE_THRESHOLD_MS: u64 = 365 * 24 * 3600 * 1000;

/// Checks `config` for `subject` and turns it into store settings.
pub fn consumer_settings(
    subject: &str,
    config: Option<ConsumerConfig>,
) -> Result<ConsumerSettings, validate::Error> {
    let config = config.unwrap_or_default();
    if let Some(ms) = config.ack_wait_ms
        && !(MIN_ACK_WAIT_MS..=MAX_ACK_WAIT_MS).contains(&ms)
    {
        return Err(validate::Error::new(
            "config.ack_wait_ms",
            format!("{ms} is outside {MIN_ACK_WAIT_MS}..={MAX_ACK_WAIT_MS}"),
        ));
    }
    if let Some(n) = config.max_ack_pending
        && n > MAX_ACK_PENDING
    {
        return Err(validate::Error::new(
            "config.max_ack_pending",
            format!("{n} is above the limit of {MAX_ACK_PENDING} (0 means unlimited)"),
        ));
    }
    if let Some(ms) = config.inactive_threshold_ms
        && ms != 0
        && !(MIN_INACTIVE_THRESHOLD_MS..=MAX_INACTIVE_THRESHOLD_MS).contains(&ms)
    {
        return Err(validate::Error::new(
            "config.inactive_threshold_ms",
            format!(
                "{ms} is outside {MIN_INACTIVE_THRESHOLD_MS}..={MAX_INACTIVE_THRESHOLD_MS} (0 keeps the consumer however long it is unused)"
            ),
        ));
    }
    if let Some(dlq) = config.dead_letter_subject.as_deref()
        && !dlq.is_empty()
    {
        validate::subject(dlq)
            .map_err(|e| validate::Error::new("config.dead_letter_subject", e.reason))?;
        if dlq == subject {
            return Err(validate::Error::new(
                "config.dead_letter_subject",
                "must differ from the subject itself",
            ));
        }
    }
    let policy = match WirePolicy::try_from(config.deliver_policy) {
        Ok(WirePolicy::Unspecified) => None,
        Ok(WirePolicy::DeliverAll) => Some(DeliverPolicy::All),
        Ok(WirePolicy::DeliverNew) => Some(DeliverPolicy::New),
        Ok(WirePolicy::DeliverByStartSequence) => Some(DeliverPolicy::ByStartSequence),
        Ok(WirePolicy::DeliverByStartTime) => Some(DeliverPolicy::ByStartTime),
        Err(_) => {
            return Err(validate::Error::new(
                "config.deliver_policy",
                format!("{} is not a known policy", config.deliver_policy),
            ));
        }
    };
    let mut settings = ConsumerSettings {
        ack_wait_ms: config.ack_wait_ms,
        max_deliver: config.max_deliver,
        max_ack_pending: config.max_ack_pending,
        deliver_policy: policy,
        start_seq: None,
        start_time_ns: None,
        dlq_subject: config.dead_letter_subject,
        start_after: None,
        inactive_threshold_ms: config.inactive_threshold_ms,
    };
    match policy {
        Some(DeliverPolicy::ByStartSequence) => {
            if config.start_sequence == 0 {
                return Err(validate::Error::new(
                    "config.start_sequence",
                    "DELIVER_BY_START_SEQUENCE needs a start_sequence of at least 1",
                ));
            }
            settings.start_seq = Some(config.start_sequence);
        }
        Some(DeliverPolicy::ByStartTime) => {
            let time = config.start_time.ok_or_else(|| {
                validate::Error::new(
                    "config.start_time",
                    "DELIVER_BY_START_TIME needs a start_time",
                )
            })?;
            settings.start_time_ns = Some(time_ns(&time, "config.start_time")?);
        }
        _ => {}
    }
    Ok(settings)
}

/// A start time as nanoseconds since the Unix epoch, the store's clock:
/// from 1970 to 2554, when that count runs out of 64 bits.
/// A wire time as ns since the Unix epoch, in the store's range; `field`
/// names it in the refusal.
pub fn time_ns(time: &prost_types::Timestamp, field: &'static str) -> Result<u64, validate::Error> {
    let nanos = u64::try_from(time.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .ok_or_else(|| {
            validate::Error::new(
                field,
                format!("nanos {} is outside 0..=999999999", time.nanos),
            )
        })?;
    let seconds = u64::try_from(time.seconds).map_err(|_| {
        validate::Error::new(
            field,
            format!("{} seconds is before 1970-01-01T00:00:00Z", time.seconds),
        )
    })?;
    seconds
        .checked_mul(1_000_000_000)
        .and_then(|ns| ns.checked_add(nanos))
        .ok_or_else(|| {
            validate::Error::new(
                field,
                format!(
                    "{seconds} seconds since 1970 is after 2554-07-21T23:34:33Z, the latest time the store can hold"
                ),
            )
        })
}

/// The wire form of a consumer's state.
pub fn consumer_info(state: ConsumerState, created_now: bool) -> ConsumerInfo {
    let policy = match DeliverPolicy::from_name(&state.deliver_policy) {
        Some(DeliverPolicy::All) | None => WirePolicy::DeliverAll,
        Some(DeliverPolicy::New) => WirePolicy::DeliverNew,
        Some(DeliverPolicy::ByStartSequence) => WirePolicy::DeliverByStartSequence,
        Some(DeliverPolicy::ByStartTime) => WirePolicy::DeliverByStartTime,
    };
    let clamp = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    ConsumerInfo {
        subject: state.subject,
        durable_name: state.durable,
        config: Some(ConsumerConfig {
            ack_wait_ms: Some(clamp(state.ack_wait_ms)),
            max_deliver: Some(clamp(state.max_deliver)),
            max_ack_pending: Some(clamp(state.max_ack_pending)),
            deliver_policy: policy.into(),
            start_sequence: state.start_seq,
            start_time: (state.start_time_ns > 0).then(|| timestamp(state.start_time_ns)),
            dead_letter_subject: Some(state.dlq_subject),
            inactive_threshold_ms: Some(state.inactive_threshold_ms),
        }),
        created: Some(timestamp(state.created_ns)),
        ack_floor: state.ack_floor,
        last_delivered: state.last_delivered,
        num_pending: state.num_pending,
        num_ack_pending: state.num_ack_pending,
        num_redelivered: state.num_redelivered,
        num_rejected: state.num_rejected,
        oldest_unacked_age_ms: state.oldest_unacked_age_ns / 1_000_000,
        last_sequence: state.last_seq,
        created_now,
        last_active: (state.active_ns > 0).then(|| timestamp(state.active_ns)),
    }
}

/// A protobuf timestamp from nanoseconds since the Unix epoch.
pub fn timestamp(ns: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(ns / 1_000_000_000).unwrap_or(i64::MAX),
        nanos: i32::try_from(ns % 1_000_000_000).unwrap_or(0),
    }
}

/// The wire form of what is stored for a subject.
pub fn subject_info(state: SubjectState) -> SubjectInfo {
    SubjectInfo {
        subject: state.subject,
        first_sequence: state.first_seq,
        last_sequence: state.last_seq,
        messages: state.count,
        bytes: state.bytes,
        limits: Some(SubjectLimits {
            max_age_ms: state.limits.max_age_ms,
            max_messages: state.limits.max_messages,
            max_bytes: state.limits.max_bytes,
            discard: state.limits.discard.map(|d| d.as_str().to_owned()),
        }),
        cold_messages: state.cold_count,
        cold_bytes: state.cold_bytes,
        num_consumers: state.consumers,
    }
}

/// Subject limits as the store takes them.
pub fn limits(limits: SubjectLimits) -> Result<Limits, validate::Error> {
    let discard = match limits.discard.as_deref() {
        None => None,
        Some(name) => Some(Discard::from_name(name).ok_or_else(|| {
            validate::Error::new(
                "limits.discard",
                format!(
                    "{name:?} is not a discard policy: use \"new\" (refuse publishes while the hot tier is full) or \"old\" (evict the subject's oldest hot messages)"
                ),
            )
        })?),
    };
    Ok(Limits {
        max_age_ms: limits.max_age_ms,
        max_messages: limits.max_messages,
        max_bytes: limits.max_bytes,
        discard,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ConsumerConfig {
        ConsumerConfig::default()
    }

    #[test]
    fn empty_config_keeps_defaults() {
        assert_eq!(
            consumer_settings("s", None).unwrap(),
            ConsumerSettings::default()
        );
    }

    #[test]
    fn refuses_out_of_range_settings_naming_the_field() {
        let cases = [
            (
                ConsumerConfig {
                    ack_wait_ms: Some(5),
                    ..config()
                },
                "config.ack_wait_ms",
            ),
            (
                ConsumerConfig {
                    ack_wait_ms: Some(MAX_ACK_WAIT_MS + 1),
                    ..config()
                },
                "config.ack_wait_ms",
            ),
            (
                ConsumerConfig {
                    max_ack_pending: Some(MAX_ACK_PENDING + 1),
                    ..config()
                },
                "config.max_ack_pending",
            ),
            (
                ConsumerConfig {
                    dead_letter_subject: Some("s".into()),
                    ..config()
                },
                "config.dead_letter_subject",
            ),
            (
                ConsumerConfig {
                    dead_letter_subject: Some("bad dlq".into()),
                    ..config()
                },
                "config.dead_letter_subject",
            ),
            (
                ConsumerConfig {
                    deliver_policy: 99,
                    ..config()
                },
                "config.deliver_policy",
            ),
            (
                ConsumerConfig {
                    deliver_policy: WirePolicy::DeliverByStartSequence.into(),
                    ..config()
                },
                "config.start_sequence",
            ),
            (
                ConsumerConfig {
                    deliver_policy: WirePolicy::DeliverByStartTime.into(),
                    ..config()
                },
                "config.start_time",
            ),
        ];
        for (config, field) in cases {
            assert_eq!(
                consumer_settings("s", Some(config.clone()))
                    .unwrap_err()
                    .field,
                field,
                "{config:?}"
            );
        }
    }

    #[test]
    fn start_points_and_an_empty_dlq_pass_through() {
        let by_seq = consumer_settings(
            "s",
            Some(ConsumerConfig {
                deliver_policy: WirePolicy::DeliverByStartSequence.into(),
                start_sequence: 7,
                dead_letter_subject: Some(String::new()),
                ..config()
            }),
        )
        .unwrap();
        assert_eq!(by_seq.start_seq, Some(7));
        assert_eq!(by_seq.dlq_subject.as_deref(), Some(""));
        let by_time = consumer_settings(
            "s",
            Some(ConsumerConfig {
                deliver_policy: WirePolicy::DeliverByStartTime.into(),
                start_time: Some(prost_types::Timestamp {
                    seconds: 2,
                    nanos: 5,
                }),
                ..config()
            }),
        )
        .unwrap();
        assert_eq!(by_time.start_time_ns, Some(2_000_000_005));
    }

    #[test]
    fn start_times_outside_the_stores_clock_say_why() {
        let at = |seconds, nanos| {
            consumer_settings(
                "s",
                Some(ConsumerConfig {
                    deliver_policy: WirePolicy::DeliverByStartTime.into(),
                    start_time: Some(prost_types::Timestamp { seconds, nanos }),
                    ..config()
                }),
            )
        };
        // 9999-12-31T23:59:59Z
        let far = at(253_402_300_799, 0).unwrap_err();
        assert_eq!(far.field, "config.start_time");
        assert!(far.reason.contains("after 2554-07-21"), "{}", far.reason);
        let early = at(-1, 0).unwrap_err();
        assert!(early.reason.contains("before 1970"), "{}", early.reason);
        let bad_nanos = at(1, 1_000_000_000).unwrap_err();
        assert!(bad_nanos.reason.contains("nanos"), "{}", bad_nanos.reason);
        // The last representable second still works.
        assert!(at(18_446_744_072, 0).is_ok());
    }
}
