//! Fetch errors, classified by the `result` label Istio's agent gives them in
//! `wasm_remote_fetch_count`, so an operator reads the same numbers in both.

/// Why a module could not be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FetchErrorKind {
    /// The URL is malformed or uses a scheme we do not fetch.
    InvalidUrl,
    /// Transport error, HTTP error status, redirect loop, deadline, size cap, refused address,
    /// or an OCI layer that could not be downloaded.
    DownloadFailure,
    /// The OCI manifest could not be fetched or understood (including authentication failures).
    ManifestFailure,
    /// The bytes do not match the `sha256` the configuration asked for.
    ChecksumMismatched,
    /// Something arrived, but it is not a Wasm module (nor an archive holding one).
    FetchFailure,
    /// The local cache or a local file could not be read or written.
    Io,
}

impl FetchErrorKind {
    /// The `result` label of `wasm_remote_fetch_count` (Istio's agent names); `None` for errors
    /// that happen before or after any remote fetch.
    pub fn result_label(self) -> Option<&'static str> {
        match self {
            FetchErrorKind::DownloadFailure => Some("download_failure"),
            FetchErrorKind::ManifestFailure => Some("manifest_failure"),
            FetchErrorKind::ChecksumMismatched => Some("checksum_mismatched"),
            FetchErrorKind::FetchFailure => Some("fetch_failure"),
            FetchErrorKind::InvalidUrl | FetchErrorKind::Io => None,
        }
    }
}

/// A module that could not be fetched: the URL (without credentials), the kind, and a reason a
/// person can act on.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{url}: {message}")]
pub struct FetchError {
    pub url: String,
    pub kind: FetchErrorKind,
    pub message: String,
}

impl FetchError {
    pub fn new(url: impl Into<String>, kind: FetchErrorKind, message: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            kind,
            message: message.into(),
        }
    }
}
