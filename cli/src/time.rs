//! Times as people write them (RFC 3339) and as the wire carries them.

use std::time::SystemTime;

/// `2026-11-30T08:00:00Z` (or with an offset) as a time.
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let timestamp: prost_types::Timestamp = text.parse().ok()?;
    SystemTime::try_from(timestamp).ok()
}

/// A wire timestamp in RFC 3339, UTC.
pub fn format(timestamp: Option<&prost_types::Timestamp>) -> String {
    timestamp.map(ToString::to_string).unwrap_or_default()
}

/// A time in RFC 3339, UTC.
pub fn format_system(time: Option<SystemTime>) -> String {
    time.map(|time| prost_types::Timestamp::from(time).to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_go_both_ways() {
        let time = parse_rfc3339("2026-11-30T08:00:00Z").unwrap();
        assert_eq!(format_system(Some(time)), "2026-11-30T08:00:00Z");
        assert_eq!(
            parse_rfc3339("2026-11-30T09:00:00+01:00"),
            Some(time),
            "offsets count"
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
