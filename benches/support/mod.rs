//! What the process-level benches share: sluice as a real child process,
//! with its address read from its log line and its RSS and CPU read from
//! /proc. Each bench uses the part it needs.
#![allow(dead_code)]

pub(crate) mod load;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A sluice child process; killed on drop.
pub(crate) struct SluiceProcess {
    pub(crate) child: Child,
    pub(crate) addr: SocketAddr,
}

/// The sluice binary a bench runs: this build's, or `SLUICE_BIN` (an
/// older build, for a before/after comparison in one sitting).
fn binary() -> std::ffi::OsString {
    std::env::var_os("SLUICE_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_sluice").into())
}

impl SluiceProcess {
    /// Starts `sluice ARGS…` and waits for the line naming its addresses.
    pub(crate) fn start(args: &[&str]) -> Self {
        Self::start_command(Command::new(binary()), args)
    }

    /// Starts `sluice ARGS…` pinned to `cpu` (through `taskset`, which
    /// execs sluice: the child's pid is sluice's).
    pub(crate) fn start_pinned(cpu: usize, args: &[&str]) -> Self {
        let mut command = Command::new("taskset");
        command.args(["-c", &cpu.to_string()]).arg(binary());
        Self::start_command(command, args)
    }

    fn start_command(mut command: Command, args: &[&str]) -> Self {
        let mut child = command
            .args(args)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn sluice");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let line = loop {
            let line = lines
                .next()
                .expect("sluice exited at start")
                .expect("stderr");
            if line.contains("listening on ") {
                break line;
            }
        };
        std::thread::spawn(move || for _ in lines {});
        let addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .expect("listen address");
        Self { child, addr }
    }

    /// Resident set size, KiB.
    pub(crate) fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }

    /// User + system CPU time, seconds.
    pub(crate) fn cpu_secs(&self) -> f64 {
        cpu_secs(self.child.id())
    }

    /// SIGTERM, then waits for the exit; returns the time it took.
    pub(crate) fn terminate(&mut self) -> Duration {
        let start = Instant::now();
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -TERM failed");
        let status = self.child.wait().expect("wait");
        assert_eq!(status.code(), Some(0), "sluice exits 0 after a drain");
        start.elapsed()
    }
}

impl Drop for SluiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident set size of process `pid`, KiB.
pub(crate) fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("/proc status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS present")
}

/// User + system CPU time of process `pid` (all its threads), seconds.
pub(crate) fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc stat");
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    ticks as f64 / 100.0
}

/// p-th percentile of `values` (sorted in place).
pub(crate) fn percentile(values: &mut [u32], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_unstable();
    f64::from(values[((values.len() - 1) as f64 * p) as usize])
}
