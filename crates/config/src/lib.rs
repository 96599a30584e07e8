//! Wasmgate's configuration models: the gateway config (listeners, routes, clusters, Envoy-style
//! Wasm filters), Istio `WasmPlugin` manifests, and the resolved plugin chain the data plane runs.
//!
//! - [`GatewayConfig`]: [`GatewayConfig::from_file`] parses with precise errors (file, field path,
//!   reason), [`GatewayConfig::validate`] checks meaning, [`GatewayConfig::load`] does both.
//! - [`load_wasm_plugins`]: WasmPlugin manifests from a folder; [`order_plugins`]: Istio's order.
//! - [`GatewayConfig::chain_for_listener`]: a listener's plugins as [`PluginSpec`]s, in chain order,
//!   the WasmPlugins applied as istiod applies them to the gateway's [`Workload`] identity;
//!   [`GatewayConfig::chain_for_network_listener`]: its `NETWORK` WasmPlugins.
//!
//! Knows nothing of Wasm engines or HTTP servers: it only reads, checks and resolves.
#![forbid(unsafe_code)]

mod duration;
mod envoy;
mod error;
mod gateway;
mod plugin;
mod value;
mod wasm_plugin;
mod workload;

use std::path::{Path, PathBuf};

pub use duration::{format_duration, parse_duration};
pub use envoy::{
    BackoffStrategy, CapabilityRestrictionConfig, Code, EnvironmentVariables, EnvoyFailurePolicy,
    HttpFilter, HttpUri, LocalCode, ReloadConfig, RemoteCode, RetryPolicy, VmConfig,
};
pub use error::{ConfigError, ConfigErrors};
pub use gateway::{
    Cluster, ClusterTls, DEFAULT_ADMIN, DirectResponse, Endpoint, GatewayConfig, KubernetesSource,
    Listener, ListenerLimits, ListenerTls, MetricFilter, ModuleCache, ModuleFetch, PathMatcher,
    PluginLimits, Route, RouteAction, RouteMatch, SafeRegex, SniRoute, StatsMatcher,
    StringMatchList, StringMatcher, TcpProxy, domain_matches,
};
pub use plugin::{CodeSource, FailurePolicy, PluginOrigin, PluginSpec, ReloadBackoff};
pub use value::configuration_text;
pub use wasm_plugin::{
    ALLOWED_URL_SCHEMES, EnvValueSource, EnvVar, FailStrategy, ManifestScan, ObjectMeta,
    PluginPhase, PluginType, PolicyTargetReference, PortSelector, PullPolicy, SkippedDocument,
    TrafficSelector, WASM_PLUGIN_API_VERSIONS, WASM_PLUGIN_GROUP, WasmPlugin, WasmPluginSpec,
    WasmVmConfig, WorkloadMode, WorkloadSelector, is_kubernetes_manifest, istio_order,
    load_wasm_plugins, load_wasm_plugins_lenient, manifest_files, order_plugins, order_plugins_for,
    parse_wasm_plugins, scan_wasm_plugin_dir, scan_wasm_plugins,
};
pub use workload::{
    DEFAULT_NAMESPACE, DEFAULT_ROOT_NAMESPACE, GATEWAY_API_GROUP, GATEWAY_NAME_LABEL, ListenerMode,
    WAYPOINT_GATEWAY_CLASS, Workload,
};

/// `path` if absolute, else `base/path`.
pub(crate) fn resolve_path(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() || base.as_os_str().is_empty() {
        path.to_owned()
    } else {
        base.join(path)
    }
}

/// `None` if `path` is a readable file's path, else the reason.
pub(crate) fn check_file(path: &Path) -> Option<String> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => None,
        Ok(_) => Some(format!("not a file: {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Some(format!("file not found: {}", path.display()))
        }
        Err(e) => Some(format!("cannot read {}: {e}", path.display())),
    }
}

pub(crate) fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}
