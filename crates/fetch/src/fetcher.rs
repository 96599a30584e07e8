//! The one entry point: a module for a URL, from the cache when the pull policy allows, else from
//! its server, verified, stored, and counted in the metrics. Concurrent requests for one module
//! share one download.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use tokio::sync::OnceCell;

use crate::FetchOptions;
use crate::cache::{Cache, sha256_hex};
use crate::docker_config::DockerConfig;
use crate::error::{FetchError, FetchErrorKind, redact_credentials};
use crate::http::HttpFetcher;
use crate::metrics::FetchMetrics;
use crate::oci::Registry;
use crate::reference::{ModuleUrl, OciReference, PullPolicy};
use crate::unbox::{describe_non_wasm, is_wasm, unbox};

/// What to fetch.
#[derive(Debug, Clone, Copy, Default)]
pub struct ModuleRequest<'a> {
    /// As a WasmPlugin's `url` (see [`ModuleUrl::parse`]).
    pub url: &'a str,
    /// Expected sha256 in hex: of the module for files and HTTP, of the manifest for OCI (as Istio).
    pub sha256: Option<&'a str>,
    /// Unset: Istio's default for the URL (see [`PullPolicy::effective`]).
    pub pull_policy: Option<PullPolicy>,
    /// Registry credentials (a WasmPlugin's `imagePullSecret`); unset, the Docker config of the
    /// user running Wasmgate is consulted, as Istio's default keychain does.
    pub credentials: Option<&'a DockerConfig>,
}

/// A module in hand.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub bytes: Arc<[u8]>,
    /// sha256 of `bytes` (hex).
    pub sha256: String,
    /// Where the bytes are on disk: the cache file, or the local file itself.
    pub path: PathBuf,
    /// Served from the cache without downloading the module.
    pub cache_hit: bool,
    /// For OCI, the manifest digest (`sha256:...`).
    pub digest: Option<String>,
}

type Shared = Arc<OnceCell<Result<Fetched, FetchError>>>;

pub struct Fetcher {
    options: FetchOptions,
    cache: Arc<Cache>,
    http: HttpFetcher,
    metrics: Arc<FetchMetrics>,
    in_flight: Mutex<HashMap<String, Shared>>,
}

impl Fetcher {
    pub fn new(options: FetchOptions, cache: Arc<Cache>) -> Result<Self, FetchError> {
        let http = HttpFetcher::new(&options)?;
        let metrics = Arc::new(FetchMetrics::default());
        metrics.set_cache_entries(cache.len());
        Ok(Self {
            options,
            cache,
            http,
            metrics,
            in_flight: Mutex::new(HashMap::new()),
        })
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    pub fn metrics(&self) -> &Arc<FetchMetrics> {
        &self.metrics
    }

    pub fn options(&self) -> &FetchOptions {
        &self.options
    }

    /// The module `request` names. Concurrent calls for the same URL, checksum and policy wait for
    /// one fetch and share its result.
    pub async fn fetch(&self, request: ModuleRequest<'_>) -> Result<Fetched, FetchError> {
        let key = format!(
            "{}\n{}\n{:?}",
            request.url,
            request.sha256.unwrap_or(""),
            request.pull_policy
        );
        let shared = self
            .in_flight
            .lock()
            .entry(key.clone())
            .or_default()
            .clone();
        let result = shared.get_or_init(|| self.fetch_now(request)).await.clone();
        // Whoever finishes first forgets the fetch, so a later call asks again per its policy.
        let mut in_flight = self.in_flight.lock();
        if in_flight.get(&key).is_some_and(|s| Arc::ptr_eq(s, &shared)) {
            in_flight.remove(&key);
        }
        result
    }

    async fn fetch_now(&self, request: ModuleRequest<'_>) -> Result<Fetched, FetchError> {
        let url = ModuleUrl::parse(request.url)?;
        let expected = match request.sha256.map(str::trim).filter(|s| !s.is_empty()) {
            Some(sha) => Some(normalise_sha256(request.url, sha)?),
            None => None,
        };
        let policy = PullPolicy::effective(request.pull_policy, &url, expected.as_deref());
        let result = match &url {
            ModuleUrl::File(path) => return self.local(request.url, path, expected.as_deref()),
            ModuleUrl::Http(http) => self.http(http, expected.as_deref(), policy).await,
            ModuleUrl::Oci(reference) => {
                let credentials = request
                    .credentials
                    .cloned()
                    .or_else(DockerConfig::from_user_config);
                let deadline = self.options.deadline;
                tokio::time::timeout(
                    deadline,
                    self.oci(reference, expected.as_deref(), policy, credentials.as_ref()),
                )
                .await
                .unwrap_or_else(|_| {
                    Err(FetchError::new(
                        reference.to_string(),
                        FetchErrorKind::DownloadFailure,
                        format!("no module within the {deadline:?} deadline"),
                    ))
                })
            }
        };
        self.metrics.set_cache_entries(self.cache.len());
        result
    }

    fn local(
        &self,
        url: &str,
        path: &std::path::Path,
        expected: Option<&str>,
    ) -> Result<Fetched, FetchError> {
        let bytes = std::fs::read(path).map_err(|e| {
            FetchError::new(
                url,
                FetchErrorKind::Io,
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        let sha256 = sha256_hex(&bytes);
        if let Some(expected) = expected
            && expected != sha256
        {
            return Err(FetchError::new(
                url,
                FetchErrorKind::ChecksumMismatched,
                format!("sha256 is {sha256}, the configuration expects {expected}"),
            ));
        }
        Ok(Fetched {
            bytes: bytes.into(),
            sha256,
            path: path.to_owned(),
            cache_hit: false,
            digest: None,
        })
    }

    /// The cached module with this sha256, counted as a lookup.
    fn cached(&self, sha256: Option<&str>, digest: Option<String>) -> Option<Fetched> {
        let hit = sha256.and_then(|sha| {
            let bytes = self.cache.get(sha)?;
            Some(Fetched {
                bytes: bytes.into(),
                sha256: sha.to_owned(),
                path: self.cache.modules_dir().join(format!("{sha}.wasm")),
                cache_hit: true,
                digest,
            })
        });
        self.metrics.cache_lookup(hit.is_some());
        hit
    }

    async fn http(
        &self,
        url: &str,
        expected: Option<&str>,
        policy: PullPolicy,
    ) -> Result<Fetched, FetchError> {
        let known = match (expected, policy) {
            (Some(sha), _) => Some(sha.to_owned()),
            (None, PullPolicy::IfNotPresent) => {
                self.cache.url(&redact_credentials(url)).map(|u| u.sha256)
            }
            (None, PullPolicy::Always) => None,
        };
        if let Some(hit) = self.cached(known.as_deref(), None) {
            return Ok(hit);
        }
        let outcome = self.download_http(url, expected).await;
        self.metrics
            .remote_fetch(outcome.as_ref().err().map(|e| e.kind));
        outcome
    }

    async fn download_http(
        &self,
        url: &str,
        expected: Option<&str>,
    ) -> Result<Fetched, FetchError> {
        let started = Instant::now();
        let body = self
            .http
            .get(url, crate::http::deadline(&self.options))
            .await?;
        let module = unbox(body, self.options.max_size)
            .map_err(|reason| FetchError::new(url, FetchErrorKind::FetchFailure, reason))?;
        let sha256 = sha256_hex(&module);
        if let Some(expected) = expected
            && expected != sha256
        {
            return Err(FetchError::new(
                url,
                FetchErrorKind::ChecksumMismatched,
                format!("the module's sha256 is {sha256}, the configuration expects {expected}"),
            ));
        }
        // The index is a file `plugin cache ls` prints: it keys the URL without its credentials.
        let url = redact_credentials(url);
        let (sha256, path) = self.cache.insert(&module, &[&url], None)?;
        tracing::info!(url = %url, sha256, bytes = module.len(), took = ?started.elapsed(), "fetched a module");
        Ok(Fetched {
            bytes: module.into(),
            sha256,
            path,
            cache_hit: false,
            digest: None,
        })
    }

    async fn oci(
        &self,
        reference: &OciReference,
        expected: Option<&str>,
        policy: PullPolicy,
        credentials: Option<&DockerConfig>,
    ) -> Result<Fetched, FetchError> {
        let name = reference.name();
        let url = reference.to_string();
        // Istio's lookup order: the configured sha256 (a manifest digest), the digest in the
        // reference, then what the tag pointed to last time when the policy allows.
        let pinned = expected
            .map(|sha| format!("sha256:{sha}"))
            .or_else(|| reference.digest.clone());
        let known = match (&pinned, policy) {
            (Some(digest), _) => self.cache.url(&format!("{name}@{digest}")),
            (None, PullPolicy::IfNotPresent) => self.cache.url(&url),
            (None, PullPolicy::Always) => None,
        };
        let (known_sha, known_digest) = match known {
            Some(k) => (Some(k.sha256), k.digest),
            None => (None, None),
        };
        if let Some(hit) = self.cached(known_sha.as_deref(), known_digest) {
            return Ok(hit);
        }
        let outcome = self
            .download_oci(reference, &url, &name, pinned.as_deref(), credentials)
            .await;
        self.metrics
            .remote_fetch(outcome.as_ref().err().map(|e| e.kind));
        outcome
    }

    async fn download_oci(
        &self,
        reference: &OciReference,
        url: &str,
        name: &str,
        pinned: Option<&str>,
        credentials: Option<&DockerConfig>,
    ) -> Result<Fetched, FetchError> {
        let started = Instant::now();
        let credentials = credentials.and_then(|c| c.credentials_for(&reference.registry));
        let registry = Registry::new(reference, &self.options, credentials)?;
        let manifest = registry.resolve(reference).await?;
        if let Some(pinned) = pinned
            && !pinned.eq_ignore_ascii_case(&manifest.digest)
        {
            return Err(FetchError::new(
                url,
                FetchErrorKind::ChecksumMismatched,
                format!(
                    "the image's manifest digest is {}, the configuration expects {pinned}",
                    manifest.digest
                ),
            ));
        }
        let by_digest = format!("{name}@{}", manifest.digest);
        // The tag moved to a digest we already hold (or never moved): no layer download.
        if let Some(known) = self.cache.url(&by_digest)
            && let Some(bytes) = self.cache.get(&known.sha256)
        {
            let (sha256, path) =
                self.cache
                    .insert(&bytes, &[url, &by_digest], Some(&manifest.digest))?;
            return Ok(Fetched {
                bytes: bytes.into(),
                sha256,
                path,
                cache_hit: true,
                digest: Some(manifest.digest),
            });
        }
        let module = registry
            .module(reference, &manifest, self.options.max_size)
            .await?;
        if !is_wasm(&module) {
            return Err(FetchError::new(
                url,
                FetchErrorKind::FetchFailure,
                describe_non_wasm(&module),
            ));
        }
        let (sha256, path) =
            self.cache
                .insert(&module, &[url, &by_digest], Some(&manifest.digest))?;
        tracing::info!(url, digest = %manifest.digest, sha256, bytes = module.len(), took = ?started.elapsed(), "pulled a module");
        Ok(Fetched {
            bytes: module.into(),
            sha256,
            path,
            cache_hit: false,
            digest: Some(manifest.digest),
        })
    }
}

/// `sha256` as lowercase hex (a `sha256:` prefix is accepted), or a clear error.
fn normalise_sha256(url: &str, sha256: &str) -> Result<String, FetchError> {
    let hex = sha256
        .strip_prefix("sha256:")
        .unwrap_or(sha256)
        .to_ascii_lowercase();
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(hex)
    } else {
        Err(FetchError::new(
            url,
            FetchErrorKind::InvalidUrl,
            format!("sha256 {sha256:?} is not 64 hexadecimal digits"),
        ))
    }
}
