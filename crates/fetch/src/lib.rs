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
pub use error::{FetchError, FetchErrorKind};
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
    /// Whether `registry` (as written in a reference: `host` or `host:port`) is reached over plain HTTP.
    pub fn is_insecure(&self, registry: &str) -> bool {
        self.insecure_registries
            .iter()
            .any(|r| r == "*" || r == registry || r.split(':').next() == Some(registry))
    }
}

/// ring as the process's rustls provider: reqwest and oci-client are built without one, and the
/// data plane uses ring too. Installing twice is harmless.
pub(crate) fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
