//! Validation of what clients send: subjects, durable names and headers. Each
//! failure names the field and says why, so a person can fix the request.

use std::collections::HashMap;

/// Longest subject, in bytes.
pub const MAX_SUBJECT_BYTES: usize = 255;
/// Longest durable consumer name, in bytes.
pub const MAX_DURABLE_BYTES: usize = 128;
/// Most headers on one message.
pub const MAX_HEADERS: usize = 64;
/// Most bytes of header names and values together on one message.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Header names starting with this (in any case) are the service's own:
/// consumers trust them (`mts-payload-omitted`, `mts-delivery-count`, …), so
/// publishers may not set them.
pub const RESERVED_HEADER_PREFIX: &str = "mts-";

/// A request field that breaks a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Error {
    /// The field as the client named it (`subject`, `durable_name`, ...).
    pub field: &'static str,
    /// Why it was refused, in words a person can act on.
    pub reason: String,
}

impl Error {
    /// A violation of `field` for `reason`.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// Checks a subject: 1–255 bytes of printable ASCII without whitespace,
/// `*` or `>` (reserved for wildcards).
pub fn subject(value: &str) -> Result<(), Error> {
    name("subject", value, MAX_SUBJECT_BYTES)
}

/// Checks a durable consumer name: the subject rules, at most 128 bytes.
pub fn durable_name(value: &str) -> Result<(), Error> {
    name("durable_name", value, MAX_DURABLE_BYTES)
}

fn name(field: &'static str, value: &str, max: usize) -> Result<(), Error> {
    if value.is_empty() {
        return Err(Error::new(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(Error::new(
            field,
            format!("is {} bytes long; the limit is {max}", value.len()),
        ));
    }
    if let Some((at, c)) = value
        .char_indices()
        .find(|(_, c)| !c.is_ascii_graphic() || *c == '*' || *c == '>')
    {
        let why = match c {
            '*' | '>' => format!("'{c}' at byte {at} is reserved for wildcards"),
            c if c.is_whitespace() => format!("whitespace at byte {at} is not allowed"),
            c => format!(
                "{:?} at byte {at} is not printable ASCII (use letters, digits and punctuation such as . - _ /)",
                c
            ),
        };
        return Err(Error::new(field, why));
    }
    Ok(())
}

/// Checks the header count and total size.
pub fn headers(headers: &HashMap<String, String>) -> Result<(), Error> {
    if headers.len() > MAX_HEADERS {
        return Err(Error::new(
            "headers",
            format!("{} headers; the limit is {MAX_HEADERS}", headers.len()),
        ));
    }
    let total: usize = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_HEADER_BYTES {
        return Err(Error::new(
            "headers",
            format!("{total} bytes of names and values; the limit is {MAX_HEADER_BYTES}"),
        ));
    }
    if headers.keys().any(String::is_empty) {
        return Err(Error::new("headers", "a header name must not be empty"));
    }
    let reserved = headers.keys().find(|name| {
        name.get(..RESERVED_HEADER_PREFIX.len())
            .is_some_and(|start| start.eq_ignore_ascii_case(RESERVED_HEADER_PREFIX))
    });
    if let Some(name) = reserved {
        return Err(Error::new(
            "headers",
            format!(
                "header {name:?} is reserved: names starting with {RESERVED_HEADER_PREFIX:?} are set by the service itself"
            ),
        ));
    }
    Ok(())
}

/// Checks a payload's size against the configured limit.
pub fn payload_size(len: usize, max: usize) -> Result<(), Error> {
    if len > max {
        return Err(Error::new(
            "data",
            format!("payload is {len} bytes; the limit is {max} bytes"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_subjects() {
        for ok in ["a", "orders.created", "a-b_c/d.e", "X9", &"s".repeat(255)] {
            assert_eq!(subject(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn refuses_bad_subjects_with_reason() {
        let cases = [
            ("", "must not be empty"),
            ("a b", "whitespace"),
            ("a\tb", "whitespace"),
            ("orders.*", "reserved for wildcards"),
            ("orders.>", "reserved for wildcards"),
            ("caf\u{e9}", "not printable ASCII"),
            ("a\u{7}", "not printable ASCII"),
        ];
        for (bad, why) in cases {
            let err = subject(bad).expect_err(bad);
            assert_eq!(err.field, "subject");
            assert!(err.reason.contains(why), "{bad:?}: {}", err.reason);
        }
        let long = "s".repeat(256);
        assert!(subject(&long).unwrap_err().reason.contains("limit is 255"));
    }

    #[test]
    fn durable_names_have_their_own_limit() {
        assert_eq!(durable_name(&"d".repeat(128)), Ok(()));
        let err = durable_name(&"d".repeat(129)).unwrap_err();
        assert_eq!(err.field, "durable_name");
        assert!(err.reason.contains("limit is 128"));
        assert_eq!(durable_name("").unwrap_err().field, "durable_name");
    }

    #[test]
    fn header_limits() {
        let mut many = HashMap::new();
        for i in 0..64 {
            many.insert(format!("k{i}"), "v".into());
        }
        assert_eq!(headers(&many), Ok(()));
        many.insert("k64".into(), "v".into());
        assert!(headers(&many).unwrap_err().reason.contains("65 headers"));

        let big = HashMap::from([("k".to_string(), "v".repeat(MAX_HEADER_BYTES))]);
        assert!(headers(&big).unwrap_err().reason.contains("bytes of names"));
        let exact = HashMap::from([("k".to_string(), "v".repeat(MAX_HEADER_BYTES - 1))]);
        assert_eq!(headers(&exact), Ok(()));

        let unnamed = HashMap::from([(String::new(), "v".to_string())]);
        assert_eq!(headers(&unnamed).unwrap_err().field, "headers");
    }

    #[test]
    fn reserved_headers_are_refused_by_name() {
        for name in ["mts-payload-omitted", "MTS-Delivery-Count", "mts-"] {
            let forged = HashMap::from([(name.to_string(), "true".to_string())]);
            let err = headers(&forged).unwrap_err();
            assert_eq!(err.field, "headers");
            assert!(err.reason.contains(name), "{name}: {}", err.reason);
            assert!(err.reason.contains("reserved"), "{}", err.reason);
        }
        for allowed in ["mts", "my-mts-header", "mtsx", "\u{e9}t\u{e9}"] {
            let fine = HashMap::from([(allowed.to_string(), "v".to_string())]);
            assert_eq!(headers(&fine), Ok(()), "{allowed}");
        }
    }

    #[test]
    fn payload_limit() {
        assert_eq!(payload_size(0, 10), Ok(()));
        assert_eq!(payload_size(10, 10), Ok(()));
        assert_eq!(payload_size(11, 10).unwrap_err().field, "data");
    }
}
