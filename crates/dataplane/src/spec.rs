//! What the data plane serves: a ready snapshot built by the control side (parsed, validated,
//! modules compiled). The data plane never reads files or manifests itself.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use regex::Regex;
use wasmgate_runtime::{CompiledModule, PluginConfig, VmConfig};

#[derive(Clone)]
pub struct GatewaySpec {
    /// Worker threads; each runs its own VM per plugin.
    pub workers: usize,
    pub listeners: Vec<ListenerSpec>,
    pub clusters: Vec<ClusterSpec>,
}

#[derive(Clone)]
pub struct ListenerSpec {
    pub name: String,
    pub address: SocketAddr,
    pub routes: Vec<RouteSpec>,
    /// The filter chain: request callbacks run in this order, response callbacks in reverse.
    pub filters: Vec<FilterSpec>,
    /// FAIL_CLOSE plugins of this listener whose module could not be had (fetch or verification
    /// failed and no earlier version was serving). While any is listed, the listener answers 403
    /// to every request, as Istio puts a deny-all RBAC filter in the plugin's place.
    pub missing_plugins: Vec<String>,
    pub limits: Limits,
    /// TLS termination; `None` serves plain HTTP (HTTP/1.1, and HTTP/2 with prior knowledge).
    pub tls: Option<TlsFiles>,
    /// Network (TCP) plugins, in chain order: downstream data visits them in this order, upstream
    /// data in reverse. On a `tcp_proxy` listener they run on the proxied bytes.
    pub network_filters: Vec<FilterSpec>,
    /// Makes the listener a TCP proxy (no HTTP): `routes`, `filters` and `tls` are not used.
    pub tcp_proxy: Option<TcpProxySpec>,
}

/// Envoy's `tcp_proxy`: every connection goes to one cluster, or by SNI with TLS passthrough.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpProxySpec {
    /// The cluster connections go to.
    pub cluster: String,
    /// TLS passthrough: a connection whose ClientHello SNI matches one of these server names
    /// (exact, or `*.suffix`) goes to that cluster instead; the TLS bytes pass untouched.
    pub sni_routes: Vec<SniRoute>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniRoute {
    pub server_names: Vec<String>,
    pub cluster: String,
}

impl TcpProxySpec {
    /// The cluster for a connection that sent `sni` (first matching route), else the default.
    pub(crate) fn cluster_for(&self, sni: Option<&str>) -> &str {
        let Some(sni) = sni else {
            return &self.cluster;
        };
        self.sni_routes
            .iter()
            .find(|route| route.server_names.iter().any(|name| sni_matches(name, sni)))
            .map_or(&self.cluster, |route| &route.cluster)
    }
}

/// Envoy's `server_names`: exact (case-insensitive), or `*.suffix` for any name under it.
fn sni_matches(pattern: &str, sni: &str) -> bool {
    let (pattern, sni) = (pattern.to_ascii_lowercase(), sni.to_ascii_lowercase());
    match pattern.strip_prefix('*') {
        Some(suffix) if suffix.starts_with('.') => {
            sni.len() > suffix.len() && sni.ends_with(suffix)
        }
        _ => pattern == sni,
    }
}

/// A listener's certificate and key, PEM. Over TLS, ALPN offers `h2` and `http/1.1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// The private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub key_file: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_request_headers_bytes: usize,
    pub max_headers_count: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// Most bytes a paused plugin may buffer per stream and direction (413 / 500 beyond).
    pub per_stream_buffer_limit: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_headers_bytes: 60 * 1024,
            max_headers_count: 100,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            per_stream_buffer_limit: 1 << 20,
        }
    }
}

/// What a plugin does when its VM has failed (trapped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// Answer 503 to the traffic the plugin would have seen (Envoy's default).
    #[default]
    FailClosed,
    /// Skip the plugin.
    FailOpen,
    /// Build a fresh VM for later requests.
    FailReload,
}

#[derive(Clone)]
pub struct FilterSpec {
    pub name: String,
    pub module: Arc<CompiledModule>,
    pub vm: VmConfig,
    pub plugin: PluginConfig,
    pub failure_policy: FailurePolicy,
    /// FAIL_RELOAD: the wait before the first rebuild of a failed VM, doubled after each
    /// rebuild that fails again, up to `reload_backoff_max`.
    pub reload_backoff: Duration,
    pub reload_backoff_max: Duration,
}

#[derive(Clone)]
pub struct RouteSpec {
    pub name: String,
    /// Host names matched against `:authority` (port ignored); `*.example.com` and `*` allowed.
    /// Empty matches any host.
    pub domains: Vec<String>,
    pub path: PathMatch,
    pub action: RouteAction,
    pub timeout: Option<Duration>,
}

#[derive(Clone)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
    /// Expected anchored (`^(?:...)$`) by whoever builds it, for Envoy's full-match semantics.
    Regex(Regex),
}

#[derive(Clone)]
pub enum RouteAction {
    Cluster(String),
    DirectResponse { status: u16, body: String },
}

#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub name: String,
    /// `host:port`, IP or DNS name.
    pub endpoints: Vec<String>,
    pub connect_timeout: Duration,
    /// `None`: no timeout.
    pub request_timeout: Option<Duration>,
    /// HTTP/2 to the upstream: prior knowledge over plain TCP, ALPN `h2` over TLS.
    pub http2: bool,
    /// TLS to the upstream; `None` speaks plain HTTP.
    pub tls: Option<UpstreamTls>,
}

/// A cluster's upstream TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamTls {
    /// The name sent as SNI and checked against the upstream's certificate; by default the
    /// endpoint's host (an IP endpoint sends no SNI and is checked against the IP SANs).
    pub sni: Option<String>,
    /// PEM CA certificates to trust; by default the Mozilla roots (webpki-roots).
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate. For tests and development only: it gives no protection against
    /// an attacker in the middle.
    pub insecure_skip_verify: bool,
}

impl FilterSpec {
    /// Whether a VM started from `self` behaves as one started from `other`: same module and
    /// configuration. A chain update keeps the VMs of such plugins instead of restarting them.
    pub fn same_plugin(&self, other: &FilterSpec) -> bool {
        self.name == other.name
            && self.module.sha256() == other.module.sha256()
            && self.vm == other.vm
            && self.plugin == other.plugin
            && self.failure_policy == other.failure_policy
            && self.reload_backoff == other.reload_backoff
            && self.reload_backoff_max == other.reload_backoff_max
    }
}

impl RouteSpec {
    pub(crate) fn matches(&self, host: &str, path: &str) -> bool {
        // As Envoy: a prefix looks at the whole `:path`, exact and regex matches at the path
        // without its query string.
        let without_query = path.split('?').next().unwrap_or("");
        let path_ok = match &self.path {
            PathMatch::Prefix(prefix) => path.starts_with(prefix.as_str()),
            PathMatch::Exact(exact) => without_query == exact,
            PathMatch::Regex(regex) => regex.is_match(without_query),
        };
        path_ok && (self.domains.is_empty() || self.domains.iter().any(|d| domain_matches(d, host)))
    }
}

fn domain_matches(pattern: &str, host: &str) -> bool {
    let host = host
        .rsplit_once(':')
        .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
        .map_or(host, |(h, _)| h);
    if pattern == "*" {
        return true;
    }
    let host = host.to_ascii_lowercase();
    let pattern = pattern.to_ascii_lowercase();
    if let Some(suffix) = pattern.strip_prefix('*') {
        host.len() > suffix.len() && host.ends_with(suffix)
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        host.len() > prefix.len() && host.starts_with(prefix)
    } else {
        pattern == host
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(path: PathMatch, domains: &[&str]) -> RouteSpec {
        RouteSpec {
            name: "r".into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            path,
            action: RouteAction::Cluster("c".into()),
            timeout: None,
        }
    }

    #[test]
    fn sni_routing() {
        let spec = TcpProxySpec {
            cluster: "default".into(),
            sni_routes: vec![
                SniRoute {
                    server_names: vec!["a.example.com".into()],
                    cluster: "a".into(),
                },
                SniRoute {
                    server_names: vec!["*.example.com".into()],
                    cluster: "wild".into(),
                },
            ],
        };
        assert_eq!(spec.cluster_for(None), "default");
        assert_eq!(spec.cluster_for(Some("A.Example.com")), "a");
        assert_eq!(spec.cluster_for(Some("b.example.com")), "wild");
        assert_eq!(spec.cluster_for(Some("example.com")), "default");
        assert_eq!(spec.cluster_for(Some("other.org")), "default");
    }

    #[test]
    fn route_matching() {
        assert!(route(PathMatch::Prefix("/api".into()), &[]).matches("x", "/api/v1?q"));
        assert!(!route(PathMatch::Prefix("/api".into()), &[]).matches("x", "/ap"));
        assert!(route(PathMatch::Exact("/a".into()), &[]).matches("x", "/a?b=1"));
        assert!(!route(PathMatch::Exact("/a".into()), &[]).matches("x", "/a/"));
        assert!(
            route(PathMatch::Regex(Regex::new("^/v[0-9]+/").unwrap()), &[]).matches("x", "/v2/x")
        );
        let hosts = route(PathMatch::Prefix("/".into()), &["example.com", "*.test.io"]);
        assert!(hosts.matches("example.com:8080", "/"));
        assert!(hosts.matches("a.test.io", "/"));
        assert!(!hosts.matches("test.io", "/"));
        assert!(!hosts.matches("other.com", "/"));
        assert!(route(PathMatch::Prefix("/".into()), &["api.*"]).matches("api.internal:80", "/"));
    }
}
