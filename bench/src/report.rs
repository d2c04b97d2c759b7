//! Figures every scenario reports: counts, throughput, an HDR histogram of
//! latencies, and the server processes' memory and CPU.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::process::{Services, Usage, round};

/// Errors printed in full; later ones are only counted.
const ERRORS_SHOWN: usize = 5;

/// Whether a request succeeded; see `failed`.
pub fn succeeded<T, E: std::fmt::Display>(result: Result<T, E>) -> bool {
    result.map_or_else(failed, |_| true)
}

/// Always false: a request failed with `err`. The first few failures go to
/// stderr, so a run with errors says what they were.
pub fn failed(err: impl std::fmt::Display) -> bool {
    static SHOWN: AtomicUsize = AtomicUsize::new(0);
    if SHOWN.fetch_add(1, Ordering::Relaxed) < ERRORS_SHOWN {
        eprintln!("mts-bench: request failed: {err}");
    }
    false
}

/// Latencies in microseconds, 1 µs to 10 min, 3 significant digits.
pub struct Latencies(Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        Self(Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds"))
    }
}

impl Latencies {
    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.0.saturating_record(micros.max(1));
    }

    pub fn add(&mut self, other: &Self) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    /// p50, p90, p99 and max in milliseconds.
    pub fn summary(&self) -> Value {
        let ms = |micros: u64| round(micros as f64 / 1000.0, 3);
        json!({
            "p50": ms(self.0.value_at_quantile(0.50)),
            "p90": ms(self.0.value_at_quantile(0.90)),
            "p99": ms(self.0.value_at_quantile(0.99)),
            "max": ms(self.0.max()),
        })
    }
}

/// What one run of one system in one scenario measured.
pub struct Run<'a> {
    pub scenario: &'a str,
    pub system: &'a str,
    pub config: Value,
    pub messages: u64,
    pub errors: u64,
    pub bytes_per_message: u64,
    pub elapsed: Duration,
    pub latencies: &'a Latencies,
}

impl Run<'_> {
    /// The JSON line for this run; `processes` measured since `before`.
    pub fn to_json(&self, services: &Services, before: &[Usage]) -> Value {
        let seconds = self.elapsed.as_secs_f64().max(f64::EPSILON);
        let msg_per_s = self.messages as f64 / seconds;
        json!({
            "scenario": self.scenario,
            "system": self.system,
            "config": self.config,
            "messages": self.messages,
            "errors": self.errors,
            "seconds": round(seconds, 2),
            "msg_per_s": round(msg_per_s, 1),
            "mb_per_s": round(msg_per_s * self.bytes_per_message as f64 / 1e6, 2),
            "latency_ms": self.latencies.summary(),
            "processes": services.figures_since(before),
        })
    }
}

/// `size` bytes whose first 8 hold the send time (ns since the Unix epoch),
/// so a receiver can tell how long the message took.
pub fn stamped(size: usize) -> bytes::Bytes {
    let mut data = vec![0u8; size.max(8)];
    data[..8].copy_from_slice(&now_ns().to_le_bytes());
    data.into()
}

/// How long ago the time stamped in `data` was.
pub fn age(data: &[u8]) -> Option<Duration> {
    let sent = u64::from_le_bytes(data.get(..8)?.try_into().ok()?);
    Some(Duration::from_nanos(now_ns().saturating_sub(sent)))
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_what_was_recorded() {
        let mut latencies = Latencies::default();
        for ms in 1..=100 {
            latencies.record(Duration::from_millis(ms));
        }
        let summary = latencies.summary();
        assert!(
            (summary["p50"].as_f64().unwrap() - 50.0).abs() < 0.1,
            "{summary}"
        );
        assert!(
            (summary["p99"].as_f64().unwrap() - 99.0).abs() < 0.1,
            "{summary}"
        );
        assert!(
            (summary["max"].as_f64().unwrap() - 100.0).abs() < 0.1,
            "{summary}"
        );
    }

    #[test]
    fn a_stamp_tells_its_age() {
        let data = stamped(1024);
        assert_eq!(data.len(), 1024);
        assert!(age(&data).unwrap() < Duration::from_secs(1));
    }
}
