//! HTTP Basic authentication for chosen paths and methods, configured like Istio's
//! wasm-extensions `basic_auth` plugin.
//!
//! Plugin configuration (JSON):
//! `{"basic_auth_rules": [{"prefix": "/api", "request_methods": ["GET"], "credentials": ["user:pass"]}],
//! "realm": "istio"}`. Each rule has exactly one of `prefix`, `exact` or `suffix`. See README.md.

use std::rc::Rc;

use log::{error, info, warn};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde_json::{Map, Value};

const DEFAULT_REALM: &str = "istio";
/// Reply body when a protected request carries no `Authorization: Basic ...` header.
const NO_CREDENTIALS: &str = "No Basic Authentication information found.";
/// Reply body when the credentials are malformed or not accepted.
const INVALID_CREDENTIALS: &str = "User name or password is invalid.";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_context_id| -> Box<dyn RootContext> {
        Box::new(BasicAuthRoot { config: Rc::default() })
    });
}}

/// Which request paths a rule covers. Paths are compared without their query string.
#[derive(Debug)]
enum PathMatch {
    Prefix(String),
    Exact(String),
    Suffix(String),
}

impl PathMatch {
    fn matches(&self, path: &[u8]) -> bool {
        match self {
            PathMatch::Prefix(prefix) => path.starts_with(prefix.as_bytes()),
            PathMatch::Exact(exact) => path == exact.as_bytes(),
            PathMatch::Suffix(suffix) => path.ends_with(suffix.as_bytes()),
        }
    }
}

#[derive(Debug)]
struct Rule {
    path: PathMatch,
    /// Compared exactly with `:method` (HTTP methods are case-sensitive).
    methods: Vec<String>,
    /// Decoded `user:password` pairs.
    credentials: Vec<Vec<u8>>,
}

impl Rule {
    fn applies_to(&self, method: &[u8], path: &[u8]) -> bool {
        self.methods.iter().any(|m| m.as_bytes() == method) && self.path.matches(path)
    }

    fn accepts(&self, credential: &[u8]) -> bool {
        // Checks every configured credential, so the time taken says little about which one
        // came close.
        self.credentials.iter().fold(false, |found, known| {
            constant_time_eq(known, credential) | found
        })
    }

    /// Parses `basic_auth_rules[i]`; errors name the offending field, never a credential.
    fn parse(value: &Value) -> Result<Self, String> {
        let Value::Object(fields) = value else {
            return Err("is not an object".into());
        };
        let mut paths = Vec::new();
        for name in ["prefix", "exact", "suffix"] {
            let Some(value) = fields.get(name) else {
                continue;
            };
            let Value::String(value) = value else {
                return Err(format!("{name} must be a string"));
            };
            if value.is_empty() {
                return Err(format!("{name} must not be empty"));
            }
            paths.push(match name {
                "prefix" => PathMatch::Prefix(value.clone()),
                "exact" => PathMatch::Exact(value.clone()),
                _ => PathMatch::Suffix(value.clone()),
            });
        }
        let path = match paths.len() {
            1 => paths.remove(0),
            0 => {
                return Err("sets none of prefix, exact or suffix; exactly one is required".into());
            }
            _ => {
                let present: Vec<&str> = ["prefix", "exact", "suffix"]
                    .into_iter()
                    .filter(|name| fields.contains_key(*name))
                    .collect();
                return Err(format!(
                    "sets both {}; exactly one of prefix, exact or suffix is allowed",
                    present.join(" and ")
                ));
            }
        };

        let methods = string_list(fields, "request_methods", "method")?;
        if let Some(index) = methods.iter().position(|m| m.is_empty()) {
            return Err(format!("request_methods[{index}] is empty"));
        }

        let credentials = string_list(fields, "credentials", "credential")?
            .iter()
            .enumerate()
            .map(|(index, credential)| {
                parse_credential(credential).ok_or_else(|| {
                    format!(
                        "credentials[{index}] is neither \"user:password\" nor the base64 \
                         encoding of \"user:password\""
                    )
                })
            })
            .collect::<Result<_, _>>()?;

        Ok(Rule {
            path,
            methods: methods.into_iter().map(str::to_owned).collect(),
            credentials,
        })
    }
}

/// A non-empty list of strings.
fn string_list<'a>(
    fields: &'a Map<String, Value>,
    name: &str,
    what: &str,
) -> Result<Vec<&'a str>, String> {
    let items: &[Value] = match fields.get(name) {
        None => &[],
        Some(Value::Array(items)) => items,
        Some(_) => return Err(format!("{name} must be a list of strings")),
    };
    if items.is_empty() {
        return Err(format!("{name} must list at least one {what}"));
    }
    items
        .iter()
        .enumerate()
        .map(|(index, item)| {
            item.as_str()
                .ok_or_else(|| format!("{name}[{index}] must be a string"))
        })
        .collect()
}

/// `user:password` as written, or base64 of it (a base64 string never contains `:`).
fn parse_credential(credential: &str) -> Option<Vec<u8>> {
    if credential.contains(':') {
        return Some(credential.as_bytes().to_vec());
    }
    decode_base64(credential.as_bytes()).filter(|decoded| decoded.contains(&b':'))
}

#[derive(Debug)]
struct Config {
    rules: Vec<Rule>,
    /// The `WWW-Authenticate` value sent with every 401, as Istio's plugin writes it.
    challenge: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            rules: Vec::new(),
            challenge: format!("Basic realm={DEFAULT_REALM}"),
        }
    }
}

impl Config {
    fn parse(raw: &[u8]) -> Result<Self, String> {
        if raw.iter().all(u8::is_ascii_whitespace) {
            return Err("the configuration is empty; basic_auth_rules is required".into());
        }
        let value: Value =
            serde_json::from_slice(raw).map_err(|err| format!("not valid JSON: {err}"))?;
        let Value::Object(fields) = value else {
            return Err("must be a JSON object".into());
        };
        let rules = match fields.get("basic_auth_rules") {
            Some(Value::Array(rules)) => rules,
            Some(_) => return Err("basic_auth_rules must be a list of rules".into()),
            None => return Err("basic_auth_rules is missing".into()),
        };
        let rules = rules
            .iter()
            .enumerate()
            .map(|(index, rule)| {
                Rule::parse(rule).map_err(|err| format!("basic_auth_rules[{index}]: {err}"))
            })
            .collect::<Result<_, _>>()?;
        let realm = match fields.get("realm") {
            None => DEFAULT_REALM,
            Some(Value::String(realm)) if realm.chars().any(char::is_control) => {
                return Err("realm must not contain control characters".into());
            }
            Some(Value::String(realm)) => realm,
            Some(_) => return Err("realm must be a string".into()),
        };
        Ok(Config {
            rules,
            challenge: format!("Basic realm={realm}"),
        })
    }
}

struct BasicAuthRoot {
    /// Shared with every HTTP context; replaced wholesale on reconfiguration.
    config: Rc<Config>,
}

impl Context for BasicAuthRoot {}

impl RootContext for BasicAuthRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        let config = match Config::parse(&raw) {
            Ok(config) => config,
            Err(err) => {
                error!("basic-auth: invalid configuration: {err}");
                return false;
            }
        };
        if config.rules.is_empty() {
            warn!("basic-auth: basic_auth_rules is empty; no request will be checked");
        }
        info!(
            "basic-auth: {} rule(s), WWW-Authenticate: {}",
            config.rules.len(),
            config.challenge
        );
        self.config = Rc::new(config);
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(BasicAuth {
            config: Rc::clone(&self.config),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct BasicAuth {
    config: Rc<Config>,
}

impl BasicAuth {
    fn deny(&self, body: &str) -> Action {
        self.send_http_response(
            401,
            vec![("WWW-Authenticate", &self.config.challenge)],
            Some(body.as_bytes()),
        );
        Action::Pause
    }
}

impl Context for BasicAuth {}

impl HttpContext for BasicAuth {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // Bytes, not strings: the SDK's string getters panic on a value that is not UTF-8.
        let method = self
            .get_http_request_header_bytes(":method")
            .unwrap_or_default();
        let full_path = self
            .get_http_request_header_bytes(":path")
            .unwrap_or_default();
        let path = full_path.split(|&b| b == b'?').next().unwrap_or_default();

        let mut matching = self
            .config
            .rules
            .iter()
            .filter(|rule| rule.applies_to(&method, path))
            .peekable();
        if matching.peek().is_none() {
            return Action::Continue;
        }

        let authorization = self.get_http_request_header_bytes("authorization");
        let Some(token) = authorization.as_deref().and_then(basic_token) else {
            return self.deny(NO_CREDENTIALS);
        };
        // Every matching rule must accept the credentials (as in Istio's plugin), so a rule for
        // `/admin` can narrow down who of a rule for `/` gets in.
        match decode_base64(token) {
            Some(credential) if matching.all(|rule| rule.accepts(&credential)) => Action::Continue,
            _ => self.deny(INVALID_CREDENTIALS),
        }
    }
}

/// The token of an `Authorization: Basic <token>` value; the scheme is case-insensitive.
fn basic_token(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let space = value.iter().position(|&b| b == b' ' || b == b'\t')?;
    let (scheme, token) = value.split_at(space);
    let token = token.trim_ascii();
    (scheme.eq_ignore_ascii_case(b"basic") && !token.is_empty()).then_some(token)
}

/// Standard base64 (RFC 4648 §4), with or without `=` padding; `None` if malformed.
fn decode_base64(input: &[u8]) -> Option<Vec<u8>> {
    let data = input
        .strip_suffix(b"==")
        .or_else(|| input.strip_suffix(b"="))
        .unwrap_or(input);
    let padded = data.len() != input.len();
    if data.len() % 4 == 1 || (padded && !input.len().is_multiple_of(4)) {
        return None;
    }
    let mut out = Vec::with_capacity(data.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in data {
        let sextet = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(sextet);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Equality whose time depends on the lengths only, not on where the bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0, |diff, (x, y)| diff | (x ^ y)) == 0
}
