//! What is read at scrape time rather than counted as it happens: the
//! process (CPU, memory, file descriptors, start time, as every
//! Prometheus client library exports them), the build, the upstream
//! groups' endpoints, and a tunnel role's state. Each reads a handle the
//! app gives it; tunnel families exist only where a tunnel role is
//! configured.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

/// What a tunnel agent holds, read at scrape time.
#[derive(Debug, Default)]
pub(crate) struct TunnelView {
    pub(crate) desired: usize,
    pub(crate) claimed: usize,
    pub(crate) inflight: usize,
    pub(crate) failed_dials: u64,
    pub(crate) hubs: Vec<String>,
}

/// One upstream group now.
#[derive(Debug, Default)]
pub(crate) struct GroupView {
    pub(crate) group: String,
    /// Endpoints whose last dial worked and health check passed.
    pub(crate) usable: usize,
    /// The others.
    pub(crate) unusable: usize,
    /// Calls on the group's connections.
    pub(crate) in_flight: usize,
}

pub(crate) type AgentFn = Arc<dyn Fn() -> TunnelView + Send + Sync>;
pub(crate) type CountFn = Arc<dyn Fn() -> usize + Send + Sync>;
pub(crate) type GroupsFn = Arc<dyn Fn() -> Vec<GroupView> + Send + Sync>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HubLabels {
    hub: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    group: String,
    state: &'static str,
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A tunnel agent's pool (registered only on an agent).
pub(crate) struct AgentCollector(pub(crate) AgentFn);

impl std::fmt::Debug for AgentCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentCollector")
    }
}

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let v = (self.0)();
        for (name, help, value) in [
            (
                "agent_hubs_desired",
                "Tunnel agent: hubs of the newest generation of their group",
                v.desired,
            ),
            (
                "agent_hubs_claimed",
                "Tunnel agent: hub processes it holds a tunnel to",
                v.claimed,
            ),
            (
                "agent_dials_in_flight",
                "Tunnel agent: dials under way",
                v.inflight,
            ),
        ] {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(count(value)).encode(m)?;
        }
        let m = encoder.encode_descriptor(
            "agent_dials_failed",
            "Tunnel agent: dials that failed since the start",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(v.failed_dials).encode(m)?;
        let mut per_hub: Vec<(String, i64)> = Vec::new();
        for hub in v.hubs {
            match per_hub.iter_mut().find(|(h, _)| *h == hub) {
                Some((_, n)) => *n += 1,
                None => per_hub.push((hub, 1)),
            }
        }
        if per_hub.is_empty() {
            // A family with no sample is valid OpenMetrics, but some
            // parsers refuse it: none is written.
            return Ok(());
        }
        let mut m = encoder.encode_descriptor(
            "agent_tunnels",
            "Tunnel agent: tunnels per hub",
            None,
            MetricType::Gauge,
        )?;
        for (hub, n) in per_hub {
            ConstGauge::new(n).encode(m.encode_family(&HubLabels { hub })?)?;
        }
        Ok(())
    }
}

/// A hub's agents (registered only on a hub).
pub(crate) struct HubCollector(pub(crate) CountFn);

impl std::fmt::Debug for HubCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HubCollector")
    }
}

impl Collector for HubCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let m = encoder.encode_descriptor(
            "hub_agents",
            "Tunnel hub: agents connected",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(count((self.0)())).encode(m)
    }
}

/// The upstream groups' endpoints and calls, by group.
pub(crate) struct GroupsCollector(pub(crate) GroupsFn);

impl std::fmt::Debug for GroupsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupsCollector")
    }
}

impl Collector for GroupsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let groups = (self.0)();
        let mut m = encoder.encode_descriptor(
            "upstream_endpoints",
            "Endpoints of each upstream group, usable (last dial worked, health check passing) or not",
            None,
            MetricType::Gauge,
        )?;
        for g in &groups {
            for (state, n) in [("usable", g.usable), ("unusable", g.unusable)] {
                let labels = EndpointLabels {
                    group: g.group.clone(),
                    state,
                };
                ConstGauge::new(count(n)).encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "upstream_calls_in_flight",
            "Calls on each upstream group's connections now",
            None,
            MetricType::Gauge,
        )?;
        for g in &groups {
            let labels = GroupLabels {
                group: g.group.clone(),
            };
            ConstGauge::new(count(g.in_flight)).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The process's own figures, from `/proc/self` (Linux): CPU seconds,
/// resident and virtual memory, open and allowed file descriptors, start
/// time. Unprefixed, as the Prometheus client libraries name them.
#[derive(Debug)]
pub(crate) struct ProcessCollector {
    /// Seconds since the epoch at which the process started.
    start_time: f64,
}

impl ProcessCollector {
    pub(crate) fn new() -> Self {
        let start_time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
            - process_age().unwrap_or(0.0);
        Self { start_time }
    }
}

/// Clock ticks per second for `/proc/self/stat` (USER_HZ: 100 on every
/// Linux architecture sluice builds for).
const TICKS_PER_SECOND: f64 = 100.0;
const PAGE_SIZE: f64 = 4096.0;

/// The fields of `/proc/self/stat` after the command name.
fn stat_fields() -> Option<Vec<String>> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces: the fields start after its ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// How long the process has run, in seconds.
fn process_age() -> Option<f64> {
    let fields = stat_fields()?;
    // Field 22 (starttime) is index 19 after the name.
    let started: f64 = fields.get(19)?.parse().ok()?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((uptime - started / TICKS_PER_SECOND).max(0.0))
}

fn max_fds() -> Option<f64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let fields = stat_fields().unwrap_or_default();
        let field = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
        // utime and stime: fields 14 and 15, indexes 11 and 12.
        if let (Some(user), Some(system)) = (field(11), field(12)) {
            let m = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new((user + system) / TICKS_PER_SECOND).encode(m)?;
        }
        // vsize (bytes) and rss (pages): fields 23 and 24.
        if let Some(vsize) = field(20) {
            let m = encoder.encode_descriptor(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(vsize).encode(m)?;
        }
        if let Some(rss) = field(21) {
            let m = encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(rss * PAGE_SIZE).encode(m)?;
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            let m = encoder.encode_descriptor(
                "process_open_fds",
                "Number of open file descriptors",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(count(dir.count())).encode(m)?;
        }
        if let Some(max) = max_fds() {
            let m = encoder.encode_descriptor(
                "process_max_fds",
                "Maximum number of open file descriptors",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(max).encode(m)?;
        }
        let m = encoder.encode_descriptor(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(self.start_time).encode(m)
    }
}

/// OpenMetrics text (what `prometheus-client` writes) as the Prometheus
/// text format 0.0.4, for scrapers that do not ask for OpenMetrics: a
/// counter family's `TYPE` and `HELP` name its `_total` samples, an info
/// family is a gauge named `_info`, and there is no `# EOF` or `# UNIT`.
pub(crate) fn to_text_004(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            // Held until the TYPE line says what the family is.
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" if !name.ends_with("_total") => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "stateset" | "gaugehistogram" | "unknown" => (name.to_owned(), "untyped"),
                other => (name.to_owned(), other),
            };
            if let Some(h) = help.take() {
                let text = h.split_once(' ').map_or("", |(_, t)| t);
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_counters_and_infos_become_text_004_families() {
        let om = "# HELP sluice_calls Calls.\n# TYPE sluice_calls counter\n\
                  sluice_calls_total{a=\"b\"} 3\n\
                  # HELP sluice_build Build.\n# TYPE sluice_build info\n\
                  sluice_build_info{version=\"1\"} 1\n\
                  # HELP g A gauge.\n# TYPE g gauge\n# UNIT g bytes\ng 2\n# EOF\n";
        let text = to_text_004(om);
        assert_eq!(
            text,
            "# HELP sluice_calls_total Calls.\n# TYPE sluice_calls_total counter\n\
             sluice_calls_total{a=\"b\"} 3\n\
             # HELP sluice_build_info Build.\n# TYPE sluice_build_info gauge\n\
             sluice_build_info{version=\"1\"} 1\n\
             # HELP g A gauge.\n# TYPE g gauge\ng 2\n"
        );
    }

    #[test]
    fn the_process_collector_reads_this_process() {
        let c = ProcessCollector::new();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs_f64();
        assert!(
            c.start_time > now - 3600.0 && c.start_time <= now + 1.0,
            "{}",
            c.start_time
        );
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(c));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encodes");
        for family in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            assert!(out.contains(family), "{family} in {out}");
        }
    }
}
