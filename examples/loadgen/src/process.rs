//! CPU time and memory of a process, from /proc (Linux).

use serde::Serialize;

/// Clock ticks per second of /proc/PID/stat (`USER_HZ`, 100 on Linux for every
/// architecture's user-space ABI).
const TICKS_PER_SECOND: f64 = 100.0;

/// One reading of a process.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// User plus system CPU time of all its threads, in clock ticks.
    pub cpu_ticks: u64,
    /// Peak resident set since the process started (`VmHWM`), KiB.
    pub peak_rss_kib: Option<u64>,
    /// Resident set now (`VmRSS`), KiB.
    pub rss_kib: Option<u64>,
}

/// Reads /proc/{pid}/stat and /proc/{pid}/status (`pid` "self" for this process).
pub fn sample(pid: &str) -> Result<Sample, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("cannot read /proc/{pid}/stat: {e}"))?;
    let cpu_ticks =
        cpu_ticks(&stat).ok_or_else(|| format!("/proc/{pid}/stat has no utime and stime"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    Ok(Sample {
        cpu_ticks,
        peak_rss_kib: status_kib(&status, "VmHWM:"),
        rss_kib: status_kib(&status, "VmRSS:"),
    })
}

/// `utime` + `stime` (fields 14 and 15). The command name (field 2) may hold spaces and
/// parentheses, so fields are counted after its last ')'.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let (_, after_name) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // after_name starts at field 3 (state): utime is field 14, index 11.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn status_kib(status: &str, label: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// CPU seconds between two samples.
pub fn cpu_seconds(before: &Sample, after: &Sample) -> f64 {
    #[allow(clippy::cast_precision_loss)] // ticks stay far below 2^52
    let ticks = after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64;
    ticks / TICKS_PER_SECOND
}

/// The server's figures for the report.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerFigures {
    pub pid: u32,
    /// CPU seconds (user + system) the server used during the timed phase.
    pub cpu_seconds: f64,
    /// `cpu_seconds` per assigned registration, in microseconds.
    pub cpu_micros_per_registration: Option<f64>,
    /// Peak resident memory since the server started (`VmHWM`), MiB, to 0.1.
    pub peak_rss_mib: Option<f64>,
    /// Resident memory before and after the timed phase, MiB.
    pub rss_mib_before: Option<f64>,
    pub rss_mib_after: Option<f64>,
}

#[allow(clippy::cast_precision_loss)]
pub fn mib(kib: Option<u64>) -> Option<f64> {
    kib.map(|k| (k as f64 / 1024.0 * 10.0).round() / 10.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_ticks_past_a_strange_command_name() {
        let stat = "4242 (ber th) (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 75 0 0 20 0 9 0 1000 123456 789 18446744073709551615";
        assert_eq!(cpu_ticks(stat), Some(325));
        assert_eq!(cpu_ticks("garbage"), None);
    }

    #[test]
    fn reads_memory_lines() {
        let status = "Name:\tberth\nVmHWM:\t   51200 kB\nVmRSS:\t   40960 kB\n";
        assert_eq!(status_kib(status, "VmHWM:"), Some(51_200));
        assert_eq!(status_kib(status, "VmRSS:"), Some(40_960));
        assert_eq!(mib(Some(51_200)), Some(50.0));
        assert!(sample("self").unwrap().cpu_ticks < u64::MAX);
    }
}
