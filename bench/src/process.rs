//! Memory and CPU of the service processes, from /proc.

/// The processes a scenario measures.
pub struct Services {
    pids: Vec<(String, u32)>,
}

/// One process's figures.
pub struct Usage {
    pub name: String,
    /// Peak resident memory since the last reset, in bytes.
    pub peak_rss: u64,
    /// User plus system CPU time, in seconds.
    pub cpu_seconds: f64,
}

impl Services {
    /// The processes named in `name=PID` pairs.
    pub fn new(pids: Vec<(String, u32)>) -> Self {
        Self { pids }
    }

    /// Resets every process's peak RSS (Linux: `5` into clear_refs), so the
    /// next reading is the peak of what follows.
    pub fn reset_peaks(&self) {
        for (name, pid) in &self.pids {
            if let Err(err) = std::fs::write(format!("/proc/{pid}/clear_refs"), "5") {
                eprintln!(
                    "mts-bench: cannot reset the peak RSS of {name} ({pid}): {err}; VmHWM covers its whole life"
                );
            }
        }
    }

    pub fn usage(&self) -> Vec<Usage> {
        self.pids
            .iter()
            .map(|(name, pid)| Usage {
                name: name.clone(),
                peak_rss: peak_rss(*pid).unwrap_or_default(),
                cpu_seconds: cpu_seconds(*pid).unwrap_or_default(),
            })
            .collect()
    }
}

impl Services {
    /// Resident memory of process `name` now, in bytes.
    pub fn current_rss(&self, name: &str) -> Option<u64> {
        rss(self.pid(name)?)
    }

    /// A reader of process `name`'s resident memory, for a sampling task.
    pub fn rss_reader(&self, name: &str) -> impl Fn() -> Option<u64> + Send + 'static {
        let pid = self.pid(name);
        move || rss(pid?)
    }

    fn pid(&self, name: &str) -> Option<u32> {
        self.pids
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, pid)| *pid)
    }
}

fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

impl Services {
    /// Peak RSS (MiB) and CPU seconds spent since `before`, per process.
    pub fn figures_since(&self, before: &[Usage]) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        for now in self.usage() {
            let spent = before
                .iter()
                .find(|b| b.name == now.name)
                .map_or(now.cpu_seconds, |b| now.cpu_seconds - b.cpu_seconds);
            out.insert(
                now.name.clone(),
                serde_json::json!({
                    "peak_rss_mib": round(now.peak_rss as f64 / (1024.0 * 1024.0), 1),
                    "cpu_seconds": round(spent, 2),
                }),
            );
        }
        serde_json::Value::Object(out)
    }
}

/// `value` to `digits` decimals, for readable JSON.
pub fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}
