//! The fetch metrics under Istio's agent names, so dashboards built for Istio read Wasmgate's.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::FetchErrorKind;

/// `wasm_remote_fetch_count`'s `result` values, in exposition order.
const RESULTS: [&str; 5] = [
    "success",
    "download_failure",
    "manifest_failure",
    "checksum_mismatched",
    "fetch_failure",
];

/// `wasm_config_conversion_duration` bucket bounds in milliseconds: 1, 2, 4, ... 16384, as Istio.
const CONVERSION_BUCKETS_MS: [f64; 15] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
    16384.0,
];

#[derive(Default)]
pub struct FetchMetrics {
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    cache_entries: AtomicI64,
    remote_fetches: [AtomicU64; RESULTS.len()],
    conversion_buckets: [AtomicU64; CONVERSION_BUCKETS_MS.len()],
    conversion_count: AtomicU64,
    conversion_sum_us: AtomicU64,
}

impl FetchMetrics {
    pub fn cache_lookup(&self, hit: bool) {
        let counter = if hit {
            &self.cache_hits
        } else {
            &self.cache_misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_cache_entries(&self, entries: usize) {
        self.cache_entries.store(entries as i64, Ordering::Relaxed);
    }

    /// Counts a remote fetch: `None` is a success; errors without a result label (bad URL, local
    /// disk) are not remote fetches and are not counted.
    pub fn remote_fetch(&self, outcome: Option<FetchErrorKind>) {
        let label = match outcome {
            None => "success",
            Some(kind) => match kind.result_label() {
                Some(label) => label,
                None => return,
            },
        };
        if let Some(index) = RESULTS.iter().position(|r| *r == label) {
            self.remote_fetches[index].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn remote_fetch_count(&self, result: &str) -> u64 {
        RESULTS
            .iter()
            .position(|r| *r == result)
            .map_or(0, |i| self.remote_fetches[i].load(Ordering::Relaxed))
    }

    pub fn cache_lookup_count(&self, hit: bool) -> u64 {
        if hit {
            self.cache_hits.load(Ordering::Relaxed)
        } else {
            self.cache_misses.load(Ordering::Relaxed)
        }
    }

    /// One configuration turned into loadable modules (Istio: one ECDS response converted).
    pub fn config_conversion(&self, took: Duration) {
        let ms = took.as_secs_f64() * 1000.0;
        for (bucket, bound) in self.conversion_buckets.iter().zip(CONVERSION_BUCKETS_MS) {
            if ms <= bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.conversion_count.fetch_add(1, Ordering::Relaxed);
        self.conversion_sum_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of these metrics.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        out.push_str("# TYPE wasm_cache_lookup_count counter\n");
        let _ = writeln!(
            out,
            "wasm_cache_lookup_count{{hit=\"true\"}} {}",
            self.cache_hits.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "wasm_cache_lookup_count{{hit=\"false\"}} {}",
            self.cache_misses.load(Ordering::Relaxed)
        );
        out.push_str("# TYPE wasm_cache_entries gauge\n");
        let _ = writeln!(
            out,
            "wasm_cache_entries {}",
            self.cache_entries.load(Ordering::Relaxed)
        );
        out.push_str("# TYPE wasm_remote_fetch_count counter\n");
        for (result, count) in RESULTS.iter().zip(&self.remote_fetches) {
            let _ = writeln!(
                out,
                "wasm_remote_fetch_count{{result=\"{result}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        out.push_str("# TYPE wasm_config_conversion_duration histogram\n");
        for (bound, count) in CONVERSION_BUCKETS_MS.iter().zip(&self.conversion_buckets) {
            let _ = writeln!(
                out,
                "wasm_config_conversion_duration_bucket{{le=\"{bound}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let count = self.conversion_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "wasm_config_conversion_duration_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "wasm_config_conversion_duration_sum {}",
            self.conversion_sum_us.load(Ordering::Relaxed) as f64 / 1000.0
        );
        let _ = writeln!(out, "wasm_config_conversion_duration_count {count}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_istio_names_and_labels() {
        let metrics = FetchMetrics::default();
        metrics.cache_lookup(true);
        metrics.cache_lookup(false);
        metrics.cache_lookup(false);
        metrics.set_cache_entries(3);
        metrics.remote_fetch(None);
        metrics.remote_fetch(Some(FetchErrorKind::ChecksumMismatched));
        metrics.remote_fetch(Some(FetchErrorKind::InvalidUrl));
        metrics.config_conversion(Duration::from_millis(3));
        let text = metrics.prometheus();
        for line in [
            "wasm_cache_lookup_count{hit=\"true\"} 1",
            "wasm_cache_lookup_count{hit=\"false\"} 2",
            "wasm_cache_entries 3",
            "wasm_remote_fetch_count{result=\"success\"} 1",
            "wasm_remote_fetch_count{result=\"checksum_mismatched\"} 1",
            "wasm_remote_fetch_count{result=\"download_failure\"} 0",
            "wasm_config_conversion_duration_bucket{le=\"2\"} 0",
            "wasm_config_conversion_duration_bucket{le=\"4\"} 1",
            "wasm_config_conversion_duration_count 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
