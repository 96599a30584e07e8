//! Plugin modules from `file://`, `http(s)://` and `oci://`, as Istio's agent fetches them: bounded
//! retries, size caps, archive unwrapping, checksum verification, pull policies and pull secrets,
//! kept in a content-addressed cache whose index survives restarts.
//!
//! The gateway asks a [`Fetcher`] for a module and gets bytes whose sha256 it knows; everything about
//! networks, registries and disks stays here.

pub mod cache;
pub mod docker_config;
mod error;
mod fetcher;
pub mod http;
pub mod metrics;
mod net;
pub mod oci;
pub mod reference;
pub mod unbox;

use std::time::Duration;

pub use cache::{Cache, CacheEntry};
pub use docker_config::DockerConfig;
pub use error::{FetchError, FetchErrorKind, redact_credentials};
pub use fetcher::{Fetched, Fetcher, ModuleRequest};
pub use metrics::FetchMetrics;
pub use reference::{ModuleUrl, OciReference, PullPolicy};

/// The largest module we accept, as Istio's `ISTIO_WASM_MAX_BINARY_SIZE_BYTES` default.
pub const DEFAULT_MAX_SIZE: usize = 256 << 20;

/// How remote fetches behave. The defaults are Istio's agent defaults.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Timeout of one HTTP attempt (`WASM_HTTP_REQUEST_TIMEOUT`).
    pub attempt_timeout: Duration,
    /// Deadline over all attempts of one fetch (Envoy's `http_uri.timeout` as istiod sets it).
    pub deadline: Duration,
    /// Attempts in all, first included (`WASM_HTTP_REQUEST_MAX_RETRIES`).
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubled after each, up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Cap on downloaded bytes and on every unpacked archive entry.
    pub max_size: usize,
    /// Registries (`host:port` or `host`) reached over plain HTTP; everything else is HTTPS with
    /// verified certificates.
    pub insecure_registries: Vec<String>,
    /// Extra trusted root certificates (PEM), beside the webpki roots: a private registry's CA.
    pub extra_root_certificates: Vec<Vec<u8>>,
    /// Told of download progress: bytes so far and the total when known.
    pub progress: Option<ProgressFn>,
}

/// A download progress callback (bytes so far, total when the server says).
#[derive(Clone)]
pub struct ProgressFn(pub std::sync::Arc<dyn Fn(u64, Option<u64>) + Send + Sync>);

impl std::fmt::Debug for ProgressFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressFn")
    }
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            attempt_timeout: Duration::from_secs(15),
            deadline: Duration::from_secs(30),
            max_attempts: 5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
            max_size: DEFAULT_MAX_SIZE,
            insecure_registries: Vec::new(),
            extra_root_certificates: Vec::new(),
            progress: None,
        }
    }
}

impl FetchOptions {
    /// Whether `registry` (as written in a reference: `host` or `host:port`) is reached over plain
    /// HTTP. An entry `host:port` names that port only; an entry `host` names the host on every
    /// port; `*` names every registry.
    pub fn is_insecure(&self, registry: &str) -> bool {
        let host = registry_host(registry);
        self.insecure_registries.iter().any(|entry| {
            entry == "*"
                || entry.eq_ignore_ascii_case(registry)
                || (registry_host(entry) == entry && entry.eq_ignore_ascii_case(host))
        })
    }
}

/// The host of `host[:port]` (an IPv6 address keeps its brackets).
fn registry_host(registry: &str) -> &str {
    if registry.starts_with('[') {
        return registry.find(']').map_or(registry, |end| &registry[..=end]);
    }
    match registry.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => registry,
    }
}

/// ring as the process's rustls provider: reqwest and oci-client are built without one, and the
/// data plane uses ring too. Installing twice is harmless.
pub(crate) fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insecure(entries: &[&str]) -> FetchOptions {
        FetchOptions {
            insecure_registries: entries.iter().map(|e| (*e).to_owned()).collect(),
            ..FetchOptions::default()
        }
    }

    #[test]
    fn an_insecure_entry_with_a_port_names_that_port_only() {
        let options = insecure(&["registry.local:5000", "plain.local", "[::1]:5000"]);
        assert!(options.is_insecure("registry.local:5000"));
        assert!(options.is_insecure("REGISTRY.local:5000"));
        // The same host on its HTTPS port, or another one, stays HTTPS.
        assert!(!options.is_insecure("registry.local"));
        assert!(!options.is_insecure("registry.local:443"));
        // A bare host is insecure on every port.
        assert!(options.is_insecure("plain.local"));
        assert!(options.is_insecure("plain.local:8080"));
        assert!(options.is_insecure("[::1]:5000"));
        assert!(!options.is_insecure("[::1]:5001"));
        assert!(!options.is_insecure("[::1]"));
        assert!(!options.is_insecure("other.local:5000"));
        assert!(insecure(&["*"]).is_insecure("anything:1"));
        assert!(!insecure(&[]).is_insecure("registry.local:5000"));
    }

    #[test]
    fn the_default_size_cap_is_istios_256_mib() {
        assert_eq!(DEFAULT_MAX_SIZE, 256 * 1024 * 1024);
        assert_eq!(FetchOptions::default().max_size, 256 * 1024 * 1024);
    }
}
