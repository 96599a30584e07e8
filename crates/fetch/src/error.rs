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
    /// Credentials in `url`, and in `message` (transport errors quote the URL), are redacted here,
    /// so an error can go to a log, `/plugins` or `/config_dump` as it is.
    pub fn new(url: impl Into<String>, kind: FetchErrorKind, message: impl Into<String>) -> Self {
        Self {
            url: redact_credentials(&url.into()).into_owned(),
            kind,
            message: redact_credentials(&message.into()).into_owned(),
        }
    }
}

/// `text` with the userinfo of every `scheme://user:password@host` in it redacted: the password
/// becomes `***` (`https://user:***@host/...`), and a userinfo without a password, which is
/// usually a token (`https://TOKEN@host/...`), becomes `***` whole. Works on any text (a URL, an
/// error message, a log line), since URLs reach all of them.
pub fn redact_credentials(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains("://") || !text.contains('@') {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(found) = rest.find("://") {
        let authority_start = found + 3;
        out.push_str(&rest[..authority_start]);
        rest = &rest[authority_start..];
        // The authority ends where the path, query or fragment starts, or where the URL ends in
        // the surrounding text.
        let end = rest
            .find(|c: char| {
                matches!(c, '/' | '?' | '#' | '"' | '\'' | '<' | '>' | '`' | '\\')
                    || c.is_whitespace()
            })
            .unwrap_or(rest.len());
        let authority = &rest[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.split_once(':') {
                    Some((user, _)) => {
                        out.push_str(user);
                        out.push_str(":***");
                    }
                    None => out.push_str("***"),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_redacted_wherever_a_url_appears() {
        for (text, expected) in [
            (
                "https://user:pa55@host:8443/p.wasm",
                "https://user:***@host:8443/p.wasm",
            ),
            ("http://t0ken@host/p.wasm?x=1", "http://***@host/p.wasm?x=1"),
            (
                "error sending request for url (http://u:p%40ss@h/x): refused",
                "error sending request for url (http://u:***@h/x): refused",
            ),
            (
                r#"url="https://a:b@h" then https://c:d@e"#,
                r#"url="https://a:***@h" then https://c:***@e"#,
            ),
            ("https://host/a@b", "https://host/a@b"),
            ("user@host and no scheme", "user@host and no scheme"),
            ("oci://127.0.0.1:5000/p:v1", "oci://127.0.0.1:5000/p:v1"),
        ] {
            assert_eq!(redact_credentials(text), expected, "{text}");
        }
        let error = FetchError::new(
            "https://user:pa55@host/p.wasm",
            FetchErrorKind::DownloadFailure,
            "https://user:pa55@host/p.wasm answered 404",
        );
        assert!(!error.to_string().contains("pa55"), "{error}");
        assert_eq!(error.url, "https://user:***@host/p.wasm");
    }
}
