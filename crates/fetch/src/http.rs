//! HTTP(S) downloads as Istio's agent makes them: a timeout per attempt, exponential backoff on
//! transport errors and 5xx (never on 4xx), an overall deadline, a size cap, redirects followed a
//! bounded number of times and never into link-local or metadata addresses.

use std::time::{Duration, Instant};

use crate::error::{FetchError, FetchErrorKind, redact_credentials};
use crate::{FetchOptions, net};

/// Redirects followed before giving up, as Go's and reqwest's default.
const MAX_REDIRECTS: usize = 10;

/// An HTTP(S) client for module downloads (cheap to clone).
#[derive(Clone)]
pub struct HttpFetcher {
    client: reqwest::Client,
    options: FetchOptions,
}

impl HttpFetcher {
    pub fn new(options: &FetchOptions) -> Result<Self, FetchError> {
        crate::install_crypto_provider();
        let mut roots = Vec::new();
        for pem in &options.extra_root_certificates {
            let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| {
                FetchError::new(
                    "",
                    FetchErrorKind::Io,
                    format!("bad extra root certificate: {e}"),
                )
            })?;
            roots.extend(certs);
        }
        let client = reqwest::Client::builder()
            .user_agent(concat!("wasmgate/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(options.attempt_timeout)
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    attempt.error(format!("stopped after {MAX_REDIRECTS} redirects"))
                } else if attempt.url().host_str().is_some_and(net::is_forbidden_host) {
                    attempt.error("redirected to a link-local or cloud metadata address")
                } else {
                    attempt.follow()
                }
            }))
            .dns_resolver(net::guarded_resolver())
            .no_proxy()
            .tls_certs_merge(roots)
            .build()
            .map_err(|e| {
                FetchError::new(
                    "",
                    FetchErrorKind::Io,
                    format!("cannot build the HTTP client: {e}"),
                )
            })?;
        Ok(Self {
            client,
            options: options.clone(),
        })
    }

    /// The client itself: the guarded resolver, the redirect policy, the extra roots. OCI blob
    /// downloads and token realm checks go through it too.
    pub(crate) fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// GETs `url` with retries until `deadline`; returns the raw body (not unwrapped).
    pub async fn get(&self, url: &str, deadline: Instant) -> Result<Vec<u8>, FetchError> {
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| FetchError::new(url, FetchErrorKind::InvalidUrl, e.to_string()))?;
        if parsed.host_str().is_some_and(net::is_forbidden_host) {
            return Err(FetchError::new(
                url,
                FetchErrorKind::DownloadFailure,
                "refusing to fetch from a link-local or cloud metadata address",
            ));
        }
        let mut backoff = self.options.initial_backoff;
        let mut attempt = 1;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(self.failure(url, format!("deadline passed before attempt {attempt}")));
            }
            let outcome = tokio::time::timeout(
                self.options.attempt_timeout.min(remaining),
                self.attempt(url),
            )
            .await
            .unwrap_or_else(|_| {
                Err(Attempt::Retry(format!(
                    "no complete answer within {:?}",
                    self.options.attempt_timeout.min(remaining)
                )))
            });
            let reason = match outcome {
                Ok(body) => return Ok(body),
                Err(Attempt::Final(reason)) => {
                    return Err(
                        self.failure(url, format!("{reason} (attempt {attempt}, not retried)"))
                    );
                }
                Err(Attempt::Retry(reason)) => reason,
            };
            if attempt >= self.options.max_attempts {
                return Err(
                    self.failure(url, format!("{reason} (gave up after {attempt} attempts)"))
                );
            }
            if Instant::now() + backoff >= deadline {
                return Err(self.failure(
                    url,
                    format!("{reason} (attempt {attempt}; the deadline leaves no time to retry)"),
                ));
            }
            tracing::debug!(
                url = %redact_credentials(url),
                attempt,
                ?backoff,
                "module download failed, retrying: {reason}"
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.options.max_backoff);
            attempt += 1;
        }
    }

    fn failure(&self, url: &str, message: String) -> FetchError {
        FetchError::new(url, FetchErrorKind::DownloadFailure, message)
    }

    async fn attempt(&self, url: &str) -> Result<Vec<u8>, Attempt> {
        let mut response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| classify(&e))?;
        let status = response.status();
        if !status.is_success() {
            let reason = format!("the server answered {status}");
            // As Istio: 5xx is worth another try, except the ones that will not change.
            return Err(
                if status.is_server_error() && ![501, 505, 511].contains(&status.as_u16()) {
                    Attempt::Retry(reason)
                } else {
                    Attempt::Final(reason)
                },
            );
        }
        let cap = self.options.max_size;
        if let Some(length) = response.content_length()
            && length > cap as u64
        {
            return Err(Attempt::Final(format!(
                "the body is {length} bytes, over the {cap}-byte limit"
            )));
        }
        let total = response.content_length();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| classify(&e))? {
            if body.len() + chunk.len() > cap {
                return Err(Attempt::Final(format!(
                    "the body exceeds the {cap}-byte limit"
                )));
            }
            body.extend_from_slice(&chunk);
            if let Some(progress) = &self.options.progress {
                (progress.0)(body.len() as u64, total);
            }
        }
        Ok(body)
    }
}

enum Attempt {
    Retry(String),
    Final(String),
}

fn classify(error: &reqwest::Error) -> Attempt {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    if error.is_redirect() || error.is_builder() {
        Attempt::Final(message)
    } else {
        Attempt::Retry(message)
    }
}

/// How long a fetch may take, from now.
pub(crate) fn deadline(options: &FetchOptions) -> Instant {
    Instant::now() + options.deadline.max(Duration::from_millis(1))
}
