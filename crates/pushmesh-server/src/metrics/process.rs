//! The process's own figures (`process_*`, as the Prometheus client
//! libraries name them) and the node's build and state
//! (`pushmesh_build_info`, `pushmesh_ready`, `pushmesh_draining`).

use std::fmt::Write as _;

use super::{esc, family, scalar};

/// Resident memory, CPU seconds, open and most file descriptors, read
/// from `/proc/self` (absent elsewhere: the lines are left out).
struct ProcSelf {
    rss_bytes: Option<u64>,
    cpu_seconds: Option<f64>,
    open_fds: Option<u64>,
    max_fds: Option<u64>,
}

fn read() -> ProcSelf {
    let rss_bytes = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .map(|k| k * 1024);
    let cpu_seconds = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let u: f64 = f.get(11)?.parse().ok()?;
            let k: f64 = f.get(12)?.parse().ok()?;
            Some((u + k) / 100.0)
        });
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as u64);
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| max_open_files(&s));
    ProcSelf {
        rss_bytes,
        cpu_seconds,
        open_fds,
        max_fds,
    }
}

/// The soft limit of "Max open files" in `/proc/self/limits` text.
fn max_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    match soft {
        "unlimited" => Some(u64::MAX),
        n => n.parse().ok(),
    }
}

/// Writes the `process_*` families.
pub(super) fn render(out: &mut String) {
    let p = read();
    for (name, kind, help, v) in [
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            p.rss_bytes.map(|v| v.to_string()),
        ),
        (
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time spent in seconds.",
            p.cpu_seconds.map(|v| v.to_string()),
        ),
        (
            "process_open_fds",
            "gauge",
            "Open file descriptors.",
            p.open_fds.map(|v| v.to_string()),
        ),
        (
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors (the soft limit).",
            p.max_fds.map(|v| v.to_string()),
        ),
    ] {
        if let Some(v) = v {
            scalar(out, name, kind, help, v);
        }
    }
}

/// Writes `pushmesh_build_info`, `pushmesh_ready` (what `/readyz` answers
/// now) and `pushmesh_draining`.
pub fn render_node_state(out: &mut String, ready: bool, draining: bool) {
    family(
        out,
        "pushmesh_build_info",
        "gauge",
        "Always 1; the labels say which build runs.",
    );
    let _ = writeln!(
        out,
        "pushmesh_build_info{{version=\"{}\",commit=\"{}\"}} 1",
        esc(env!("CARGO_PKG_VERSION")),
        esc(env!("PUSHMESH_COMMIT"))
    );
    scalar(
        out,
        "pushmesh_ready",
        "gauge",
        "1 when /readyz answers 200 (the node should get traffic), else 0.",
        u8::from(ready),
    );
    scalar(
        out,
        "pushmesh_draining",
        "gauge",
        "1 from SIGTERM (drain start) until the process ends, else 0.",
        u8::from(draining),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_of_open_files_is_read() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max processes             95014                95014                processes \n\
                    Max open files            20000                524288               files     \n";
        assert_eq!(max_open_files(text), Some(20000));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(max_open_files(unlimited), Some(u64::MAX));
        assert_eq!(max_open_files("nothing"), None);
    }

    #[test]
    fn this_process_has_a_limit() {
        if std::path::Path::new("/proc/self/limits").exists() {
            assert!(read().max_fds.is_some_and(|n| n > 0));
        }
    }
}
