//! A progress line on standard error, shown only when it is a terminal.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    label: String,
    total: Option<u64>,
    done: u64,
    shown_at: Instant,
    visible: bool,
}

impl Progress {
    pub fn new(label: impl Into<String>, total: Option<u64>) -> Self {
        Self {
            label: label.into(),
            total,
            done: 0,
            shown_at: Instant::now(),
            visible: std::io::stderr().is_terminal(),
        }
    }

    pub fn advance(&mut self, bytes: u64) {
        self.done += bytes;
        if self.visible && self.shown_at.elapsed() >= Duration::from_millis(200) {
            self.show();
            self.shown_at = Instant::now();
        }
    }

    fn show(&self) {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let line = match self.total {
            Some(total) if total > 0 => format!(
                "\r{}: {:.1} / {:.1} MiB ({:.0}%)",
                self.label,
                mib(self.done),
                mib(total),
                self.done as f64 * 100.0 / total as f64
            ),
            _ => format!("\r{}: {:.1} MiB", self.label, mib(self.done)),
        };
        let _ = std::io::stderr().write_all(line.as_bytes());
    }

    pub fn finish(&self) {
        if self.visible {
            self.show();
            let _ = std::io::stderr().write_all(b"\n");
        }
    }
}
