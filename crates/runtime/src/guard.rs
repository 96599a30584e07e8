//! What stands between a guest and the host: the capability allow-list, the host/VM trace, the
//! per-plugin log levels that switch it on, and the linear-memory limiter.
//!
//! Every host function asks [`VmState::watched`] first: one relaxed atomic load and a branch when
//! neither the trace nor a restriction is on, so the gate costs nothing measurable on the hot path.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Display;
use std::sync::Arc;

use parking_lot::Mutex;
use wasmgate_abi::LogLevel;

use crate::state::{LogLevelCell, VmState};

/// The plugins' log levels: one default (`POST /logging?wasm=LEVEL`) and one cell per plugin name
/// that a VM reads on every host call (`POST /logging?wasm=LEVEL&plugin=NAME` changes one).
#[derive(Debug)]
pub(crate) struct LogLevels {
    default: Arc<LogLevelCell>,
    plugins: Mutex<HashMap<String, Arc<LogLevelCell>>>,
}

impl LogLevels {
    pub(crate) fn new(level: LogLevel) -> Self {
        Self {
            default: Arc::new(LogLevelCell::new(level)),
            plugins: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn default_level(&self) -> LogLevel {
        self.default.get()
    }

    /// The cell a plugin's VMs read; created at the default level the first time it is asked for.
    pub(crate) fn cell(&self, plugin: &str) -> Arc<LogLevelCell> {
        self.plugins
            .lock()
            .entry(plugin.to_owned())
            .or_insert_with(|| Arc::new(LogLevelCell::new(self.default.get())))
            .clone()
    }

    /// Sets the default and every plugin's level, as Envoy's `wasm` logger does.
    pub(crate) fn set_all(&self, level: LogLevel) {
        self.default.set(level);
        for cell in self.plugins.lock().values() {
            cell.set(level);
        }
    }

    pub(crate) fn set_plugin(&self, plugin: &str, level: LogLevel) {
        self.cell(plugin).set(level);
    }

    /// Plugins whose level differs from the default, by name.
    pub(crate) fn overrides(&self) -> Vec<(String, LogLevel)> {
        let default = self.default.get();
        let mut out: Vec<(String, LogLevel)> = self
            .plugins
            .lock()
            .iter()
            .map(|(name, cell)| (name.clone(), cell.get()))
            .filter(|(_, level)| *level != default)
            .collect();
        out.sort();
        out
    }
}

/// Envoy's `capability_restriction_config.allowed_capabilities`: the host functions (by bare name,
/// `proxy_log`, `fd_write`) and callbacks (`proxy_on_request_headers`) a plugin may use.
pub type Capabilities = BTreeSet<String>;

/// Callbacks and exports the restriction never hides: without them no SDK module can start.
const ALWAYS_ALLOWED_EXPORTS: &[&str] = &[
    "proxy_on_memory_allocate",
    "malloc",
    "_start",
    "_initialize",
    "main",
];

pub(crate) fn export_allowed(allowed: Option<&Capabilities>, name: &str) -> bool {
    allowed.is_none_or(|set| set.contains(name) || ALWAYS_ALLOWED_EXPORTS.contains(&name))
}

impl VmState {
    /// Whether host calls must go through [`Self::admit`] and [`Self::trace_host_call`].
    #[inline]
    pub(crate) fn watched(&self) -> bool {
        self.allowed.is_some() || self.log_level.get() == LogLevel::Trace
    }

    /// Whether the plugin may call `module.name`. A refused call is logged once per function and
    /// VM (a plugin retrying in a loop must not flood the log).
    pub(crate) fn admit(&mut self, module: &str, name: &'static str, answer: &dyn Display) -> bool {
        let Some(allowed) = &self.allowed else {
            return true;
        };
        if allowed.contains(name) {
            return true;
        }
        if !self.refused.contains(&name) {
            self.refused.push(name);
            tracing::warn!(
                target: crate::LOG_TARGET,
                plugin = self.plugin_name(),
                "{module}.{name} is not among the plugin's allowed capabilities \
                 (capability_restriction_config); the call answers {answer}"
            );
        }
        false
    }

    /// One line of the host/VM trace for a finished host call, as Envoy's `wasm:trace` prints it.
    pub(crate) fn trace_host_call(
        &self,
        module: &str,
        name: &str,
        args: &[u64],
        result: &dyn Display,
    ) {
        if self.log_level.get() != LogLevel::Trace {
            return;
        }
        tracing::trace!(
            target: crate::LOG_TARGET,
            plugin = self.plugin_name(),
            context_id = self.effective,
            "[vm->host] {module}.{name}({}) -> {result}",
            Joined(args)
        );
    }
}

/// Arguments as Envoy's trace shows them: decimal, comma separated.
pub(crate) struct Joined<'a, T>(pub &'a [T]);

impl<T: Display> Display for Joined<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (index, value) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str(", ")?;
            }
            value.fmt(f)?;
        }
        Ok(())
    }
}

/// Callback parameters, printed for the trace (`[host->vm] proxy_on_request_headers(2, 8, 1)`).
pub(crate) trait TraceArgs {
    fn trace_args(&self) -> Vec<u64>;
}

macro_rules! trace_args_for_tuples {
    ($(($($name:ident),*)),*) => {$(
        impl<$($name: Copy + Into<u64>),*> TraceArgs for ($($name,)*) {
            #[allow(non_snake_case)]
            fn trace_args(&self) -> Vec<u64> {
                let ($($name,)*) = *self;
                vec![$($name.into()),*]
            }
        }
    )*};
}

trace_args_for_tuples!((), (A), (A, B), (A, B, C), (A, B, C, D), (A, B, C, D, E));

impl TraceArgs for u32 {
    fn trace_args(&self) -> Vec<u64> {
        vec![(*self).into()]
    }
}

/// A plugin's linear memory limit (`plugin_limits.max_memory_bytes`). Growing past it fails the
/// way `memory.grow` fails (the guest's allocator sees no memory); the breach is logged with the
/// plugin and the limit, and remembered so the trap that usually follows says why.
#[derive(Debug)]
pub(crate) struct MemoryLimiter {
    pub(crate) max_bytes: usize,
    pub(crate) plugin: String,
    pub(crate) breached: Option<usize>,
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired <= self.max_bytes {
            return Ok(true);
        }
        if self.breached.is_none() {
            tracing::warn!(
                target: crate::LOG_TARGET,
                plugin = %self.plugin,
                "the plugin asked to grow its memory from {current} to {desired} bytes, past its \
                 limit of {} bytes (plugin_limits.max_memory_bytes); the growth fails",
                self.max_bytes
            );
        }
        self.breached = Some(desired);
        Ok(false)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Tables hold function references; a million is far beyond any real plugin.
        Ok(desired <= 1 << 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plugin_level_follows_set_all_and_can_differ() {
        let levels = LogLevels::new(LogLevel::Info);
        let cell = levels.cell("a");
        assert_eq!(cell.get(), LogLevel::Info);
        levels.set_plugin("a", LogLevel::Trace);
        assert_eq!(cell.get(), LogLevel::Trace);
        assert_eq!(levels.cell("b").get(), LogLevel::Info);
        assert_eq!(levels.overrides(), vec![("a".to_owned(), LogLevel::Trace)]);
        levels.set_all(LogLevel::Warn);
        assert_eq!(cell.get(), LogLevel::Warn);
        assert!(levels.overrides().is_empty());
    }

    #[test]
    fn trace_args_print_as_envoy_does() {
        assert_eq!(
            Joined(&(2u32, 8u32, 1u32).trace_args()).to_string(),
            "2, 8, 1"
        );
        assert_eq!(Joined(&().trace_args()).to_string(), "");
    }

    #[test]
    fn the_allocator_is_never_hidden() {
        let allowed: Capabilities = ["proxy_on_request_headers".to_owned()].into();
        assert!(export_allowed(Some(&allowed), "malloc"));
        assert!(export_allowed(Some(&allowed), "proxy_on_request_headers"));
        assert!(!export_allowed(Some(&allowed), "proxy_on_response_headers"));
        assert!(export_allowed(None, "proxy_on_response_headers"));
    }
}
