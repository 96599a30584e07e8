//! External authorization over `http_call`, in the manner of Envoy's HTTP `ext_authz` filter:
//! each request waits while an authorization service, reached through a gateway cluster, answers
//! a check call; a 2xx lets it through (with chosen headers of the answer added), anything else
//! is sent back to the client.
//!
//! Plugin configuration (JSON): `{"cluster": "authz", "path": "/check", "timeout_ms": 1000,
//! "headers_to_forward": ["authorization"], "allowed_upstream_headers": ["x-user"],
//! "failure_mode_allow": false}`; only `cluster` is required. See README.md.

use std::rc::Rc;
use std::time::Duration;

use log::{error, info, warn};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, Bytes, ContextType, LogLevel, Status};
use serde::Deserialize;

/// The check call's own headers telling the service what the client asked for; the client can
/// never supply them itself.
const FORWARDED_METHOD: &str = "x-forwarded-method";
const FORWARDED_URI: &str = "x-forwarded-uri";

/// Headers that describe a message's framing or its connection: the gateway writes them, so
/// copying them from the authorization service's answer would corrupt the message.
const GATEWAY_OWNED: [&str; 7] = [
    "connection",
    "content-length",
    "host",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
];

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_context_id| -> Box<dyn RootContext> {
        Box::new(ExtAuthzRoot { config: None })
    });
}}

/// The configuration as written; [`Config::parse`] checks it and fills in the defaults.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    cluster: Option<String>,
    path: Option<String>,
    timeout_ms: Option<u64>,
    authority: Option<String>,
    headers_to_forward: Option<Vec<String>>,
    allowed_upstream_headers: Option<Vec<String>>,
    allowed_client_headers: Option<Vec<String>>,
    failure_mode_allow: Option<bool>,
    status_on_error: Option<u16>,
}

#[derive(Debug)]
struct Config {
    cluster: String,
    path: String,
    timeout: Duration,
    authority: String,
    /// Lower-case names.
    headers_to_forward: Vec<String>,
    /// Lower-case names.
    allowed_upstream_headers: Vec<String>,
    /// Lower-case names.
    allowed_client_headers: Vec<String>,
    failure_mode_allow: bool,
    status_on_error: u16,
}

impl Config {
    fn parse(raw: &[u8]) -> Result<Self, String> {
        if raw.iter().all(u8::is_ascii_whitespace) {
            return Err("the configuration is empty; cluster is required".into());
        }
        // Unknown fields are refused: a misspelt `failure_mode_allow` or
        // `allowed_upstream_headers` silently ignored would change who gets in.
        let raw: RawConfig = serde_json::from_slice(raw).map_err(|err| err.to_string())?;

        let cluster = match raw.cluster {
            None => {
                return Err(
                    "cluster is missing; name the gateway cluster of the authorization service"
                        .into(),
                );
            }
            Some(cluster) if cluster.trim().is_empty() => {
                return Err("cluster must not be empty".into());
            }
            Some(cluster) => cluster,
        };
        let path = raw.path.unwrap_or_else(|| "/check".into());
        if !path.starts_with('/') || path.chars().any(|c| c.is_control() || c == ' ') {
            return Err(format!(
                "path {path:?} must start with / and hold no spaces or control characters"
            ));
        }
        let timeout_ms = raw.timeout_ms.unwrap_or(1000);
        if timeout_ms == 0 || timeout_ms > u64::from(u32::MAX) {
            return Err(format!(
                "timeout_ms must be between 1 and {}, not {timeout_ms}",
                u32::MAX
            ));
        }
        let authority = raw.authority.unwrap_or_else(|| cluster.clone());
        if authority.is_empty() || authority.chars().any(|c| c.is_control() || c == ' ') {
            return Err(format!(
                "authority {authority:?} must be non-empty, without spaces or control characters"
            ));
        }
        let headers_to_forward = header_names(
            "headers_to_forward",
            raw.headers_to_forward
                .unwrap_or_else(|| vec!["authorization".into()]),
            &[FORWARDED_METHOD, FORWARDED_URI]
                .into_iter()
                .chain(GATEWAY_OWNED)
                .collect::<Vec<_>>(),
        )?;
        let allowed_upstream_headers = header_names(
            "allowed_upstream_headers",
            raw.allowed_upstream_headers.unwrap_or_default(),
            &GATEWAY_OWNED,
        )?;
        let allowed_client_headers = header_names(
            "allowed_client_headers",
            raw.allowed_client_headers
                .unwrap_or_else(|| vec!["content-type".into(), "www-authenticate".into()]),
            &GATEWAY_OWNED,
        )?;
        let status_on_error = raw.status_on_error.unwrap_or(403);
        if !(400..=599).contains(&status_on_error) {
            return Err(format!(
                "status_on_error must be a 4xx or 5xx status, not {status_on_error}"
            ));
        }
        Ok(Config {
            cluster,
            path,
            timeout: Duration::from_millis(timeout_ms),
            authority,
            headers_to_forward,
            allowed_upstream_headers,
            allowed_client_headers,
            failure_mode_allow: raw.failure_mode_allow.unwrap_or(false),
            status_on_error,
        })
    }
}

/// Checks a list of header names and lower-cases it, dropping repeats.
fn header_names(field: &str, names: Vec<String>, refused: &[&str]) -> Result<Vec<String>, String> {
    let mut checked: Vec<String> = Vec::with_capacity(names.len());
    for (index, name) in names.into_iter().enumerate() {
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(format!(
                "{field}[{index}] {name:?} is not a header name (pseudo-headers such as :path \
                 cannot be listed)"
            ));
        }
        let name = name.to_ascii_lowercase();
        if refused.contains(&name.as_str()) {
            return Err(format!(
                "{field}[{index}] {name:?} cannot be listed: the gateway or this plugin sets it"
            ));
        }
        if !checked.contains(&name) {
            checked.push(name);
        }
    }
    Ok(checked)
}

/// RFC 9110 `tchar`.
fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

struct ExtAuthzRoot {
    /// `None` until a configuration has been accepted; the host never creates HTTP contexts
    /// before that.
    config: Option<Rc<Config>>,
}

impl Context for ExtAuthzRoot {}

impl RootContext for ExtAuthzRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        let config = match Config::parse(&raw) {
            Ok(config) => config,
            Err(err) => {
                error!("ext-authz: invalid configuration: {err}");
                return false;
            }
        };
        info!(
            "ext-authz: checking requests with {} {}{} (timeout {} ms, failure mode {})",
            config.cluster,
            config.authority,
            config.path,
            config.timeout.as_millis(),
            if config.failure_mode_allow {
                "allow"
            } else {
                "deny"
            }
        );
        self.config = Some(Rc::new(config));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let config = self.config.clone()?;
        Some(Box::new(ExtAuthz {
            config,
            pending_check: None,
        }))
    }

    // Without this the SDK does not know which kind of stream context to create.
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// What becomes of the request.
enum Verdict {
    /// On to the upstream, with these headers of the service's answer.
    Allow(Vec<(String, Bytes)>),
    /// A local reply instead.
    Deny {
        status: u16,
        headers: Vec<(String, Bytes)>,
        body: Option<Bytes>,
    },
}

struct ExtAuthz {
    config: Rc<Config>,
    /// The token of the check call in flight, to tell its answer from a stranger's.
    pending_check: Option<u32>,
}

impl ExtAuthz {
    fn start_check(&self) -> Result<u32, Status> {
        // Bytes, not strings: the SDK's string getters panic on a value that is not UTF-8.
        let request_headers = self.get_http_request_headers_bytes();
        let value_of = |name: &str| {
            request_headers
                .iter()
                .find(|(key, _)| key == name)
                .and_then(|(_, value)| std::str::from_utf8(value).ok())
        };
        let mut call_headers: Vec<(&str, &str)> = vec![
            (":method", "GET"),
            (":path", self.config.path.as_str()),
            (":authority", self.config.authority.as_str()),
        ];
        for (name, value) in &request_headers {
            if !self
                .config
                .headers_to_forward
                .iter()
                .any(|wanted| name.eq_ignore_ascii_case(wanted))
            {
                continue;
            }
            match std::str::from_utf8(value) {
                Ok(value) => call_headers.push((name, value)),
                // The SDK sends header values as strings only; a mangled credential would be
                // worse than none.
                Err(_) => warn!("ext-authz: not forwarding {name}: its value is not UTF-8"),
            }
        }
        if let Some(method) = value_of(":method") {
            call_headers.push((FORWARDED_METHOD, method));
        }
        if let Some(path) = value_of(":path") {
            call_headers.push((FORWARDED_URI, path));
        }
        self.dispatch_http_call(
            &self.config.cluster,
            call_headers,
            None,
            Vec::new(),
            self.config.timeout,
        )
    }

    /// The verdict when the service gave none: the call could not start, failed or timed out.
    fn without_answer(&self, why: &str) -> Verdict {
        if self.config.failure_mode_allow {
            warn!("ext-authz: {why}; letting the request through (failure_mode_allow)");
            Verdict::Allow(Vec::new())
        } else {
            warn!(
                "ext-authz: {why}; answering {}",
                self.config.status_on_error
            );
            Verdict::Deny {
                status: self.config.status_on_error,
                headers: Vec::new(),
                body: None,
            }
        }
    }

    fn verdict_of_answer(&self, body_size: usize) -> Verdict {
        let headers = self.get_http_call_response_headers_bytes();
        let status = headers
            .iter()
            .find(|(name, _)| name == ":status")
            .and_then(|(_, value)| std::str::from_utf8(value).ok()?.parse::<u16>().ok());
        let Some(status) = status else {
            return self.without_answer(&format!(
                "no answer from cluster {} (connection failure or timeout)",
                self.config.cluster
            ));
        };
        let kept = |allowed: &[String]| -> Vec<(String, Bytes)> {
            headers
                .iter()
                .filter(|(name, _)| allowed.iter().any(|a| name.eq_ignore_ascii_case(a)))
                .map(|(name, value)| (name.to_ascii_lowercase(), value.clone()))
                .collect()
        };
        if (200..300).contains(&status) {
            return Verdict::Allow(kept(&self.config.allowed_upstream_headers));
        }
        // A redirect or an informational status would make no sense to the client as a denial;
        // Envoy answers 403 for those as well.
        let status = if (400..=599).contains(&status) {
            status
        } else {
            403
        };
        let body = if body_size == 0 {
            None
        } else {
            self.get_http_call_response_body(0, body_size)
        };
        Verdict::Deny {
            status,
            headers: kept(&self.config.allowed_client_headers),
            body,
        }
    }

    /// Carries out `verdict`; returns whether the request goes on.
    fn apply(&self, verdict: Verdict) -> bool {
        match verdict {
            Verdict::Allow(from_service) => {
                // Every allowed header is the service's to set: whatever the client sent under
                // that name goes, even when the service sends none, so `x-user` cannot be forged.
                for name in &self.config.allowed_upstream_headers {
                    self.remove_http_request_header(name);
                }
                for (name, value) in &from_service {
                    self.add_http_request_header_bytes(name, value);
                }
                true
            }
            Verdict::Deny {
                status,
                headers,
                body,
            } => {
                let headers: Vec<(&str, &str)> = headers
                    .iter()
                    .filter_map(|(name, value)| {
                        Some((name.as_str(), std::str::from_utf8(value).ok()?))
                    })
                    .collect();
                self.send_http_response(u32::from(status), headers, body.as_deref());
                false
            }
        }
    }
}

impl Context for ExtAuthz {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if self.pending_check != Some(token_id) {
            warn!("ext-authz: ignoring the answer to unknown call {token_id}");
            return;
        }
        self.pending_check = None;
        let verdict = self.verdict_of_answer(body_size);
        if self.apply(verdict) {
            self.resume_http_request();
        }
    }
}

impl HttpContext for ExtAuthz {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        match self.start_check() {
            Ok(token) => {
                self.pending_check = Some(token);
                Action::Pause
            }
            Err(status) => {
                let verdict = self.without_answer(&format!(
                    "the check call to cluster {} could not start ({status:?}; is the cluster \
                     defined in the gateway?)",
                    self.config.cluster
                ));
                if self.apply(verdict) {
                    Action::Continue
                } else {
                    Action::Pause
                }
            }
        }
    }
}
