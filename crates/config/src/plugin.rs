//! The resolved, gateway-ready view of one plugin in a filter chain, whatever form it was written in.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

/// One plugin in a listener's HTTP filter chain, ready for the data plane: everything resolved
/// (relative paths made absolute against the file they were written in, configuration turned into
/// bytes, HOST environment variables copied from the process environment).
///
/// Built by [`GatewayConfig::chain_for_listener`](crate::GatewayConfig::chain_for_listener), or one at
/// a time by [`HttpFilter::to_plugin_spec`](crate::HttpFilter::to_plugin_spec) and
/// [`WasmPluginSpec::to_plugin_spec`](crate::WasmPluginSpec::to_plugin_spec).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PluginSpec {
    /// The plugin name (Envoy's `PluginConfig.name`; for a WasmPlugin `namespace.name` as istiod
    /// names it, or `name` without a namespace). Used in logs and metrics.
    pub name: String,
    /// The root context id (`root_id`; a WasmPlugin's `pluginName`). Empty selects the blank root.
    pub root_id: String,
    /// `vm_config.vm_id`; empty for WasmPlugins (istiod sets none).
    pub vm_id: String,
    /// Passed to `proxy_on_vm_start`.
    pub vm_configuration: Vec<u8>,
    /// Passed to `proxy_on_configure`.
    pub configuration: Vec<u8>,
    /// Where the module comes from.
    pub source: CodeSource,
    /// WASI environment for the VM. HOST entries are copied from the process environment (keys it
    /// lacks are skipped, as Envoy and Istio do); inline values as given. Order: for an Envoy filter,
    /// `host_env_keys` then `key_values` (sorted by key); for a WasmPlugin, `vmConfig.env` order.
    pub environment: Vec<(String, String)>,
    /// What a fatal plugin error does to requests.
    pub failure_policy: FailurePolicy,
    /// A WasmPlugin's `imagePullPolicy` (`IfNotPresent` or `Always`); `None` for Istio's default.
    pub image_pull_policy: Option<String>,
    /// A WasmPlugin's `imagePullSecret`: the name of a dockerconfigjson secret.
    pub image_pull_secret: Option<String>,
    /// Where the plugin was declared, for messages and `/config_dump`.
    pub origin: PluginOrigin,
    /// Envoy's `capability_restriction_config.allowed_capabilities` (the names only: Envoy ignores
    /// the sanitization values too); `None` allows every host function and callback.
    pub capabilities: Option<BTreeSet<String>>,
    /// How long FAIL_RELOAD waits between rebuilding a failed VM (Envoy's `reload_config`).
    pub reload_backoff: ReloadBackoff,
}

/// Envoy's `reload_config.backoff`: the first wait, doubled after each failure up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ReloadBackoff {
    #[serde(with = "crate::duration::serde_duration")]
    pub base: Duration,
    #[serde(with = "crate::duration::serde_duration")]
    pub max: Duration,
}

impl Default for ReloadBackoff {
    /// Envoy's defaults: a 1 s base, at most ten times that.
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            max: Duration::from_secs(10),
        }
    }
}

/// Where a module's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CodeSource {
    /// A file on this machine (absolute once resolved from a file-based config).
    Local(PathBuf),
    /// A module to fetch: `http://`, `https://` or `oci://` (a scheme-less WasmPlugin URL is OCI, as in
    /// Istio, and is given here with `oci://` prepended). `sha256` (lowercase hex) is required for
    /// Envoy-style remote code and optional for WasmPlugins.
    Remote { uri: String, sha256: Option<String> },
}

/// What a fatal plugin error (VM failure, trap, or a module that cannot be fetched) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FailurePolicy {
    /// Requests through the plugin fail (Envoy answers 503). The default.
    #[default]
    FailClosed,
    /// The plugin is bypassed.
    FailOpen,
    /// On a runtime error a new VM / plugin instance serves new requests; other failures are
    /// treated as `FailClosed`.
    FailReload,
}

/// Where a [`PluginSpec`] was declared.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PluginOrigin {
    /// `listeners[..].http_filters[index]` of the gateway config, on the listener named `listener`.
    EnvoyFilter { listener: String, index: usize },
    /// `listeners[..].network_filters[index]`, on the listener named `listener`.
    EnvoyNetworkFilter { listener: String, index: usize },
    /// A WasmPlugin manifest: `document` is 1-based within `file`; `name` is `metadata.name`.
    WasmPlugin {
        file: PathBuf,
        document: usize,
        name: String,
    },
}

impl std::fmt::Display for PluginOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginOrigin::EnvoyFilter { listener, index } => {
                write!(f, "listener {listener:?} http_filters[{index}]")
            }
            PluginOrigin::EnvoyNetworkFilter { listener, index } => {
                write!(f, "listener {listener:?} network_filters[{index}]")
            }
            PluginOrigin::WasmPlugin {
                file,
                document,
                name,
            } => write!(
                f,
                "WasmPlugin {name:?} in {} (document {document})",
                file.display()
            ),
        }
    }
}
