//! The gateway configuration: listeners, routes, clusters, the Envoy-style Wasm filters, and where
//! WasmPlugin manifests live.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::duration::{serde_duration, serde_opt_duration};
use crate::envoy::HttpFilter;
use crate::error::{ConfigError, ConfigErrors, Report};
use crate::plugin::PluginSpec;
use crate::wasm_plugin::{PluginPhase, WasmPluginSpec, order_plugins_for};
use crate::workload::{ListenerMode, Workload};

/// The default admin address.
pub const DEFAULT_ADMIN: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1)), 15000);

/// The whole gateway configuration file.
///
/// [`from_file`](Self::from_file) / [`from_yaml_str`](Self::from_yaml_str) parse (types, unknown
/// fields, addresses, durations) and resolve relative paths; [`validate`](Self::validate) checks
/// meaning (references, duplicates, files, regexes). [`load`](Self::load) does both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// The file path or source name the configuration was read from (for error messages).
    #[serde(skip)]
    pub source: String,
    /// Worker threads; default: `std::thread::available_parallelism()`.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// The admin server's address; default 127.0.0.1:15000.
    #[serde(default = "default_admin", deserialize_with = "de_socket_addr")]
    pub admin: SocketAddr,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub clusters: Vec<Cluster>,
    /// A folder of Istio WasmPlugin manifests (see [`crate::load_wasm_plugins`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugins_dir: Option<PathBuf>,
    /// Registries (`host:port` or `host`; `*` for all) reached over plain HTTP instead of HTTPS.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub insecure_registries: Vec<String>,
    /// A folder of pull secrets: a WasmPlugin's `imagePullSecret: NAME` reads the dockerconfigjson
    /// in `NAME` (or `NAME.json`) there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_secrets_dir: Option<PathBuf>,
    /// How remote modules are fetched.
    #[serde(default)]
    pub module_fetch: ModuleFetch,
    /// Where fetched modules and compiled artefacts are kept.
    #[serde(default)]
    pub module_cache: ModuleCache,
    /// The gateway as Istio sees a workload (namespace, labels, Gateway name): which WasmPlugins
    /// apply to it.
    #[serde(default)]
    pub workload: Workload,
    /// Limits every plugin VM runs under.
    #[serde(default)]
    pub plugin_limits: PluginLimits,
    /// Kubernetes as a source of WasmPlugins and pull secrets, beside `plugins_dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesSource>,
    /// Which plugin-defined metrics `/stats/prometheus` shows (Envoy's `stats_matcher`); all when
    /// absent. The gateway's own `wasmgate_*` metrics are always shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats_matcher: Option<StatsMatcher>,
}

/// Envoy's `StatsMatcher`: an inclusion list or an exclusion list of name patterns, matched
/// against a metric's name as the plugin defined it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StatsMatcher {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inclusion_list: Option<StringMatchList>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exclusion_list: Option<StringMatchList>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StringMatchList {
    pub patterns: Vec<StringMatcher>,
}

/// Envoy's `StringMatcher`: exactly one of the fields.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StringMatcher {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contains: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub safe_regex: Option<SafeRegex>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SafeRegex {
    pub regex: String,
}

/// A compiled [`StatsMatcher`].
#[derive(Debug, Clone)]
pub struct MetricFilter {
    include: bool,
    patterns: Vec<CompiledMatcher>,
}

#[derive(Debug, Clone)]
enum CompiledMatcher {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(regex::Regex),
}

impl MetricFilter {
    pub fn allows(&self, name: &str) -> bool {
        let matched = self.patterns.iter().any(|p| match p {
            CompiledMatcher::Exact(s) => name == s,
            CompiledMatcher::Prefix(s) => name.starts_with(s.as_str()),
            CompiledMatcher::Suffix(s) => name.ends_with(s.as_str()),
            CompiledMatcher::Contains(s) => name.contains(s.as_str()),
            CompiledMatcher::Regex(r) => r.is_match(name),
        });
        matched == self.include
    }
}

impl StatsMatcher {
    /// The matcher ready to use; `None` when it has no list. Validation has checked it compiles.
    pub fn compile(&self) -> Option<MetricFilter> {
        let (include, list) = match (&self.inclusion_list, &self.exclusion_list) {
            (Some(list), _) => (true, list),
            (None, Some(list)) => (false, list),
            (None, None) => return None,
        };
        let patterns = list
            .patterns
            .iter()
            .filter_map(|p| p.compile().ok())
            .collect();
        Some(MetricFilter { include, patterns })
    }

    fn validate(&self, report: &mut Report<'_>) {
        if self.inclusion_list.is_some() && self.exclusion_list.is_some() {
            report.push(
                "stats_matcher".to_owned(),
                "set inclusion_list or exclusion_list, not both".to_owned(),
            );
        }
        for (name, list) in [
            ("inclusion_list", &self.inclusion_list),
            ("exclusion_list", &self.exclusion_list),
        ] {
            for (i, pattern) in list.iter().flat_map(|l| l.patterns.iter()).enumerate() {
                if let Err(reason) = pattern.compile() {
                    report.push(format!("stats_matcher.{name}.patterns[{i}]"), reason);
                }
            }
        }
    }
}

impl StringMatcher {
    fn compile(&self) -> Result<CompiledMatcher, String> {
        let set = [
            self.exact.is_some(),
            self.prefix.is_some(),
            self.suffix.is_some(),
            self.contains.is_some(),
            self.safe_regex.is_some(),
        ]
        .iter()
        .filter(|s| **s)
        .count();
        if set != 1 {
            return Err(format!(
                "exactly one of exact, prefix, suffix, contains, safe_regex must be set (found {set})"
            ));
        }
        Ok(if let Some(s) = &self.exact {
            CompiledMatcher::Exact(s.clone())
        } else if let Some(s) = &self.prefix {
            CompiledMatcher::Prefix(s.clone())
        } else if let Some(s) = &self.suffix {
            CompiledMatcher::Suffix(s.clone())
        } else if let Some(s) = &self.contains {
            CompiledMatcher::Contains(s.clone())
        } else {
            let regex = &self.safe_regex.as_ref().expect("counted above").regex;
            CompiledMatcher::Regex(
                regex::Regex::new(regex).map_err(|e| format!("safe_regex.regex: {e}"))?,
            )
        })
    }
}

/// WasmPlugin objects (and the dockerconfigjson Secrets they name) watched in the gateway's
/// namespace and the root namespace (`workload.namespace`, `workload.root_namespace`), mirrored to
/// files that go through the same validation and hot reload as `plugins_dir`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesSource {
    /// A kubeconfig file; default: in-cluster service account, else `$KUBECONFIG` or `~/.kube/config`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// Where the mirror is written; default: `kubernetes/` in the module cache folder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirror_dir: Option<PathBuf>,
}

/// Limits for plugin VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginLimits {
    /// The longest a single callback may run before it is stopped and handled as a trap (the
    /// plugin's failure policy applies); default 2s, 0 for none.
    #[serde(with = "serde_duration")]
    pub callback_time_limit: Duration,
    /// The linear memory one VM may grow to, in bytes (default 256 MiB). Growth past it fails as
    /// `memory.grow` fails; the allocator's abort that follows is a trap.
    pub max_memory_bytes: usize,
    /// The Wasm stack one callback may use, in bytes (default 512 KiB); deeper recursion traps.
    pub max_stack_bytes: usize,
    /// Outbound calls (HTTP and gRPC) one VM may have in flight (default 1024); one more answers
    /// INTERNAL_FAILURE.
    pub max_http_calls: usize,
    /// Messages one shared queue may hold (default 10000); enqueue onto a full queue answers
    /// INTERNAL_FAILURE.
    pub max_queue_length: usize,
}

impl PluginLimits {
    const MIN_MEMORY: usize = 64 << 10;
    const MAX_MEMORY: usize = 4 << 30;
    const MIN_STACK: usize = 64 << 10;
    const MAX_STACK: usize = 64 << 20;

    fn validate(&self, report: &mut Report<'_>) {
        if !(Self::MIN_MEMORY..=Self::MAX_MEMORY).contains(&self.max_memory_bytes) {
            report.push(
                "plugin_limits.max_memory_bytes".to_owned(),
                format!(
                    "{} is outside 65536 (one Wasm page) to 4294967296 (4 GiB, all a 32-bit \
                     module can address)",
                    self.max_memory_bytes
                ),
            );
        }
        if !(Self::MIN_STACK..=Self::MAX_STACK).contains(&self.max_stack_bytes) {
            report.push(
                "plugin_limits.max_stack_bytes".to_owned(),
                format!(
                    "{} is outside 65536 to 67108864 (64 KiB to 64 MiB)",
                    self.max_stack_bytes
                ),
            );
        }
        if self.max_http_calls == 0 {
            report.push(
                "plugin_limits.max_http_calls".to_owned(),
                "must be at least 1".to_owned(),
            );
        }
        if self.max_queue_length == 0 {
            report.push(
                "plugin_limits.max_queue_length".to_owned(),
                "must be at least 1".to_owned(),
            );
        }
    }
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            callback_time_limit: Duration::from_secs(2),
            max_memory_bytes: 256 << 20,
            max_stack_bytes: 512 << 10,
            max_http_calls: 1024,
            max_queue_length: 10_000,
        }
    }
}

/// Remote module fetching (Istio's agent defaults).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModuleFetch {
    /// Deadline for one module, all attempts together (default 30s, as istiod sets).
    #[serde(with = "serde_duration")]
    pub timeout: Duration,
    /// Timeout of one HTTP attempt (default 15s).
    #[serde(with = "serde_duration")]
    pub attempt_timeout: Duration,
    /// Attempts in all, the first included (default 5).
    pub max_attempts: u32,
    /// The largest module accepted, also unpacked (default 256 MiB).
    pub max_module_bytes: usize,
    /// Extra CA certificates (PEM files) trusted for module servers and registries.
    pub ca_files: Vec<PathBuf>,
    /// After a failed fetch, the first background retry waits this long, doubling up to 5 minutes
    /// (default 1s).
    #[serde(with = "serde_duration")]
    pub retry_initial_backoff: Duration,
}

impl Default for ModuleFetch {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(15),
            max_attempts: 5,
            max_module_bytes: 256 << 20,
            ca_files: Vec::new(),
            retry_initial_backoff: Duration::from_secs(1),
        }
    }
}

/// The module cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModuleCache {
    /// Default: `$WASMGATE_CACHE_DIR`, else `~/.cache/wasmgate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Modules unused this long are removed (default 24h, Istio's `WASM_MODULE_EXPIRY`).
    #[serde(with = "serde_duration")]
    pub expiry: Duration,
    /// How often expiry is checked (default 1h).
    #[serde(with = "serde_duration")]
    pub purge_interval: Duration,
}

impl Default for ModuleCache {
    fn default() -> Self {
        Self {
            dir: None,
            expiry: Duration::from_secs(24 * 3600),
            purge_interval: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub name: String,
    /// `ip:port`; port 0 picks a free port.
    #[serde(deserialize_with = "de_socket_addr")]
    pub address: SocketAddr,
    /// The listener's traffic direction for WasmPlugin `match[].mode`: `CLIENT` (the default, as
    /// Istio treats every gateway listener) or `SERVER` (as a sidecar's inbound listener).
    #[serde(default)]
    pub mode: ListenerMode,
    /// Envoy-style Wasm filters, in chain order (see [`GatewayConfig::chain_for_listener`]).
    #[serde(default)]
    pub http_filters: Vec<HttpFilter>,
    /// Envoy-style Wasm network filters (the same fields as `http_filters`), run on the
    /// connection's bytes (see [`GatewayConfig::chain_for_network_listener`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_filters: Vec<HttpFilter>,
    /// Makes the listener a TCP proxy (Envoy's `tcp_proxy`): connections go to a cluster as bytes,
    /// through `network_filters`; no HTTP, no routes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_proxy: Option<TcpProxy>,
    /// Tried in order; the first route whose domains and match fit the request wins.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// TLS termination; HTTP/2 and HTTP/1.1 are offered by ALPN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTls>,
    #[serde(default)]
    pub limits: ListenerLimits,
}

/// Where a TCP proxy listener sends its connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpProxy {
    /// The cluster connections go to.
    pub cluster: String,
    /// TLS passthrough: a connection whose ClientHello names one of `server_names` (exact, or
    /// `*.suffix`) goes to that route's cluster; the TLS bytes pass untouched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sni_routes: Vec<SniRoute>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniRoute {
    pub server_names: Vec<String>,
    pub cluster: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// PEM certificate chain; resolved against the config file's folder.
    pub cert_file: PathBuf,
    /// PEM private key; resolved against the config file's folder.
    pub key_file: PathBuf,
}

/// Per-listener limits. A zero timeout means none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerLimits {
    /// Total size of the request line and headers, in KiB (default 60; over it: 431).
    pub max_request_headers_kb: u32,
    /// Number of request headers (default 100; over it: 431).
    pub max_headers_count: u32,
    /// Time allowed for a request's headers to arrive (default 10s).
    #[serde(with = "serde_duration")]
    pub header_read_timeout: Duration,
    /// A connection with no request in flight is closed after this (default 300s).
    #[serde(with = "serde_duration")]
    pub idle_timeout: Duration,
    /// The most a stream buffers for plugins that pause on body (default 1 MiB; over it: 413 on the
    /// request, 500 on the response).
    pub per_stream_buffer_limit_bytes: usize,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_request_headers_kb: 60,
            max_headers_count: 100,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            per_stream_buffer_limit_bytes: 1024 * 1024,
        }
    }
}

/// A route: which requests (domains, match) go where (exactly one of `cluster`, `direct_response`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Host patterns: `example.com`, `*.example.com`, `foo.*`, `*`. Empty = any host.
    /// See [`domain_matches`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
    #[serde(rename = "match")]
    pub route_match: RouteMatch,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_response: Option<DirectResponse>,
    /// Overrides the cluster's `request_timeout` for this route (0 = none).
    #[serde(
        default,
        with = "serde_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
}

/// Exactly one of `prefix`, `path` (exact), `safe_regex` (must match the whole path).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safe_regex: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectResponse {
    /// 100..=599.
    pub status: u16,
    #[serde(default)]
    pub body: String,
}

/// What a route does, once validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteAction<'a> {
    Cluster(&'a str),
    DirectResponse(&'a DirectResponse),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Routes, and plugins' `proxy_http_call` / `proxy_grpc_call`, name clusters by this.
    pub name: String,
    /// Round-robin endpoints: `ip:port` or `dns-name:port`.
    pub endpoints: Vec<Endpoint>,
    /// Default 5s.
    #[serde(default = "default_connect_timeout", with = "serde_duration")]
    pub connect_timeout: Duration,
    /// Default 15s; 0 = none. A route's `timeout` overrides it.
    #[serde(default = "default_request_timeout", with = "serde_duration")]
    pub request_timeout: Duration,
    /// HTTP/2 to the upstream (prior knowledge in clear text, ALPN `h2` over TLS).
    #[serde(default)]
    pub http2: bool,
    /// TLS to the upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClusterTls>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterTls {
    /// Server name to send and verify; default: the endpoint's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// PEM CA bundle; default: the system's roots. Resolved against the config file's folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// An upstream endpoint: an IP address or DNS name, and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// An IP literal (IPv6 without brackets) or a DNS name.
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    /// The socket address when the host is an IP literal (no resolution needed).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.host
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, self.port))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            if addr.port() == 0 {
                return Err(format!("bad endpoint {s:?}: port must not be 0"));
            }
            return Ok(Self {
                host: addr.ip().to_string(),
                port: addr.port(),
            });
        }
        let bad = |why: &str| format!("bad endpoint {s:?}: {why}");
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| bad("expected host:port (an IP address or DNS name, and a port)"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| bad("the port must be a number from 1 to 65535"))?;
        if port == 0 {
            return Err(bad("port must not be 0"));
        }
        if !is_dns_name(host) {
            return Err(bad(
                "the host must be an IP address or a DNS name (letters, digits, '-', '.')",
            ));
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

impl Serialize for Endpoint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Endpoint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn is_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.trim_end_matches('.').split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn de_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(|e| {
        serde::de::Error::custom(format!(
            "bad address {s:?}: {e} (expected ip:port, e.g. 127.0.0.1:8080 or [::1]:8080)"
        ))
    })
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn default_admin() -> SocketAddr {
    DEFAULT_ADMIN
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_request_timeout() -> Duration {
    Duration::from_secs(15)
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            source: String::new(),
            workers: default_workers(),
            admin: DEFAULT_ADMIN,
            listeners: Vec::new(),
            clusters: Vec::new(),
            plugins_dir: None,
            insecure_registries: Vec::new(),
            pull_secrets_dir: None,
            module_fetch: ModuleFetch::default(),
            module_cache: ModuleCache::default(),
            workload: Workload::default(),
            kubernetes: None,
            plugin_limits: PluginLimits::default(),
            stats_matcher: None,
        }
    }
}

impl GatewayConfig {
    /// Reads and parses a YAML file; relative paths in it resolve against the file's folder. Does not
    /// [`validate`](Self::validate).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(&source, "", format!("cannot read the file: {e}")))?;
        let base = path.parent().unwrap_or(Path::new(""));
        Self::from_yaml_str_in(&text, &source, base)
    }

    /// Parses YAML text; `source_name` names it in errors. Relative paths stay relative (to the
    /// process's working directory); see [`from_yaml_str_in`](Self::from_yaml_str_in).
    pub fn from_yaml_str(text: &str, source_name: &str) -> Result<Self, ConfigError> {
        Self::from_yaml_str_in(text, source_name, Path::new(""))
    }

    /// Parses YAML text, resolving relative paths (plugin files, `plugins_dir`, certificate, key and
    /// CA files) against `base_dir`.
    pub fn from_yaml_str_in(
        text: &str,
        source_name: &str,
        base_dir: &Path,
    ) -> Result<Self, ConfigError> {
        // Syntax first, so that a syntax error is reported without a (misleading) field path.
        serde_yaml::from_str::<serde_yaml::Value>(text)
            .map_err(|e| ConfigError::from_yaml(source_name, &e))?;
        let mut config: GatewayConfig = if text.trim().is_empty() {
            GatewayConfig::default()
        } else {
            serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(text))
                .map_err(|e| ConfigError::from_serde(source_name, "", e))?
        };
        config.source = source_name.to_owned();
        config.resolve_paths(base_dir);
        Ok(config)
    }

    /// [`from_file`](Self::from_file), then [`validate`](Self::validate).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigErrors> {
        let config = Self::from_file(path)?;
        config.validate()?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        if let Some(dir) = &mut self.plugins_dir {
            *dir = crate::resolve_path(base, dir);
        }
        if let Some(dir) = &mut self.pull_secrets_dir {
            *dir = crate::resolve_path(base, dir);
        }
        if let Some(kubernetes) = &mut self.kubernetes {
            for path in [&mut kubernetes.kubeconfig, &mut kubernetes.mirror_dir]
                .into_iter()
                .flatten()
            {
                *path = crate::resolve_path(base, path);
            }
        }
        if let Some(dir) = &mut self.module_cache.dir {
            *dir = crate::resolve_path(base, dir);
        }
        for ca in &mut self.module_fetch.ca_files {
            *ca = crate::resolve_path(base, ca);
        }
        for listener in &mut self.listeners {
            for filter in listener
                .http_filters
                .iter_mut()
                .chain(listener.network_filters.iter_mut())
            {
                filter.resolve_paths(base);
            }
            if let Some(tls) = &mut listener.tls {
                tls.cert_file = crate::resolve_path(base, &tls.cert_file);
                tls.key_file = crate::resolve_path(base, &tls.key_file);
            }
        }
        for cluster in &mut self.clusters {
            if let Some(ca) = cluster.tls.as_mut().and_then(|t| t.ca_file.as_mut()) {
                *ca = crate::resolve_path(base, ca);
            }
        }
    }

    /// Checks what types cannot: every problem found, each with the file, the field path and the
    /// reason.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut report = Report::new(&self.source);

        if self.workers == 0 {
            report.push("workers".to_owned(), "must be at least 1".to_owned());
        }

        let mut cluster_names: HashMap<&str, usize> = HashMap::new();
        for (ci, cluster) in self.clusters.iter().enumerate() {
            let at = format!("clusters[{ci}]");
            if cluster.name.is_empty() {
                report.push(format!("{at}.name"), "must not be empty".to_owned());
            } else if let Some(first) = cluster_names.insert(&cluster.name, ci) {
                cluster_names.insert(&cluster.name, first);
                report.push(
                    format!("{at}.name"),
                    format!(
                        "duplicate cluster name {:?} (also clusters[{first}])",
                        cluster.name
                    ),
                );
            }
            if cluster.endpoints.is_empty() {
                report.push(
                    format!("{at}.endpoints"),
                    "at least one endpoint is required".to_owned(),
                );
            }
            if let Some(tls) = &cluster.tls {
                if tls.sni.as_deref() == Some("") {
                    report.push(format!("{at}.tls.sni"), "must not be empty".to_owned());
                }
                if let Some(reason) = tls.ca_file.as_deref().and_then(crate::check_file) {
                    report.push(format!("{at}.tls.ca_file"), reason);
                }
            }
        }
        let mut known: Vec<&str> = cluster_names.keys().copied().collect();
        known.sort_unstable();
        let known = if known.is_empty() {
            "no clusters are defined".to_owned()
        } else {
            format!("known: {}", known.join(", "))
        };

        let mut listener_names: HashMap<&str, usize> = HashMap::new();
        let mut addresses: HashMap<SocketAddr, usize> = HashMap::new();
        for (li, listener) in self.listeners.iter().enumerate() {
            let at = format!("listeners[{li}]");
            if listener.name.is_empty() {
                report.push(format!("{at}.name"), "must not be empty".to_owned());
            } else if let Some(first) = listener_names.insert(&listener.name, li) {
                listener_names.insert(&listener.name, first);
                report.push(
                    format!("{at}.name"),
                    format!(
                        "duplicate listener name {:?} (also listeners[{first}])",
                        listener.name
                    ),
                );
            }
            if listener.address.port() != 0 {
                if let Some(first) = addresses.insert(listener.address, li) {
                    addresses.insert(listener.address, first);
                    report.push(
                        format!("{at}.address"),
                        format!(
                            "duplicate address {} (also listeners[{first}])",
                            listener.address
                        ),
                    );
                }
                if listener.address == self.admin {
                    report.push(
                        format!("{at}.address"),
                        format!("address {} is also the admin address", listener.address),
                    );
                }
            }
            if let Some(tls) = &listener.tls {
                if let Some(reason) = crate::check_file(&tls.cert_file) {
                    report.push(format!("{at}.tls.cert_file"), reason);
                }
                if let Some(reason) = crate::check_file(&tls.key_file) {
                    report.push(format!("{at}.tls.key_file"), reason);
                }
            }
            let limits = &listener.limits;
            for (name, value) in [
                (
                    "max_request_headers_kb",
                    limits.max_request_headers_kb as usize,
                ),
                ("max_headers_count", limits.max_headers_count as usize),
                (
                    "per_stream_buffer_limit_bytes",
                    limits.per_stream_buffer_limit_bytes,
                ),
            ] {
                if value == 0 {
                    report.push(
                        format!("{at}.limits.{name}"),
                        "must be at least 1".to_owned(),
                    );
                }
            }
            for (fi, filter) in listener.http_filters.iter().enumerate() {
                filter.validate(&format!("{at}.http_filters[{fi}]"), &mut report);
            }
            for (fi, filter) in listener.network_filters.iter().enumerate() {
                filter.validate(&format!("{at}.network_filters[{fi}]"), &mut report);
            }
            if let Some(proxy) = &listener.tcp_proxy {
                let unknown =
                    |cluster: &str| format!("unknown cluster {cluster:?} (known: {known})");
                if !cluster_names.contains_key(proxy.cluster.as_str()) {
                    report.push(format!("{at}.tcp_proxy.cluster"), unknown(&proxy.cluster));
                }
                for (si, route) in proxy.sni_routes.iter().enumerate() {
                    if !cluster_names.contains_key(route.cluster.as_str()) {
                        report.push(
                            format!("{at}.tcp_proxy.sni_routes[{si}].cluster"),
                            unknown(&route.cluster),
                        );
                    }
                    if route.server_names.is_empty()
                        || route.server_names.iter().any(String::is_empty)
                    {
                        report.push(
                            format!("{at}.tcp_proxy.sni_routes[{si}].server_names"),
                            "list at least one server name, none empty".to_owned(),
                        );
                    }
                }
                for (field, present) in [
                    ("routes", !listener.routes.is_empty()),
                    ("http_filters", !listener.http_filters.is_empty()),
                    ("tls", listener.tls.is_some()),
                ] {
                    if present {
                        report.push(
                            format!("{at}.{field}"),
                            "a tcp_proxy listener carries bytes, not HTTP: remove it (TLS passes through; route it with tcp_proxy.sni_routes)".to_owned(),
                        );
                    }
                }
            }
            for (ri, route) in listener.routes.iter().enumerate() {
                let at = format!("{at}.routes[{ri}]");
                validate_route(route, &at, &cluster_names, &known, &mut report);
            }
        }

        if let Some(dir) = &self.plugins_dir
            && !dir.is_dir()
        {
            report.push(
                "plugins_dir".to_owned(),
                format!("directory not found: {}", dir.display()),
            );
        }
        if let Some(dir) = &self.pull_secrets_dir
            && !dir.is_dir()
        {
            report.push(
                "pull_secrets_dir".to_owned(),
                format!("directory not found: {}", dir.display()),
            );
        }
        for (i, registry) in self.insecure_registries.iter().enumerate() {
            if registry.is_empty() || registry.contains('/') || registry.contains("://") {
                report.push(
                    format!("insecure_registries[{i}]"),
                    format!("{registry:?} is not a registry host (write host or host:port)"),
                );
            }
        }
        let fetch = &self.module_fetch;
        if fetch.timeout.is_zero() {
            report.push(
                "module_fetch.timeout".to_owned(),
                "must be more than 0".to_owned(),
            );
        }
        if fetch.attempt_timeout.is_zero() {
            report.push(
                "module_fetch.attempt_timeout".to_owned(),
                "must be more than 0".to_owned(),
            );
        }
        if fetch.max_attempts == 0 {
            report.push(
                "module_fetch.max_attempts".to_owned(),
                "must be at least 1".to_owned(),
            );
        }
        if fetch.max_module_bytes < 8 {
            report.push(
                "module_fetch.max_module_bytes".to_owned(),
                "must be at least 8 (the smallest Wasm module)".to_owned(),
            );
        }
        for (i, ca) in fetch.ca_files.iter().enumerate() {
            if !ca.is_file() {
                report.push(
                    format!("module_fetch.ca_files[{i}]"),
                    format!("file not found: {}", ca.display()),
                );
            }
        }
        self.workload.validate(&mut report);
        self.plugin_limits.validate(&mut report);
        if let Some(matcher) = &self.stats_matcher {
            matcher.validate(&mut report);
        }
        report.errors.into_result()
    }

    /// The listener's HTTP plugin chain, in request order (responses run it in reverse):
    ///
    /// 1. the WasmPlugins of phase `AUTHN`, then `AUTHZ`, then `STATS`,
    /// 2. then the listener's own `http_filters`, in the order written,
    /// 3. then the WasmPlugins of phase `UNSPECIFIED_PHASE` ("at the end of the filter chain, right
    ///    before the Router", as Istio's API puts it).
    ///
    /// The WasmPlugins are those of type `HTTP` (or unspecified) that apply to this listener as
    /// istiod applies them ([`applies_to_listener`](Self::applies_to_listener): namespace,
    /// `selector` / `targetRefs` against [`workload`](Self::workload), `match` against the
    /// listener's port and [`mode`](Listener::mode)), within a phase in Istio's order
    /// ([`order_plugins_for`]). An out-of-range `listener_index` gives an empty chain; a filter
    /// without code (which validation rejects) is left out.
    pub fn chain_for_listener(
        &self,
        listener_index: usize,
        wasm_plugins: &[WasmPluginSpec],
    ) -> Vec<PluginSpec> {
        let Some(listener) = self.listeners.get(listener_index) else {
            return Vec::new();
        };
        let own = listener
            .http_filters
            .iter()
            .enumerate()
            .filter_map(|(i, f)| f.to_plugin_spec(&listener.name, i));
        self.assemble_chain(listener, wasm_plugins, true, own)
    }

    /// The listener's network (L4) plugin chain: the WasmPlugins of type `NETWORK` that apply to
    /// it (as in [`chain_for_listener`](Self::chain_for_listener)), phases `AUTHN`, `AUTHZ`,
    /// `STATS`, then unspecified, each in Istio's order. Istio runs them as
    /// `envoy.filters.network.wasm` on the listener's connections, HTTP ones included; they are
    /// never in the HTTP chain. The listener's own `network_filters` come after the phased
    /// WasmPlugins and before the unphased ones, as its `http_filters` do in the HTTP chain.
    pub fn chain_for_network_listener(
        &self,
        listener_index: usize,
        wasm_plugins: &[WasmPluginSpec],
    ) -> Vec<PluginSpec> {
        let Some(listener) = self.listeners.get(listener_index) else {
            return Vec::new();
        };
        let own = listener
            .network_filters
            .iter()
            .enumerate()
            .filter_map(|(i, f)| {
                let mut spec = f.to_plugin_spec(&listener.name, i)?;
                spec.origin = crate::PluginOrigin::EnvoyNetworkFilter {
                    listener: listener.name.clone(),
                    index: i,
                };
                Some(spec)
            });
        self.assemble_chain(listener, wasm_plugins, false, own)
    }

    /// A chain in Istio's order: the WasmPlugins of the given type that apply to the listener with
    /// a phase, then the listener's `own` filters, then those without a phase.
    fn assemble_chain(
        &self,
        listener: &Listener,
        wasm_plugins: &[WasmPluginSpec],
        http: bool,
        own: impl Iterator<Item = PluginSpec>,
    ) -> Vec<PluginSpec> {
        let mut istio: Vec<&WasmPluginSpec> = wasm_plugins
            .iter()
            .filter(|p| {
                p.spec.plugin_type.is_http() == http && self.applies_to_listener(listener, p)
            })
            .collect();
        order_plugins_for(&self.workload, &mut istio);
        let (before, after): (Vec<_>, Vec<_>) = istio
            .into_iter()
            .partition(|p| p.spec.phase != PluginPhase::UnspecifiedPhase);
        before
            .into_iter()
            .map(WasmPluginSpec::to_plugin_spec)
            .chain(own)
            .chain(after.into_iter().map(WasmPluginSpec::to_plugin_spec))
            .collect()
    }

    /// Whether a WasmPlugin (of either type) applies to the listener as istiod decides it: the
    /// workload selects it ([`Workload::selects`]: namespace, `selector`, `targetRefs`) and its
    /// `match` selects the listener's port and direction
    /// ([`WasmPluginSpec::matches_listener`]). A listener on port 0 (a free port picked at start)
    /// matches only `match` entries without `ports`.
    pub fn applies_to_listener(&self, listener: &Listener, plugin: &WasmPluginSpec) -> bool {
        self.workload.selects(plugin)
            && plugin.matches_listener(listener.address.port(), listener.mode)
    }

    /// The index of the listener with this name.
    pub fn listener_index(&self, name: &str) -> Option<usize> {
        self.listeners.iter().position(|l| l.name == name)
    }

    /// The cluster with this name.
    pub fn cluster(&self, name: &str) -> Option<&Cluster> {
        self.clusters.iter().find(|c| c.name == name)
    }
}

fn validate_route(
    route: &Route,
    at: &str,
    clusters: &HashMap<&str, usize>,
    known: &str,
    report: &mut Report<'_>,
) {
    let m = &route.route_match;
    let set: Vec<&str> = [
        ("prefix", m.prefix.is_some()),
        ("path", m.path.is_some()),
        ("safe_regex", m.safe_regex.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, is_set)| is_set.then_some(name))
    .collect();
    if set.len() != 1 {
        let found = if set.is_empty() {
            "none".to_owned()
        } else {
            set.join(", ")
        };
        report.push(
            format!("{at}.match"),
            format!("exactly one of prefix, path, safe_regex must be set (found {found})"),
        );
    }
    if let Some(path) = &m.path
        && !path.starts_with('/')
    {
        report.push(
            format!("{at}.match.path"),
            format!("{path:?} must start with '/'"),
        );
    }
    if let Some(re) = &m.safe_regex
        && let Err(e) = compile_full_match(re)
    {
        report.push(format!("{at}.match.safe_regex"), e);
    }
    for (di, domain) in route.domains.iter().enumerate() {
        if let Err(reason) = check_domain(domain) {
            report.push(format!("{at}.domains[{di}]"), reason);
        }
    }
    match (&route.cluster, &route.direct_response) {
        (Some(_), Some(_)) => report.push(
            at.to_owned(),
            "exactly one of cluster, direct_response must be set (found both)".to_owned(),
        ),
        (None, None) => report.push(
            at.to_owned(),
            "exactly one of cluster, direct_response must be set (found neither)".to_owned(),
        ),
        _ => {}
    }
    if let Some(cluster) = &route.cluster
        && !clusters.contains_key(cluster.as_str())
    {
        report.push(
            format!("{at}.cluster"),
            format!("unknown cluster {cluster:?} ({known})"),
        );
    }
    if let Some(direct) = &route.direct_response
        && !(100..=599).contains(&direct.status)
    {
        report.push(
            format!("{at}.direct_response.status"),
            format!("status {} is outside 100..=599", direct.status),
        );
    }
}

fn check_domain(domain: &str) -> Result<(), String> {
    if domain.is_empty() {
        return Err("a domain must not be empty".to_owned());
    }
    let stars = domain.matches('*').count();
    if domain == "*" {
        return Ok(());
    }
    if stars > 1 || (stars == 1 && !domain.starts_with('*') && !domain.ends_with('*')) {
        return Err(format!(
            "invalid domain {domain:?}: one wildcard at most, at the start or the end"
        ));
    }
    if domain.contains(char::is_whitespace) || domain.contains('/') {
        return Err(format!("invalid domain {domain:?}"));
    }
    Ok(())
}

/// Whether a route domain pattern matches a request host (`Host` / `:authority`), as Envoy matches
/// virtual host domains: case-insensitive; `*` matches any host; `*.example.com` / `*-bar.example.com`
/// match a non-empty prefix, `foo.*` a non-empty suffix; otherwise exact. A host with a port is tried
/// with the port, then without it.
pub fn domain_matches(pattern: &str, host: &str) -> bool {
    let matches = |host: &str| {
        let (p, h) = (pattern.to_ascii_lowercase(), host.to_ascii_lowercase());
        if p == "*" {
            true
        } else if let Some(suffix) = p.strip_prefix('*') {
            h.len() > suffix.len() && h.ends_with(suffix)
        } else if let Some(prefix) = p.strip_suffix('*') {
            h.len() > prefix.len() && h.starts_with(prefix)
        } else {
            p == h
        }
    };
    matches(host) || strip_port(host).is_some_and(matches)
}

fn strip_port(host: &str) -> Option<&str> {
    if let Some(rest) = host.strip_prefix('[') {
        let end = rest.find(']')?;
        return (rest.len() > end + 1).then(|| &host[..end + 2]);
    }
    let (name, port) = host.rsplit_once(':')?;
    (!name.contains(':') && port.bytes().all(|b| b.is_ascii_digit())).then_some(name)
}

impl Route {
    /// The action, when exactly one of `cluster` / `direct_response` is set (always, once validated).
    pub fn action(&self) -> Option<RouteAction<'_>> {
        match (&self.cluster, &self.direct_response) {
            (Some(c), None) => Some(RouteAction::Cluster(c)),
            (None, Some(d)) => Some(RouteAction::DirectResponse(d)),
            _ => None,
        }
    }

    /// Whether the route's `domains` accept this host (no domains = any host).
    pub fn matches_host(&self, host: &str) -> bool {
        self.domains.is_empty() || self.domains.iter().any(|d| domain_matches(d, host))
    }
}

/// A compiled path match; build it once per route with [`RouteMatch::matcher`].
#[derive(Debug, Clone)]
pub enum PathMatcher {
    Prefix(String),
    Exact(String),
    /// Anchored: matches only the whole path.
    Regex(regex::Regex),
}

impl PathMatcher {
    /// Matches a request's `:path`. `Prefix` looks at the whole `:path`; `Exact` and `Regex` at the
    /// path without its query string, as Envoy does.
    pub fn matches(&self, path: &str) -> bool {
        let without_query = path.split_once('?').map_or(path, |(p, _)| p);
        match self {
            PathMatcher::Prefix(prefix) => path.starts_with(prefix.as_str()),
            PathMatcher::Exact(exact) => without_query == exact,
            PathMatcher::Regex(re) => re.is_match(without_query),
        }
    }
}

impl RouteMatch {
    /// Compiles the match (the first of prefix, path, safe_regex that is set). Errors name the
    /// reason, as validation reports it.
    pub fn matcher(&self) -> Result<PathMatcher, String> {
        if let Some(prefix) = &self.prefix {
            Ok(PathMatcher::Prefix(prefix.clone()))
        } else if let Some(path) = &self.path {
            Ok(PathMatcher::Exact(path.clone()))
        } else if let Some(re) = &self.safe_regex {
            compile_full_match(re).map(PathMatcher::Regex)
        } else {
            Err("exactly one of prefix, path, safe_regex must be set (found none)".to_owned())
        }
    }
}

fn compile_full_match(re: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(&format!("^(?:{re})$")).map_err(|e| {
        let text = e.to_string();
        let why = text
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("error: "))
            .map_or_else(|| text.replace('\n', " "), str::to_owned);
        format!("invalid regex {re:?}: {why}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::{CodeSource, FailurePolicy, PluginOrigin};
    use std::fs;

    /// The issue's sample, with every optional field the brief lists.
    fn sample(plugin: &Path) -> String {
        format!(
            r#"
workers: 1
admin: 127.0.0.1:15000
listeners:
  - name: main
    address: 127.0.0.1:8080
    http_filters:
      - name: my-filter
        root_id: ""
        configuration: "a string, or a YAML map that is passed as JSON"
        vm_config: {{ vm_id: v1, runtime: envoy.wasm.runtime.v8, code: {{ local: {{ filename: {} }} }} }}
    routes:
      - match: {{ prefix: / }}
        cluster: upstream
clusters:
  - name: upstream
    endpoints: [127.0.0.1:18080]
plugins_dir: ./plugins.d
"#,
            plugin.display()
        )
    }

    fn temp_with_plugin() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let plugin = dir.path().join("plugin.wasm");
        fs::write(&plugin, b"\0asm\x01\0\0\0").unwrap();
        fs::create_dir(dir.path().join("plugins.d")).unwrap();
        (dir, plugin)
    }

    fn parse(text: &str) -> GatewayConfig {
        GatewayConfig::from_yaml_str(text, "gw.yaml").unwrap()
    }

    fn parse_err(text: &str) -> String {
        GatewayConfig::from_yaml_str(text, "gw.yaml")
            .unwrap_err()
            .to_string()
    }

    fn validate_errs(text: &str) -> Vec<String> {
        match parse(text).validate() {
            Ok(()) => Vec::new(),
            Err(errors) => errors.iter().map(ToString::to_string).collect(),
        }
    }

    const MINIMAL: &str = "
listeners:
  - name: main
    address: 127.0.0.1:0
    routes:
      - match: { prefix: / }
        cluster: upstream
clusters:
  - name: upstream
    endpoints: [127.0.0.1:18080]
";

    #[test]
    fn parses_the_issue_sample() {
        let (dir, plugin) = temp_with_plugin();
        let path = dir.path().join("gateway.yaml");
        fs::write(&path, sample(&plugin)).unwrap();
        let config = GatewayConfig::load(&path).unwrap();
        assert_eq!(config.source, path.display().to_string());
        assert_eq!(config.workers, 1);
        assert_eq!(config.admin, DEFAULT_ADMIN);
        assert_eq!(config.plugins_dir, Some(dir.path().join("./plugins.d")));
        let listener = &config.listeners[0];
        assert_eq!(listener.name, "main");
        assert_eq!(listener.address, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(listener.limits, ListenerLimits::default());
        assert_eq!(listener.tls, None);
        let filter = &listener.http_filters[0];
        assert_eq!(filter.name, "my-filter");
        assert_eq!(filter.root_id, "");
        assert_eq!(
            filter.configuration,
            "a string, or a YAML map that is passed as JSON"
        );
        assert_eq!(filter.vm_config.vm_id, "v1");
        assert_eq!(
            filter.vm_config.runtime.as_deref(),
            Some("envoy.wasm.runtime.v8")
        );
        let route = &listener.routes[0];
        assert_eq!(route.route_match.prefix.as_deref(), Some("/"));
        assert_eq!(route.action(), Some(RouteAction::Cluster("upstream")));
        assert!(route.matches_host("anything.example"));
        let cluster = config.cluster("upstream").unwrap();
        assert_eq!(
            cluster.endpoints,
            vec![Endpoint {
                host: "127.0.0.1".into(),
                port: 18080
            }]
        );
        assert_eq!(
            cluster.endpoints[0].socket_addr(),
            Some("127.0.0.1:18080".parse().unwrap())
        );
        assert_eq!(cluster.connect_timeout, Duration::from_secs(5));
        assert_eq!(cluster.request_timeout, Duration::from_secs(15));
        assert!(!cluster.http2);

        let chain = config.chain_for_listener(0, &[]);
        assert_eq!(
            chain,
            vec![PluginSpec {
                name: "my-filter".into(),
                root_id: String::new(),
                vm_id: "v1".into(),
                vm_configuration: Vec::new(),
                configuration: b"a string, or a YAML map that is passed as JSON".to_vec(),
                source: CodeSource::Local(plugin.clone()),
                environment: Vec::new(),
                failure_policy: FailurePolicy::FailClosed,
                image_pull_policy: None,
                image_pull_secret: None,
                capabilities: None,
                reload_backoff: Default::default(),
                origin: PluginOrigin::EnvoyFilter {
                    listener: "main".into(),
                    index: 0
                },
            }]
        );
        assert!(config.chain_for_listener(1, &[]).is_empty());
    }

    #[test]
    fn defaults_when_optional_fields_are_absent() {
        let config = parse(MINIMAL);
        assert_eq!(
            config.workers,
            std::thread::available_parallelism().unwrap().get()
        );
        assert_eq!(config.admin.to_string(), "127.0.0.1:15000");
        assert_eq!(config.plugins_dir, None);
        let limits = &config.listeners[0].limits;
        assert_eq!(limits.max_request_headers_kb, 60);
        assert_eq!(limits.max_headers_count, 100);
        assert_eq!(limits.header_read_timeout, Duration::from_secs(10));
        assert_eq!(limits.idle_timeout, Duration::from_secs(300));
        assert_eq!(limits.per_stream_buffer_limit_bytes, 1 << 20);
        config.validate().unwrap();
        assert_eq!(parse("").listeners, Vec::new());
    }

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let (dir, _) = temp_with_plugin();
        fs::write(dir.path().join("cert.pem"), "x").unwrap();
        fs::write(dir.path().join("key.pem"), "x").unwrap();
        fs::write(dir.path().join("ca.pem"), "x").unwrap();
        let path = dir.path().join("gw.yaml");
        fs::write(
            &path,
            "
listeners:
  - name: main
    address: 127.0.0.1:0
    tls: { cert_file: cert.pem, key_file: ./key.pem }
    http_filters:
      - vm_config: { code: { local: { filename: plugin.wasm } } }
clusters:
  - name: up
    endpoints: [backend.internal:443]
    tls: { sni: backend.internal, ca_file: ca.pem }
plugins_dir: plugins.d
",
        )
        .unwrap();
        let config = GatewayConfig::load(&path).unwrap();
        let l = &config.listeners[0];
        let tls = l.tls.as_ref().unwrap();
        assert_eq!(tls.cert_file, dir.path().join("cert.pem"));
        assert_eq!(tls.key_file, dir.path().join("./key.pem"));
        assert_eq!(
            l.http_filters[0]
                .vm_config
                .code
                .local
                .as_ref()
                .unwrap()
                .filename,
            dir.path().join("plugin.wasm")
        );
        let ctls = config.clusters[0].tls.as_ref().unwrap();
        assert_eq!(ctls.ca_file, Some(dir.path().join("ca.pem")));
        assert_eq!(config.plugins_dir, Some(dir.path().join("plugins.d")));
        assert_eq!(
            config.clusters[0].endpoints[0].to_string(),
            "backend.internal:443"
        );
        assert_eq!(config.clusters[0].endpoints[0].socket_addr(), None);
    }

    #[test]
    fn every_optional_field() {
        let config = parse(
            r#"
listeners:
  - name: main
    address: "[::1]:8443"
    limits:
      max_request_headers_kb: 8
      max_headers_count: 20
      header_read_timeout: 250ms
      idle_timeout: 1m
      per_stream_buffer_limit_bytes: 4096
    routes:
      - name: api
        domains: ["example.com", "*.example.com"]
        match: { safe_regex: "^/api/.*" }
        cluster: upstream
        timeout: 1.5s
      - match: { path: /health }
        direct_response: { status: 200, body: ok }
clusters:
  - name: upstream
    endpoints: ["[::1]:9000", "upstream.svc:80"]
    connect_timeout: 2
    request_timeout: 0
    http2: true
    tls: { insecure_skip_verify: true }
"#,
        );
        let l = &config.listeners[0];
        assert_eq!(l.address.to_string(), "[::1]:8443");
        assert_eq!(l.limits.max_request_headers_kb, 8);
        assert_eq!(l.limits.max_headers_count, 20);
        assert_eq!(l.limits.header_read_timeout, Duration::from_millis(250));
        assert_eq!(l.limits.idle_timeout, Duration::from_secs(60));
        assert_eq!(l.limits.per_stream_buffer_limit_bytes, 4096);
        let api = &l.routes[0];
        assert_eq!(api.name.as_deref(), Some("api"));
        assert_eq!(api.timeout, Some(Duration::from_millis(1500)));
        assert!(api.matches_host("EXAMPLE.com:8443"));
        assert!(api.matches_host("a.example.com"));
        assert!(!api.matches_host("example.org"));
        let m = api.route_match.matcher().unwrap();
        assert!(m.matches("/api/x?y=1"));
        assert!(!m.matches("/apix"));
        let health = &l.routes[1];
        assert_eq!(
            health.action(),
            Some(RouteAction::DirectResponse(&DirectResponse {
                status: 200,
                body: "ok".into()
            }))
        );
        let c = &config.clusters[0];
        assert_eq!(c.endpoints[0].host, "::1");
        assert_eq!(c.endpoints[0].to_string(), "[::1]:9000");
        assert_eq!(c.endpoints[1].host, "upstream.svc");
        assert_eq!(c.connect_timeout, Duration::from_secs(2));
        assert_eq!(c.request_timeout, Duration::ZERO);
        assert!(c.http2);
        assert!(c.tls.as_ref().unwrap().insecure_skip_verify);
        config.validate().unwrap();
    }

    #[test]
    fn configuration_string_or_map_as_json() {
        let config = parse(
            r#"
listeners:
  - name: main
    address: 127.0.0.1:0
    http_filters:
      - name: as-string
        configuration: '{"keep": "as is"}'
        vm_config: { code: { remote: { http_uri: { uri: "https://example.com/p.wasm", timeout: 10s }, sha256: "ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789" } } }
      - name: as-map
        configuration: { header: x-added, values: [1, two], nested: { on: true } }
        vm_config:
          code: { local: { filename: /p.wasm } }
          configuration: { vm: 1 }
          environment_variables: { host_env_keys: [HOME_X, MISSING], key_values: { B: "2", A: "1" } }
      - name: as-envoy-any
        configuration:
          "@type": type.googleapis.com/google.protobuf.StringValue
          value: raw text
        fail_open: true
        vm_config: { code: { local: { filename: /p.wasm } } }
      - name: reload
        failure_policy: FAIL_RELOAD
        vm_config: { code: { local: { filename: /p.wasm } } }
"#,
        );
        let f = &config.listeners[0].http_filters;
        assert_eq!(f[0].configuration, r#"{"keep": "as is"}"#);
        assert_eq!(
            f[1].configuration,
            r#"{"header":"x-added","nested":{"on":true},"values":[1,"two"]}"#
        );
        assert_eq!(f[1].vm_config.configuration, r#"{"vm":1}"#);
        assert_eq!(f[2].configuration, "raw text");

        let env = |k: &str| (k == "HOME_X").then(|| "/home/x".to_owned());
        let specs: Vec<PluginSpec> = f
            .iter()
            .enumerate()
            .map(|(i, f)| f.to_plugin_spec_with_env("main", i, &env).unwrap())
            .collect();
        assert_eq!(
            specs[0].source,
            CodeSource::Remote {
                uri: "https://example.com/p.wasm".into(),
                sha256: Some(
                    "abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789".into()
                ),
            }
        );
        assert_eq!(specs[1].vm_configuration, br#"{"vm":1}"#);
        assert_eq!(
            specs[1].environment,
            vec![
                ("HOME_X".to_owned(), "/home/x".to_owned()),
                ("A".to_owned(), "1".to_owned()),
                ("B".to_owned(), "2".to_owned()),
            ]
        );
        assert_eq!(specs[0].failure_policy, FailurePolicy::FailClosed);
        assert_eq!(specs[2].failure_policy, FailurePolicy::FailOpen);
        assert_eq!(specs[3].failure_policy, FailurePolicy::FailReload);
    }

    #[test]
    fn type_errors_name_the_field_and_position() {
        assert_eq!(
            parse_err("listeners:\n  - name: a\n    address: 127.0.0.1:1\n    clustr: x\n"),
            "gw.yaml: listeners[0].clustr: unknown field `clustr`, expected one of `name`, \
             `address`, `mode`, `http_filters`, `network_filters`, `tcp_proxy`, `routes`, `tls`, \
             `limits` (line 4, column 5)"
        );
        assert_eq!(
            parse_err("listeners:\n  - name: a\n    address: foo\n"),
            "gw.yaml: listeners[0].address: bad address \"foo\": invalid socket address syntax \
             (expected ip:port, e.g. 127.0.0.1:8080 or [::1]:8080) (line 2, column 5)"
        );
        assert_eq!(
            parse_err("admin: localhost:15000\n"),
            "gw.yaml: admin: bad address \"localhost:15000\": invalid socket address syntax \
             (expected ip:port, e.g. 127.0.0.1:8080 or [::1]:8080) (line 1, column 1)"
        );
        assert_eq!(
            parse_err("clusters:\n  - name: up\n    endpoints: [foo]\n"),
            "gw.yaml: clusters[0].endpoints[0]: bad endpoint \"foo\": expected host:port (an IP \
             address or DNS name, and a port) (line 3, column 16)"
        );
        assert_eq!(
            parse_err("clusters:\n  - name: up\n    endpoints: [\"bad host:80\"]\n"),
            "gw.yaml: clusters[0].endpoints[0]: bad endpoint \"bad host:80\": the host must be an \
             IP address or a DNS name (letters, digits, '-', '.') (line 3, column 16)"
        );
        assert_eq!(
            parse_err("clusters:\n  - name: up\n    endpoints: [a:1]\n    connect_timeout: 5 s\n"),
            "gw.yaml: clusters[0].connect_timeout: invalid duration \"5 s\": expected a number \
             with a unit (ns, us, ms, s, m, h), e.g. \"10s\", \"250ms\", \"1.5s\", \"1m\", or a \
             number of seconds (line 4, column 22)"
        );
        assert_eq!(
            parse_err("listeners:\n  - address: 127.0.0.1:1\n"),
            "gw.yaml: listeners[0].name: required field is missing (line 2, column 5)"
        );
        assert_eq!(
            parse_err("workers: -1\n"),
            "gw.yaml: workers: invalid type: integer `-1`, expected usize (line 1, column 10)"
        );
        assert_eq!(
            parse_err(
                "listeners:\n  - name: a\n    address: 127.0.0.1:1\n    http_filters:\n      - \
                 vm_config: { code: { local: { filename: /x } } }\n        failure_policy: OPEN\n"
            ),
            "gw.yaml: listeners[0].http_filters[0].failure_policy: unknown variant `OPEN`, \
             expected one of `UNSPECIFIED`, `FAIL_CLOSED`, `FAIL_OPEN`, `FAIL_RELOAD` (line 6, \
             column 25)"
        );
        // Syntax errors carry no field, only the position.
        assert_eq!(
            parse_err("listeners: [\n"),
            "gw.yaml: did not find expected node content, while parsing a flow node (line 2, \
             column 1)"
        );
    }

    #[test]
    fn from_file_names_the_file() {
        let err = GatewayConfig::from_file("/nonexistent/gw.yaml").unwrap_err();
        assert_eq!(err.source, "/nonexistent/gw.yaml");
        assert_eq!(err.field, "");
        assert!(err.reason.starts_with("cannot read the file: "), "{err}");
    }

    #[test]
    fn semantic_errors_name_file_field_and_reason() {
        let errs = validate_errs(
            r#"
workers: 0
listeners:
  - name: main
    address: 127.0.0.1:8080
    routes:
      - match: { prefix: / }
        cluster: x
      - match: { prefix: /, path: /a }
        cluster: upstream
      - match: {}
        direct_response: { status: 700 }
      - match: { safe_regex: "(" }
        cluster: upstream
        direct_response: { status: 200 }
      - match: { path: /a }
      - match: { path: nope }
        domains: ["a*b", ""]
        cluster: upstream
  - name: main
    address: 127.0.0.1:8080
    limits: { max_headers_count: 0 }
    http_filters:
      - vm_config: { code: { local: { filename: /definitely/not/here.wasm } } }
      - vm_config: { code: { remote: { http_uri: { uri: "https://x/p.wasm" } } } }
      - vm_config: { code: { remote: { http_uri: { uri: "ftp://x/p.wasm" }, sha256: abc } } }
      - vm_config: { code: {} }
      - fail_open: true
        failure_policy: FAIL_CLOSED
        vm_config:
          code: { local: { filename: /definitely/not/here.wasm }, remote: { http_uri: { uri: "https://x" }, sha256: "0000000000000000000000000000000000000000000000000000000000000000" } }
          environment_variables: { host_env_keys: [A], key_values: { A: "1" } }
  - name: ""
    address: 127.0.0.1:15000
    tls: { cert_file: /no/cert.pem, key_file: /no/key.pem }
clusters:
  - name: upstream
    endpoints: [127.0.0.1:1]
  - name: upstream
    endpoints: []
    tls: { ca_file: /no/ca.pem, sni: "" }
  - name: ""
    endpoints: [a:1]
plugins_dir: /no/plugins.d
"#,
        );
        let expected = [
            "gw.yaml: workers: must be at least 1",
            "gw.yaml: clusters[1].name: duplicate cluster name \"upstream\" (also clusters[0])",
            "gw.yaml: clusters[1].endpoints: at least one endpoint is required",
            "gw.yaml: clusters[1].tls.sni: must not be empty",
            "gw.yaml: clusters[1].tls.ca_file: file not found: /no/ca.pem",
            "gw.yaml: clusters[2].name: must not be empty",
            "gw.yaml: listeners[0].routes[0].cluster: unknown cluster \"x\" (known: upstream)",
            "gw.yaml: listeners[0].routes[1].match: exactly one of prefix, path, safe_regex must \
             be set (found prefix, path)",
            "gw.yaml: listeners[0].routes[2].match: exactly one of prefix, path, safe_regex must \
             be set (found none)",
            "gw.yaml: listeners[0].routes[2].direct_response.status: status 700 is outside \
             100..=599",
            "gw.yaml: listeners[0].routes[3].match.safe_regex: invalid regex \"(\": unclosed group",
            "gw.yaml: listeners[0].routes[3]: exactly one of cluster, direct_response must be set \
             (found both)",
            "gw.yaml: listeners[0].routes[4]: exactly one of cluster, direct_response must be set \
             (found neither)",
            "gw.yaml: listeners[0].routes[5].match.path: \"nope\" must start with '/'",
            "gw.yaml: listeners[0].routes[5].domains[0]: invalid domain \"a*b\": one wildcard at \
             most, at the start or the end",
            "gw.yaml: listeners[0].routes[5].domains[1]: a domain must not be empty",
            "gw.yaml: listeners[1].name: duplicate listener name \"main\" (also listeners[0])",
            "gw.yaml: listeners[1].address: duplicate address 127.0.0.1:8080 (also listeners[0])",
            "gw.yaml: listeners[1].limits.max_headers_count: must be at least 1",
            "gw.yaml: listeners[1].http_filters[0].vm_config.code.local.filename: file not found: \
             /definitely/not/here.wasm",
            "gw.yaml: listeners[1].http_filters[1].vm_config.code.remote.sha256: required for \
             remote code",
            "gw.yaml: listeners[1].http_filters[2].vm_config.code.remote.http_uri.uri: unsupported \
             URI \"ftp://x/p.wasm\": expected http:// or https://",
            "gw.yaml: listeners[1].http_filters[2].vm_config.code.remote.sha256: \"abc\" is not 64 \
             hexadecimal characters",
            "gw.yaml: listeners[1].http_filters[3].vm_config.code: exactly one of local, remote \
             must be set (found neither)",
            "gw.yaml: listeners[1].http_filters[4].vm_config.code: exactly one of local, remote \
             must be set (found both)",
            "gw.yaml: listeners[1].http_filters[4].vm_config.code.local.filename: file not found: \
             /definitely/not/here.wasm",
            "gw.yaml: listeners[1].http_filters[4].fail_open: conflicts with failure_policy \
             FAIL_CLOSED",
            "gw.yaml: listeners[1].http_filters[4].vm_config.environment_variables.key_values.A: \
             \"A\" is also listed in host_env_keys",
            "gw.yaml: listeners[2].name: must not be empty",
            "gw.yaml: listeners[2].address: address 127.0.0.1:15000 is also the admin address",
            "gw.yaml: listeners[2].tls.cert_file: file not found: /no/cert.pem",
            "gw.yaml: listeners[2].tls.key_file: file not found: /no/key.pem",
            "gw.yaml: plugins_dir: directory not found: /no/plugins.d",
        ];
        assert_eq!(errs, expected);
    }

    #[test]
    fn unknown_cluster_without_clusters() {
        let errs = validate_errs(
            "listeners:\n  - name: a\n    address: 127.0.0.1:0\n    routes:\n      - match: { prefix: / }\n        cluster: x\n",
        );
        assert_eq!(
            errs,
            [
                "gw.yaml: listeners[0].routes[0].cluster: unknown cluster \"x\" (no clusters are defined)"
            ]
        );
    }

    #[test]
    fn plugin_limits_are_range_checked() {
        let limits = parse("plugin_limits: { max_memory_bytes: 1048576, max_http_calls: 3 }");
        assert_eq!(limits.plugin_limits.max_memory_bytes, 1 << 20);
        assert_eq!(limits.plugin_limits.max_http_calls, 3);
        assert_eq!(
            limits.plugin_limits.max_stack_bytes,
            512 << 10,
            "default kept"
        );
        let errs = validate_errs(
            "plugin_limits: { max_memory_bytes: 100, max_stack_bytes: 1073741824, max_http_calls: 0, max_queue_length: 0 }",
        );
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(errs[0].contains("plugin_limits.max_memory_bytes: 100 is outside"));
        assert!(errs[1].contains("plugin_limits.max_stack_bytes: 1073741824 is outside"));
        assert!(errs[2].contains("plugin_limits.max_http_calls: must be at least 1"));
        assert!(errs[3].contains("plugin_limits.max_queue_length: must be at least 1"));
        assert!(parse_err("plugin_limits: { max_memory: 1 }").contains("max_memory"));
    }

    #[test]
    fn stats_matchers_validate_and_match() {
        let config = parse(
            "stats_matcher: { inclusion_list: { patterns: [ { prefix: a_ }, { safe_regex: { regex: '^b[0-9]+$' } } ] } }",
        );
        let filter = config.stats_matcher.unwrap().compile().unwrap();
        assert!(filter.allows("a_x") && filter.allows("b12"));
        assert!(!filter.allows("b1x") && !filter.allows("c"));
        let config =
            parse("stats_matcher: { exclusion_list: { patterns: [ { suffix: _total } ] } }");
        let filter = config.stats_matcher.unwrap().compile().unwrap();
        assert!(!filter.allows("hits_total") && filter.allows("hits"));
        let errs = validate_errs(
            "stats_matcher:\n  inclusion_list: { patterns: [ { prefix: a, exact: b }, { safe_regex: { regex: '(' } } ] }\n  exclusion_list: { patterns: [] }",
        );
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs[0].contains("stats_matcher: set inclusion_list or exclusion_list, not both"));
        assert!(errs[1].contains("stats_matcher.inclusion_list.patterns[0]: exactly one of"));
        assert!(errs[2].contains("stats_matcher.inclusion_list.patterns[1]: safe_regex.regex:"));
    }

    #[test]
    fn capability_restriction_and_reload_config_on_envoy_filters() {
        let dir = tempfile::tempdir().unwrap();
        let wasm = dir.path().join("p.wasm");
        std::fs::write(&wasm, b"\0asm\x01\0\0\0").unwrap();
        let text = format!(
            "listeners:
  - name: main
    address: 127.0.0.1:0
    http_filters:
      - name: restricted
        failure_policy: FAIL_RELOAD
        reload_config: {{ backoff: {{ base_interval: 250ms }} }}
        capability_restriction_config: {{ allowed_capabilities: {{ proxy_log: {{}}, fd_write: {{}} }} }}
        vm_config: {{ code: {{ local: {{ filename: {} }} }} }}
      - name: bad-reload
        reload_config: {{ backoff: {{ base_interval: 2s, max_interval: 1s }} }}
        vm_config: {{ code: {{ local: {{ filename: {} }} }} }}
",
            wasm.display(),
            wasm.display()
        );
        let config = parse(&text);
        let chain = config.chain_for_listener(0, &[]);
        let restricted = &chain[0];
        assert_eq!(
            restricted.capabilities,
            Some(["fd_write".to_owned(), "proxy_log".to_owned()].into())
        );
        assert_eq!(restricted.reload_backoff.base, Duration::from_millis(250));
        assert_eq!(
            restricted.reload_backoff.max,
            Duration::from_millis(2500),
            "ten times base"
        );
        assert_eq!(chain[1].capabilities, None);
        let errs = validate_errs(&text);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].contains("http_filters[1].reload_config.backoff.max_interval: must not be less than base_interval"));
        assert!(errs[1].contains(
            "http_filters[1].reload_config: only applies with failure_policy FAIL_RELOAD"
        ));
    }

    #[test]
    fn port_zero_listeners_may_share_an_address() {
        let errs = validate_errs(
            "listeners:\n  - name: a\n    address: 127.0.0.1:0\n  - name: b\n    address: 127.0.0.1:0\n",
        );
        assert!(errs.is_empty(), "{errs:?}");
    }

    #[test]
    fn domain_patterns() {
        assert!(domain_matches("*", "anything"));
        assert!(domain_matches("example.com", "Example.COM"));
        assert!(domain_matches("example.com", "example.com:8080"));
        assert!(!domain_matches("example.com", "www.example.com"));
        assert!(domain_matches("*.example.com", "a.b.example.com"));
        assert!(!domain_matches("*.example.com", ".example.com"));
        assert!(!domain_matches("*.example.com", "example.com"));
        assert!(domain_matches("*-bar.example.com", "foo-bar.example.com"));
        assert!(domain_matches("foo.*", "foo.org"));
        assert!(domain_matches("example.com:8080", "example.com:8080"));
        assert!(domain_matches("[::1]", "[::1]:8080"));
    }

    #[test]
    fn path_matchers() {
        let prefix = RouteMatch {
            prefix: Some("/api".into()),
            ..Default::default()
        };
        assert!(prefix.matcher().unwrap().matches("/api/v1"));
        assert!(!prefix.matcher().unwrap().matches("/ap"));
        let exact = RouteMatch {
            path: Some("/health".into()),
            ..Default::default()
        };
        assert!(exact.matcher().unwrap().matches("/health?verbose=1"));
        assert!(!exact.matcher().unwrap().matches("/health/x"));
        let regex = RouteMatch {
            safe_regex: Some("/v[0-9]+/.*".into()),
            ..Default::default()
        };
        let m = regex.matcher().unwrap();
        assert!(m.matches("/v2/items"));
        assert!(!m.matches("/x/v2/items"), "the whole path must match");
        assert!(RouteMatch::default().matcher().is_err());
    }

    #[test]
    fn serializes_to_json_that_parses_back() {
        let (dir, plugin) = temp_with_plugin();
        let path = dir.path().join("gateway.yaml");
        fs::write(&path, sample(&plugin)).unwrap();
        let config = GatewayConfig::from_file(&path).unwrap();
        let json = serde_json::to_string_pretty(&config).unwrap();
        assert!(json.contains("\"connect_timeout\": \"5s\""), "{json}");
        let back = GatewayConfig::from_yaml_str(&json, "dump.json").unwrap();
        assert_eq!(
            GatewayConfig {
                source: config.source.clone(),
                ..back
            },
            config
        );
    }

    #[test]
    fn tcp_proxy_listeners_with_network_filters() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("counter.wasm"), b"\0asm\x01\0\0\0").unwrap();
        let yaml = r#"
listeners:
  - name: tcp
    address: 127.0.0.1:9000
    network_filters:
      - name: counter
        configuration: { metric: bytes }
        vm_config: { code: { local: { filename: counter.wasm } } }
    tcp_proxy:
      cluster: echo
      sni_routes: [ { server_names: [a.example.com, "*.b.example.com"], cluster: echo } ]
clusters:
  - { name: echo, endpoints: ["127.0.0.1:9001"] }
"#;
        let path = dir.path().join("gw.yaml");
        std::fs::write(&path, yaml).unwrap();
        let config = GatewayConfig::load(&path).unwrap();
        let proxy = config.listeners[0].tcp_proxy.as_ref().unwrap();
        assert_eq!(proxy.cluster, "echo");
        assert_eq!(proxy.sni_routes[0].server_names.len(), 2);
        assert!(config.chain_for_listener(0, &[]).is_empty());
        let network = config.chain_for_network_listener(0, &[]);
        assert_eq!(network.len(), 1);
        assert_eq!(network[0].configuration, br#"{"metric":"bytes"}"#.to_vec());
        assert_eq!(
            network[0].origin.to_string(),
            "listener \"tcp\" network_filters[0]"
        );

        let errs = validate_errs(
            r#"
listeners:
  - name: tcp
    address: 127.0.0.1:9000
    routes: [ { match: { prefix: / }, cluster: echo } ]
    tcp_proxy: { cluster: nowhere, sni_routes: [ { server_names: [], cluster: echo } ] }
clusters:
  - { name: echo, endpoints: ["127.0.0.1:9001"] }
"#,
        );
        for expected in [
            "listeners[0].tcp_proxy.cluster: unknown cluster \"nowhere\"",
            "listeners[0].tcp_proxy.sni_routes[0].server_names: list at least one",
            "listeners[0].routes: a tcp_proxy listener carries bytes, not HTTP",
        ] {
            assert!(
                errs.iter().any(|e| e.contains(expected)),
                "{expected} in {errs:#?}"
            );
        }
    }
}
