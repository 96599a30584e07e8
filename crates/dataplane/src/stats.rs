//! The gateway's own metrics, exposed at the admin `/stats/prometheus` beside the plugins' ones.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use wasmgate_abi::MetricType;
use wasmgate_runtime::shared::{HISTOGRAM_BUCKETS, Metrics};

/// Latency bucket bounds in milliseconds.
const LATENCY_BUCKETS_MS: [f64; 12] = [
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 10000.0,
];

#[derive(Default)]
pub struct GatewayStats {
    /// Responses by status class 1xx..5xx.
    responses: [AtomicU64; 5],
    latency_buckets: [AtomicU64; LATENCY_BUCKETS_MS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
    pub(crate) active_connections: AtomicI64,
    /// Per plugin name: live VMs, and VMs started since the process began.
    vms: Mutex<Vec<(String, i64, u64)>>,
    /// Per plugin name: VM failures and FAIL_RELOAD rebuilds.
    health: Mutex<Vec<PluginHealth>>,
    /// The listeners serving now and their bound addresses (admin `/listeners`).
    listeners: Mutex<Vec<(String, SocketAddr)>>,
}

/// A plugin's VM failures (traps, stopped loops, exhausted memory) and FAIL_RELOAD rebuilds, over
/// all workers since the process began.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PluginHealth {
    pub plugin: String,
    pub vm_failures: u64,
    /// VMs failed now (failed and not rebuilt).
    pub failed_vms: i64,
    pub reloads_succeeded: u64,
    pub reloads_failed: u64,
    /// Streams refused because a rebuild was waiting out its backoff.
    pub reloads_in_backoff: u64,
    pub last_failure: Option<String>,
}

impl GatewayStats {
    /// The listeners serving now with their bound addresses, in the order they were added.
    pub fn listeners(&self) -> Vec<(String, SocketAddr)> {
        self.listeners.lock().clone()
    }

    pub fn listener_address(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .lock()
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }

    pub(crate) fn listener_added(&self, name: String, address: SocketAddr) {
        self.listeners.lock().push((name, address));
    }

    pub(crate) fn listener_removed(&self, name: &str) {
        self.listeners.lock().retain(|(n, _)| n != name);
    }

    pub(crate) fn record_response(&self, status: u16, latency: Duration) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
        let ms = latency.as_secs_f64() * 1000.0;
        for (bucket, bound) in self.latency_buckets.iter().zip(LATENCY_BUCKETS_MS) {
            if ms <= bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
    }

    pub(crate) fn vm_started(&self, plugin: &str, delta: i64) {
        let started = u64::from(delta > 0) * delta.unsigned_abs();
        let mut vms = self.vms.lock();
        match vms.iter_mut().find(|(name, _, _)| name == plugin) {
            Some((_, live, starts)) => {
                *live += delta;
                *starts += started;
            }
            None => vms.push((plugin.to_owned(), delta, started)),
        }
    }

    fn with_health(&self, plugin: &str, f: impl FnOnce(&mut PluginHealth)) {
        let mut health = self.health.lock();
        match health.iter_mut().find(|h| h.plugin == plugin) {
            Some(entry) => f(entry),
            None => {
                let mut entry = PluginHealth {
                    plugin: plugin.to_owned(),
                    ..Default::default()
                };
                f(&mut entry);
                health.push(entry);
            }
        }
    }

    pub(crate) fn vm_failed(&self, plugin: &str, reason: &str) {
        self.with_health(plugin, |h| {
            h.vm_failures += 1;
            h.failed_vms += 1;
            h.last_failure = Some(reason.to_owned());
        });
    }

    pub(crate) fn vm_reload(&self, plugin: &str, result: crate::health::ReloadResult) {
        use crate::health::ReloadResult;
        self.with_health(plugin, |h| match result {
            ReloadResult::Success => {
                h.reloads_succeeded += 1;
                h.failed_vms = (h.failed_vms - 1).max(0);
            }
            ReloadResult::Failure => h.reloads_failed += 1,
            ReloadResult::Backoff => h.reloads_in_backoff += 1,
        });
    }

    /// Every plugin that has failed at least once.
    pub fn plugin_health(&self) -> Vec<PluginHealth> {
        self.health.lock().clone()
    }

    /// Live VMs of a plugin (one per worker while it is in a chain) and VMs started in all.
    pub fn plugin_vms(&self, plugin: &str) -> (i64, u64) {
        self.vms
            .lock()
            .iter()
            .find(|(name, _, _)| name == plugin)
            .map_or((0, 0), |(_, live, starts)| (*live, *starts))
    }

    pub fn responses_by_class(&self) -> [u64; 5] {
        std::array::from_fn(|i| self.responses[i].load(Ordering::Relaxed))
    }

    /// The Prometheus text exposition: gateway metrics, then plugin-defined metrics under the names
    /// the plugins chose.
    pub fn prometheus(&self, plugin_metrics: &Metrics) -> String {
        self.prometheus_filtered(plugin_metrics, &|_| true)
    }

    /// As [`Self::prometheus`], showing only the plugin-defined metrics `include` accepts (by the
    /// name the plugin gave them).
    pub fn prometheus_filtered(
        &self,
        plugin_metrics: &Metrics,
        include: &dyn Fn(&str) -> bool,
    ) -> String {
        let mut out = String::new();
        out.push_str("# TYPE wasmgate_http_responses_total counter\n");
        for (i, count) in self.responses_by_class().iter().enumerate() {
            let _ = writeln!(
                out,
                "wasmgate_http_responses_total{{class=\"{}xx\"}} {count}",
                i + 1
            );
        }
        out.push_str("# TYPE wasmgate_http_request_duration_milliseconds histogram\n");
        for (bucket, bound) in self.latency_buckets.iter().zip(LATENCY_BUCKETS_MS) {
            let _ = writeln!(
                out,
                "wasmgate_http_request_duration_milliseconds_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "wasmgate_http_request_duration_milliseconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "wasmgate_http_request_duration_milliseconds_sum {}",
            self.latency_sum_us.load(Ordering::Relaxed) as f64 / 1000.0
        );
        let _ = writeln!(
            out,
            "wasmgate_http_request_duration_milliseconds_count {count}"
        );
        out.push_str("# TYPE wasmgate_active_connections gauge\n");
        let _ = writeln!(
            out,
            "wasmgate_active_connections {}",
            self.active_connections.load(Ordering::Relaxed)
        );
        out.push_str("# TYPE wasmgate_plugin_vms gauge\n");
        for (plugin, count, _) in self.vms.lock().iter() {
            let _ = writeln!(
                out,
                "wasmgate_plugin_vms{{plugin=\"{}\"}} {count}",
                escape(plugin)
            );
        }
        out.push_str("# TYPE wasmgate_plugin_vm_starts_total counter\n");
        for (plugin, _, starts) in self.vms.lock().iter() {
            let _ = writeln!(
                out,
                "wasmgate_plugin_vm_starts_total{{plugin=\"{}\"}} {starts}",
                escape(plugin)
            );
        }
        let health = self.plugin_health();
        out.push_str("# TYPE wasmgate_plugin_vm_failures_total counter\n");
        for h in &health {
            let _ = writeln!(
                out,
                "wasmgate_plugin_vm_failures_total{{plugin=\"{}\"}} {}",
                escape(&h.plugin),
                h.vm_failures
            );
        }
        out.push_str("# TYPE wasmgate_plugin_failed_vms gauge\n");
        for h in &health {
            let _ = writeln!(
                out,
                "wasmgate_plugin_failed_vms{{plugin=\"{}\"}} {}",
                escape(&h.plugin),
                h.failed_vms
            );
        }
        out.push_str("# TYPE wasmgate_plugin_vm_reloads_total counter\n");
        for h in &health {
            for (result, count) in [
                ("success", h.reloads_succeeded),
                ("failure", h.reloads_failed),
                ("backoff", h.reloads_in_backoff),
            ] {
                let _ = writeln!(
                    out,
                    "wasmgate_plugin_vm_reloads_total{{plugin=\"{}\",result=\"{result}\"}} {count}",
                    escape(&h.plugin)
                );
            }
        }
        for metric in plugin_metrics.snapshot() {
            if !include(&metric.name) {
                continue;
            }
            let name = sanitize(&metric.name);
            match metric.kind {
                MetricType::Counter => {
                    let _ = writeln!(out, "# TYPE {name} counter\n{name} {}", metric.value);
                }
                MetricType::Gauge => {
                    let _ = writeln!(out, "# TYPE {name} gauge\n{name} {}", metric.value);
                }
                MetricType::Histogram => {
                    let histogram = metric.histogram.unwrap_or_default();
                    let _ = writeln!(out, "# TYPE {name} histogram");
                    for (count, bound) in histogram.buckets.iter().zip(HISTOGRAM_BUCKETS) {
                        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
                    }
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", histogram.count);
                    let _ = writeln!(
                        out,
                        "{name}_sum {}\n{name}_count {}",
                        histogram.sum, histogram.count
                    );
                }
            }
        }
        out
    }
}

/// Prometheus names allow `[a-zA-Z_:][a-zA-Z0-9_:]*`; Envoy turns dots into underscores too.
fn sanitize(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition() {
        let stats = GatewayStats::default();
        stats.record_response(200, Duration::from_millis(3));
        stats.record_response(503, Duration::from_millis(30));
        let metrics = Metrics::default();
        let id = metrics
            .define(MetricType::Counter, "my.plugin.hits")
            .unwrap();
        metrics.increment(id, 2);
        let text = stats.prometheus(&metrics);
        assert!(
            text.contains("wasmgate_http_responses_total{class=\"2xx\"} 1"),
            "{text}"
        );
        assert!(text.contains("wasmgate_http_responses_total{class=\"5xx\"} 1"));
        assert!(text.contains("wasmgate_http_request_duration_milliseconds_bucket{le=\"5\"} 1"));
        assert!(text.contains("wasmgate_http_request_duration_milliseconds_count 2"));
        assert!(text.contains("my_plugin_hits 2"));
    }
}
