//! A plugin VM's health on one worker: its failures, and FAIL_RELOAD's rebuilds with exponential
//! backoff (Envoy's `reload_config.backoff`), counted in [`GatewayStats`].

use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::spec::FilterSpec;
use crate::stats::GatewayStats;

pub(crate) struct VmHealth {
    plugin: String,
    stats: Arc<GatewayStats>,
    base: Duration,
    max: Duration,
    /// The wait after the next rebuild; doubles while rebuilt VMs keep failing.
    wait: Cell<Duration>,
    /// No rebuild before this.
    not_before: Cell<Option<Instant>>,
    last_rebuild: Cell<Option<Instant>>,
    /// Whether the current VM's failure was counted (each VM fails once).
    counted: Cell<bool>,
}

impl VmHealth {
    pub(crate) fn new(spec: &FilterSpec, stats: Arc<GatewayStats>) -> Self {
        let base = spec.reload_backoff.max(Duration::from_millis(1));
        Self {
            plugin: spec.name.clone(),
            stats,
            base,
            max: spec.reload_backoff_max.max(base),
            wait: Cell::new(base),
            not_before: Cell::new(None),
            last_rebuild: Cell::new(None),
            counted: Cell::new(false),
        }
    }

    /// Records that the VM failed (counted once per VM).
    pub(crate) fn failed(&self, reason: &str) {
        if self.counted.replace(true) {
            return;
        }
        self.stats.vm_failed(&self.plugin, reason);
        // A rebuilt VM that served longer than the longest wait earns a fresh, short backoff.
        if self
            .last_rebuild
            .get()
            .is_some_and(|at| at.elapsed() > self.max)
        {
            self.wait.set(self.base);
        }
    }

    /// Whether FAIL_RELOAD may rebuild the VM now. While the backoff runs, the plugin fails
    /// closed, as Envoy's does.
    pub(crate) fn may_rebuild(&self) -> bool {
        let now = Instant::now();
        if self.not_before.get().is_some_and(|at| now < at) {
            self.stats.vm_reload(&self.plugin, ReloadResult::Backoff);
            return false;
        }
        true
    }

    /// Records a rebuild attempt and starts the next backoff period.
    pub(crate) fn rebuilt(&self, ok: bool) {
        let now = Instant::now();
        let wait = self.wait.get();
        self.not_before.set(Some(now + wait));
        self.wait.set((wait * 2).min(self.max));
        self.last_rebuild.set(Some(now));
        if ok {
            self.counted.set(false);
            self.stats.vm_reload(&self.plugin, ReloadResult::Success);
        } else {
            self.stats.vm_reload(&self.plugin, ReloadResult::Failure);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReloadResult {
    Success,
    Failure,
    Backoff,
}
