//! Registry credentials from a `.dockerconfigjson`, read as Istio's agent reads a WasmPlugin's
//! `imagePullSecret`: `auths[<registry>]` with Docker's host matching, Docker Hub under
//! `https://index.docker.io/v1/`, an empty entry meaning anonymous, and `null` content refused.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use base64::Engine as _;

/// The key Docker keeps Docker Hub's credentials under.
const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";
/// The names a reference may give Docker Hub.
const DOCKER_HUB_NAMES: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];

/// Registry credentials read from a `.dockerconfigjson`. Its `Debug` shows registries and user
/// names, never passwords or tokens.
#[derive(Clone, Default)]
pub struct DockerConfig {
    /// `auths` keys as written, in order, with their entries.
    auths: BTreeMap<String, AuthEntry>,
}

/// One `auths` entry, with `auth` already decoded into `username`/`password` as Docker does.
#[derive(Clone, Default, PartialEq, Eq)]
struct AuthEntry {
    username: String,
    password: String,
    identity_token: String,
    registry_token: String,
}

/// How to authenticate to a registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// HTTP Basic, or the token exchange a registry's Bearer challenge asks for.
    Basic { username: String, password: String },
    /// A registry token sent as is (`registrytoken`).
    Bearer(String),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Credentials::Bearer(_) => f.debug_tuple("Bearer").field(&"<redacted>").finish(),
        }
    }
}

impl fmt::Debug for DockerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Entry<'a>(&'a AuthEntry);
        impl fmt::Debug for Entry<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let entry = self.0;
                let secret = |s: &str| if s.is_empty() { "" } else { "<redacted>" };
                f.debug_struct("Auth")
                    .field("username", &entry.username)
                    .field("password", &secret(&entry.password))
                    .field("identitytoken", &secret(&entry.identity_token))
                    .field("registrytoken", &secret(&entry.registry_token))
                    .finish()
            }
        }
        f.debug_struct("DockerConfig")
            .field(
                "auths",
                &self
                    .auths
                    .iter()
                    .map(|(k, v)| (k, Entry(v)))
                    .collect::<BTreeMap<_, _>>(),
            )
            .finish()
    }
}

/// The wire form; unknown fields (`email`, `credsStore`, ...) are ignored, as Docker does.
#[derive(serde::Deserialize)]
struct RawConfig {
    #[serde(default)]
    auths: Option<BTreeMap<String, Option<RawAuth>>>,
}

#[derive(serde::Deserialize, Default)]
struct RawAuth {
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
}

impl DockerConfig {
    /// Parses the content of a `.dockerconfigjson` (`{"auths": {"<registry>": {...}}}`).
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| "the docker config is not UTF-8 text".to_owned())?;
        if text.trim() == "null" {
            // What an imagePullSecret looks like when istiod could not read the Secret.
            return Err(
                "the docker config is `null` (the pull secret is missing or unreadable)".into(),
            );
        }
        if text.trim().is_empty() {
            return Err("the docker config is empty".into());
        }
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| {
            format!("the docker config is not valid JSON of the form {{\"auths\": {{...}}}}: {e}")
        })?;
        let mut auths = BTreeMap::new();
        for (registry, entry) in raw.auths.unwrap_or_default() {
            let entry = entry.unwrap_or_default();
            let mut parsed = AuthEntry {
                username: entry.username.unwrap_or_default(),
                password: entry.password.unwrap_or_default(),
                identity_token: entry.identitytoken.unwrap_or_default(),
                registry_token: entry.registrytoken.unwrap_or_default(),
            };
            // Docker decodes `auth` over username/password when it is set.
            if let Some(auth) = entry.auth.filter(|a| !a.trim().is_empty()) {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|e| {
                        format!("auths[{registry:?}].auth is not base64 of \"user:password\": {e}")
                    })?;
                let decoded = String::from_utf8(decoded).map_err(|_| {
                    format!("auths[{registry:?}].auth does not decode to UTF-8 \"user:password\"")
                })?;
                let (user, password) = decoded.split_once(':').ok_or_else(|| {
                    format!(
                        "auths[{registry:?}].auth does not decode to \"user:password\" (no ':')"
                    )
                })?;
                parsed.username = user.to_owned();
                parsed.password = password.to_owned();
            }
            auths.insert(registry, parsed);
        }
        Ok(Self { auths })
    }

    /// Reads and parses a `.dockerconfigjson` file.
    /// The Docker config of the user running Wasmgate (`$DOCKER_CONFIG/config.json`, else
    /// `~/.docker/config.json`), as go-containerregistry's default keychain reads it; `None` when
    /// there is none (a broken one is logged and ignored).
    pub fn from_user_config() -> Option<Self> {
        let dir = std::env::var_os("DOCKER_CONFIG")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".docker"))
            })?;
        let path = dir.join("config.json");
        if !path.exists() {
            return None;
        }
        Self::from_file(&path)
            .inspect_err(|error| tracing::warn!("ignoring {}: {error}", path.display()))
            .ok()
    }

    pub fn from_file(path: &Path) -> Result<Self, String> {
        let bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read docker config {}: {e}", path.display()))?;
        Self::from_json(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The registries this config has entries for, as written.
    pub fn registries(&self) -> impl Iterator<Item = &str> {
        self.auths.keys().map(String::as_str)
    }

    /// The credentials for `registry` (`host` or `host:port`, as in an image reference); `None`
    /// means anonymous (no entry, or an empty one).
    ///
    /// An exact key wins; otherwise a key matches when, without its `http(s)://` scheme and path,
    /// it is the same host and port (Docker's rule). Docker Hub's names all use
    /// `https://index.docker.io/v1/`.
    pub fn credentials_for(&self, registry: &str) -> Option<Credentials> {
        let registry = registry.trim().trim_end_matches('/');
        let is_hub = DOCKER_HUB_NAMES
            .iter()
            .any(|n| n.eq_ignore_ascii_case(registry));
        let entry = if is_hub {
            self.auths.get(DOCKER_HUB_KEY).or_else(|| {
                self.auths.iter().find_map(|(key, entry)| {
                    let host = hostname(key);
                    DOCKER_HUB_NAMES
                        .iter()
                        .any(|n| n.eq_ignore_ascii_case(host))
                        .then_some(entry)
                })
            })
        } else {
            self.auths.get(registry).or_else(|| {
                self.auths.iter().find_map(|(key, entry)| {
                    hostname(key)
                        .eq_ignore_ascii_case(registry)
                        .then_some(entry)
                })
            })
        }?;
        entry.credentials()
    }
}

impl AuthEntry {
    /// go-containerregistry's order: a registry token is sent as is; an identity token is a
    /// refresh token, which registries (ACR, Harbor) take as the password of the token exchange;
    /// else username and password.
    fn credentials(&self) -> Option<Credentials> {
        if !self.registry_token.is_empty() {
            return Some(Credentials::Bearer(self.registry_token.clone()));
        }
        if !self.identity_token.is_empty() {
            return Some(Credentials::Basic {
                username: if self.username.is_empty() {
                    "<token>".to_owned()
                } else {
                    self.username.clone()
                },
                password: self.identity_token.clone(),
            });
        }
        if self.username.is_empty() && self.password.is_empty() {
            return None;
        }
        Some(Credentials::Basic {
            username: self.username.clone(),
            password: self.password.clone(),
        })
    }
}

/// Docker's `ConvertToHostname`: the key without `http://`/`https://` and without any path.
fn hostname(key: &str) -> &str {
    let key = key.trim();
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    key.split('/').next().unwrap_or(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user: &str, password: &str) -> Option<Credentials> {
        Some(Credentials::Basic {
            username: user.into(),
            password: password.into(),
        })
    }

    #[test]
    fn matches_host_port_bare_host_and_urls() {
        let config = DockerConfig::from_json(
            br#"{"auths": {
                "127.0.0.1:5000": {"username": "a", "password": "pa"},
                "registry.example.com": {"username": "b", "password": "pb"},
                "https://ghcr.io/v2/": {"username": "c", "password": "pc"},
                "http://10.0.0.1:8080": {"username": "d", "password": "pd"}
            }}"#,
        )
        .unwrap();
        assert_eq!(config.credentials_for("127.0.0.1:5000"), basic("a", "pa"));
        assert_eq!(
            config.credentials_for("registry.example.com"),
            basic("b", "pb")
        );
        assert_eq!(
            config.credentials_for("REGISTRY.example.com"),
            basic("b", "pb")
        );
        assert_eq!(config.credentials_for("ghcr.io"), basic("c", "pc"));
        assert_eq!(config.credentials_for("10.0.0.1:8080"), basic("d", "pd"));
        // A port is part of the registry's name, as in Docker.
        assert_eq!(config.credentials_for("127.0.0.1:5001"), None);
        assert_eq!(config.credentials_for("registry.example.com:443"), None);
        assert_eq!(config.credentials_for("quay.io"), None);
    }

    #[test]
    fn exact_key_wins_over_normalised_match() {
        let config = DockerConfig::from_json(
            br#"{"auths": {
                "https://r.io/": {"username": "url", "password": "x"},
                "r.io": {"username": "exact", "password": "y"}
            }}"#,
        )
        .unwrap();
        assert_eq!(config.credentials_for("r.io"), basic("exact", "y"));
    }

    #[test]
    fn docker_hub_names_use_the_index_key() {
        let config = DockerConfig::from_json(
            br#"{"auths": {"https://index.docker.io/v1/": {"username": "hub", "password": "h"}}}"#,
        )
        .unwrap();
        for name in ["docker.io", "index.docker.io", "registry-1.docker.io"] {
            assert_eq!(config.credentials_for(name), basic("hub", "h"), "{name}");
        }
        let config = DockerConfig::from_json(
            br#"{"auths": {"docker.io": {"username": "u", "password": "p"}}}"#,
        )
        .unwrap();
        assert_eq!(config.credentials_for("index.docker.io"), basic("u", "p"));
    }

    #[test]
    fn auth_field_tokens_and_empty_entries() {
        let auth = base64::engine::general_purpose::STANDARD.encode("user:pa:ss");
        let json = format!(
            r#"{{"auths": {{
                "a.io": {{"auth": "{auth}", "username": "ignored", "password": "ignored"}},
                "b.io": {{"registrytoken": "rt", "username": "u", "password": "p"}},
                "c.io": {{"identitytoken": "refresh"}},
                "d.io": {{}},
                "e.io": null,
                "f.io": {{"auth": ""}}
            }}}}"#
        );
        let config = DockerConfig::from_json(json.as_bytes()).unwrap();
        assert_eq!(config.credentials_for("a.io"), basic("user", "pa:ss"));
        assert_eq!(
            config.credentials_for("b.io"),
            Some(Credentials::Bearer("rt".into()))
        );
        assert_eq!(config.credentials_for("c.io"), basic("<token>", "refresh"));
        assert_eq!(config.credentials_for("d.io"), None);
        assert_eq!(config.credentials_for("e.io"), None);
        assert_eq!(config.credentials_for("f.io"), None);
        assert_eq!(config.registries().count(), 6);
    }

    #[test]
    fn refuses_null_and_malformed_content_with_reasons() {
        for (json, reason) in [
            (&b"null"[..], "null"),
            (b" null\n", "null"),
            (b"", "empty"),
            (b"[1]", "not valid JSON"),
            (b"{\"auths\": 3}", "not valid JSON"),
            (b"\xff", "UTF-8"),
            (br#"{"auths": {"r": {"auth": "!!!"}}}"#, "base64"),
            (br#"{"auths": {"r": {"auth": "dXNlcg=="}}}"#, "no ':'"),
        ] {
            let error = DockerConfig::from_json(json).unwrap_err();
            assert!(error.contains(reason), "{json:?}: {error}");
        }
        // No `auths` at all is a config with no credentials (anonymous everywhere).
        let config = DockerConfig::from_json(b"{}").unwrap();
        assert_eq!(config.credentials_for("r.io"), None);
    }

    #[test]
    fn from_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let missing = DockerConfig::from_file(&path).unwrap_err();
        assert!(missing.contains("config.json"), "{missing}");
        std::fs::write(&path, "null").unwrap();
        let null = DockerConfig::from_file(&path).unwrap_err();
        assert!(
            null.contains("config.json") && null.contains("null"),
            "{null}"
        );
        std::fs::write(
            &path,
            r#"{"auths":{"r.io":{"username":"u","password":"p"}}}"#,
        )
        .unwrap();
        assert_eq!(
            DockerConfig::from_file(&path)
                .unwrap()
                .credentials_for("r.io"),
            basic("u", "p")
        );
    }

    #[test]
    fn debug_never_shows_secrets() {
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret-auth");
        let json = format!(
            r#"{{"auths": {{
                "a.io": {{"username": "bob", "password": "s3cret-pw"}},
                "b.io": {{"auth": "{auth}", "identitytoken": "s3cret-id", "registrytoken": "s3cret-rt"}}
            }}}}"#
        );
        let config = DockerConfig::from_json(json.as_bytes()).unwrap();
        let shown = format!(
            "{config:?} {:?} {:?} {:?}",
            config.credentials_for("a.io"),
            config.credentials_for("b.io"),
            Credentials::Bearer("s3cret-bearer".into())
        );
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("bob") && shown.contains("alice") && shown.contains("a.io"),
            "{shown}"
        );
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}
