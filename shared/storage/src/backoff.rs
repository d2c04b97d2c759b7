//! Jitter for retry delays, so that replicas that lost a dependency at the
//! same moment do not all come back at the same moment.

use std::time::Duration;

/// `delay` scaled by a random factor between 0.5 and 1.5.
pub fn jittered(delay: Duration) -> Duration {
    delay.mul_f64(rand::random_range(0.5..=1.5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_within_half_to_one_and_a_half_times() {
        let base = Duration::from_millis(100);
        let delays: Vec<Duration> = (0..200).map(|_| jittered(base)).collect();
        assert!(delays.iter().all(|d| *d >= base / 2 && *d <= base * 3 / 2));
        assert!(delays.iter().any(|d| *d != delays[0]), "delays vary");
    }
}
