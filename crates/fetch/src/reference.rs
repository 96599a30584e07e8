//! Module URLs as a WasmPlugin's `url` allows them, and Istio's pull policy.

use std::path::PathBuf;

use crate::error::{FetchError, FetchErrorKind};

/// Where a module is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleUrl {
    /// `file:///abs/path` or a plain path.
    File(PathBuf),
    /// `http://` or `https://`.
    Http(String),
    /// `oci://registry/repo[:tag][@sha256:...]`, or the same without a scheme.
    Oci(OciReference),
}

impl ModuleUrl {
    /// Parses a URL as Istio reads a WasmPlugin's `url`: a known scheme, else a path (starting with
    /// `/` or `.`) or an OCI reference.
    pub fn parse(url: &str) -> Result<Self, FetchError> {
        let invalid = |reason: String| FetchError::new(url, FetchErrorKind::InvalidUrl, reason);
        let url = url.trim();
        if url.is_empty() {
            return Err(invalid("the URL is empty".into()));
        }
        if let Some(path) = url.strip_prefix("file://") {
            if path.is_empty() {
                return Err(invalid("a file:// URL needs a path".into()));
            }
            return Ok(ModuleUrl::File(PathBuf::from(path)));
        }
        if url.starts_with("http://") || url.starts_with("https://") {
            let parsed =
                reqwest::Url::parse(url).map_err(|e| invalid(format!("not a URL: {e}")))?;
            if parsed.host_str().is_none_or(str::is_empty) {
                return Err(invalid("the URL has no host".into()));
            }
            return Ok(ModuleUrl::Http(url.to_owned()));
        }
        if let Some(rest) = url.strip_prefix("oci://") {
            return OciReference::parse(rest)
                .map(ModuleUrl::Oci)
                .map_err(invalid);
        }
        if let Some((scheme, _)) = url.split_once("://") {
            return Err(invalid(format!(
                "unsupported scheme {scheme:?}: use file://, http://, https:// or oci://"
            )));
        }
        if url.starts_with('/') || url.starts_with("./") || url.starts_with("../") {
            return Ok(ModuleUrl::File(PathBuf::from(url)));
        }
        OciReference::parse(url)
            .map(ModuleUrl::Oci)
            .map_err(invalid)
    }

    pub fn is_remote(&self) -> bool {
        !matches!(self, ModuleUrl::File(_))
    }
}

/// An OCI image reference, fully qualified (a bare `repo:tag` means Docker Hub, as in Docker).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OciReference {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<hex>` when the reference pins a digest.
    pub digest: Option<String>,
}

impl OciReference {
    /// Parses `registry/repo:tag`, `registry/repo@sha256:...` (no scheme).
    pub fn parse(reference: &str) -> Result<Self, String> {
        let parsed: oci_client::Reference = reference
            .parse()
            .map_err(|e| format!("not an OCI image reference ({e})"))?;
        Ok(Self {
            registry: parsed.registry().to_owned(),
            repository: parsed.repository().to_owned(),
            tag: parsed.tag().map(str::to_owned),
            digest: parsed.digest().map(str::to_owned),
        })
    }

    /// The reference without tag or digest, `oci://registry/repo`: the cache's module name, as
    /// Istio keys its cache.
    pub fn name(&self) -> String {
        format!("oci://{}/{}", self.registry, self.repository)
    }

    pub fn to_client_reference(&self) -> oci_client::Reference {
        match (&self.digest, &self.tag) {
            (Some(digest), Some(tag)) => oci_client::Reference::with_tag_and_digest(
                self.registry.clone(),
                self.repository.clone(),
                tag.clone(),
                digest.clone(),
            ),
            (Some(digest), None) => oci_client::Reference::with_digest(
                self.registry.clone(),
                self.repository.clone(),
                digest.clone(),
            ),
            (None, tag) => oci_client::Reference::with_tag(
                self.registry.clone(),
                self.repository.clone(),
                tag.clone().unwrap_or_else(|| "latest".into()),
            ),
        }
    }

    /// The tag in effect: the one written, else `latest` unless a digest pins the image.
    pub fn effective_tag(&self) -> Option<&str> {
        match (&self.tag, &self.digest) {
            (Some(tag), _) => Some(tag),
            (None, None) => Some("latest"),
            (None, Some(_)) => None,
        }
    }
}

impl std::fmt::Display for OciReference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "oci://{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// When a cached module may be used without asking the server, as a WasmPlugin's `imagePullPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// Use the cached module if there is one.
    #[default]
    IfNotPresent,
    /// Ask the server each time the plugin is (re)loaded; reuse the cached bytes when the
    /// digest did not change.
    Always,
}

impl PullPolicy {
    /// Istio's rule: an explicit policy wins; unset, a `:latest` (or missing) OCI tag means Always,
    /// unless a digest or a `sha256` pins the module.
    pub fn effective(explicit: Option<PullPolicy>, url: &ModuleUrl, sha256: Option<&str>) -> Self {
        if let Some(policy) = explicit {
            return policy;
        }
        match url {
            ModuleUrl::Oci(reference)
                if sha256.is_none()
                    && reference.digest.is_none()
                    && reference.effective_tag() == Some("latest") =>
            {
                PullPolicy::Always
            }
            _ => PullPolicy::IfNotPresent,
        }
    }

    /// `IfNotPresent` or `Always` as WasmPlugin writes them; `UNSPECIFIED_POLICY` and empty are unset.
    pub fn from_istio(value: &str) -> Result<Option<Self>, String> {
        match value {
            "" | "UNSPECIFIED_POLICY" => Ok(None),
            "IfNotPresent" => Ok(Some(PullPolicy::IfNotPresent)),
            "Always" => Ok(Some(PullPolicy::Always)),
            other => Err(format!(
                "unknown imagePullPolicy {other:?}: use IfNotPresent or Always"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form_istio_allows() {
        assert_eq!(
            ModuleUrl::parse("file:///a/b.wasm").unwrap(),
            ModuleUrl::File("/a/b.wasm".into())
        );
        assert_eq!(
            ModuleUrl::parse("./b.wasm").unwrap(),
            ModuleUrl::File("./b.wasm".into())
        );
        assert_eq!(
            ModuleUrl::parse("https://x.io/p.wasm").unwrap(),
            ModuleUrl::Http("https://x.io/p.wasm".into())
        );
        let ModuleUrl::Oci(r) = ModuleUrl::parse("oci://127.0.0.1:5000/ns/p:v1").unwrap() else {
            panic!()
        };
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "ns/p", Some("v1"))
        );
        assert_eq!(r.name(), "oci://127.0.0.1:5000/ns/p");
        let digest = format!("sha256:{}", "a".repeat(64));
        let ModuleUrl::Oci(r) = ModuleUrl::parse(&format!("ghcr.io/o/p@{digest}")).unwrap() else {
            panic!()
        };
        assert_eq!(r.digest.as_deref(), Some(digest.as_str()));
        assert_eq!(r.effective_tag(), None);
        let ModuleUrl::Oci(r) = ModuleUrl::parse("ghcr.io/o/p").unwrap() else {
            panic!()
        };
        assert_eq!(r.effective_tag(), Some("latest"));
    }

    #[test]
    fn refuses_bad_urls_with_reasons() {
        for (url, reason) in [
            ("", "empty"),
            ("ftp://x/p.wasm", "unsupported scheme \"ftp\""),
            ("https://", "URL"),
            ("oci://", "OCI"),
            ("file://", "path"),
        ] {
            let error = ModuleUrl::parse(url).unwrap_err();
            assert_eq!(error.kind, FetchErrorKind::InvalidUrl);
            assert!(error.message.contains(reason), "{url}: {error}");
        }
    }

    #[test]
    fn pull_policy_as_istio() {
        let latest = ModuleUrl::parse("oci://r/p:latest").unwrap();
        let untagged = ModuleUrl::parse("oci://r/p").unwrap();
        let v1 = ModuleUrl::parse("oci://r/p:v1").unwrap();
        let http = ModuleUrl::parse("http://r/p.wasm").unwrap();
        assert_eq!(
            PullPolicy::effective(None, &latest, None),
            PullPolicy::Always
        );
        assert_eq!(
            PullPolicy::effective(None, &untagged, None),
            PullPolicy::Always
        );
        assert_eq!(
            PullPolicy::effective(None, &latest, Some("ab")),
            PullPolicy::IfNotPresent
        );
        assert_eq!(
            PullPolicy::effective(None, &v1, None),
            PullPolicy::IfNotPresent
        );
        assert_eq!(
            PullPolicy::effective(None, &http, None),
            PullPolicy::IfNotPresent
        );
        // A digest pins the image, whatever the tag says.
        let digest = format!("sha256:{}", "a".repeat(64));
        for pinned in [
            format!("oci://r/p@{digest}"),
            format!("oci://r/p:latest@{digest}"),
            format!("r/p@{digest}"),
        ] {
            let url = ModuleUrl::parse(&pinned).unwrap();
            assert_eq!(
                PullPolicy::effective(None, &url, None),
                PullPolicy::IfNotPresent,
                "{pinned}"
            );
        }
        assert_eq!(
            PullPolicy::effective(Some(PullPolicy::Always), &v1, None),
            PullPolicy::Always
        );
        assert_eq!(
            PullPolicy::from_istio("Always").unwrap(),
            Some(PullPolicy::Always)
        );
        assert!(PullPolicy::from_istio("Sometimes").is_err());
    }
}
