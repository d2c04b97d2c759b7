//! The W3C trace context a publish stores with its message, so that
//! consumers can link their spans to the publish.

use std::collections::HashMap;

/// The W3C trace context (`traceparent`, and `tracestate` with it) to store
/// with the message so that consumers can link to the publish: the publish
/// span's when spans are exported, else the caller's as it came. Malformed
/// values are ignored; headers the publisher set win.
pub(crate) fn trace_context(metadata: &tonic::metadata::MetadataMap) -> Vec<(String, String)> {
    if mts_runtime::telemetry::exporting() {
        let exported = mts_runtime::telemetry::context_of(&tracing::Span::current());
        if !exported.is_empty() {
            return exported;
        }
    }
    let get = |name: &str| {
        metadata
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let Some(parent) = get("traceparent").filter(|v| valid_traceparent(v)) else {
        return Vec::new();
    };
    let mut context = vec![("traceparent".to_owned(), parent)];
    if let Some(state) = get("tracestate").filter(|v| v.len() <= 512) {
        context.push(("tracestate".to_owned(), state));
    }
    context
}

/// `version-traceid-parentid-flags`, all lowercase hex: 2-32-16-2.
fn valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    parts.len() == 4
        && parts.iter().zip([2, 32, 16, 2]).all(|(part, len)| {
            part.len() == len
                && part
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// Adds the trace context to headers that do not have it yet.
pub(crate) fn with_trace(headers: &mut HashMap<String, String>, context: Vec<(String, String)>) {
    for (name, value) in context {
        headers.entry(name).or_insert(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_trace_context_is_kept() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        metadata.insert("traceparent", parent.parse().unwrap());
        metadata.insert("tracestate", "vendor=value".parse().unwrap());
        assert_eq!(
            trace_context(&metadata),
            vec![
                ("traceparent".into(), parent.into()),
                ("tracestate".into(), "vendor=value".into())
            ]
        );
        for bad in [
            "00-xyz-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "junk",
        ] {
            let mut metadata = tonic::metadata::MetadataMap::new();
            metadata.insert("traceparent", bad.parse().unwrap());
            assert!(trace_context(&metadata).is_empty(), "{bad}");
        }
        let mut headers = HashMap::from([("traceparent".to_string(), "mine".to_string())]);
        with_trace(&mut headers, vec![("traceparent".into(), parent.into())]);
        assert_eq!(
            headers["traceparent"], "mine",
            "the publisher's own header wins"
        );
    }
}
