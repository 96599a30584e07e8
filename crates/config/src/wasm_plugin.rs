//! Istio `WasmPlugin` manifests (`extensions.istio.io/v1alpha1`): the model with every field,
//! loading from multi-document YAML files, the checks, and Istio's ordering.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, Report};
use crate::plugin::{CodeSource, FailurePolicy, PluginOrigin, PluginSpec};
use crate::workload::{
    GATEWAY_API_GROUP, ListenerMode, Workload, canonical_group, is_dns_label, is_dns_subdomain,
};

/// The API group of WasmPlugin.
pub const WASM_PLUGIN_GROUP: &str = "extensions.istio.io";
/// The `apiVersion`s read as WasmPlugins.
pub const WASM_PLUGIN_API_VERSIONS: &[&str] = &["extensions.istio.io/v1alpha1"];
/// URL schemes Istio allows (a scheme-less URL is OCI).
pub const ALLOWED_URL_SCHEMES: &[&str] = &["file", "http", "https", "oci"];

/// One WasmPlugin manifest, where it was read from, and its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WasmPluginSpec {
    /// The manifest file (the plugins folder joined with the file name).
    pub file: PathBuf,
    /// The document's 1-based index in the file (counting every document, of any kind).
    pub document: usize,
    pub api_version: String,
    pub metadata: ObjectMeta,
    pub spec: WasmPlugin,
}

/// The Kubernetes metadata kept from a manifest (other metadata fields are ignored).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// RFC 3339, as Kubernetes writes it (`2024-05-01T10:00:00Z`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The WasmPlugin `spec`, every field of Istio's API (unknown fields are refused).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WasmPlugin {
    /// Which workloads get the plugin (matchLabels). Exclusive with `targetRefs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Deprecated singular form of `targetRefs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    /// `file:///abs/x.wasm`, a path (absolute, or `./`/`../` relative to the manifest's folder, or
    /// ending in `.wasm`), `http(s)://...`, `oci://...`, or a scheme-less OCI reference.
    pub url: String,
    /// Lowercase hex sha256 of the module (of the manifest digest for OCI), or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default)]
    pub image_pull_policy: PullPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_secret: Option<String>,
    /// Unimplemented in Istio; kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_key: Option<String>,
    /// Any map; given to the plugin as JSON (see [`WasmPluginSpec::plugin_config_json`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_config: Option<serde_json::Value>,
    /// The root id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_name: Option<String>,
    #[serde(default)]
    pub phase: PluginPhase,
    /// Higher runs first within a phase; unset counts as `i32::MIN` (Istio's sort key; the API
    /// documents a default of 0, but istiod sorts unset last).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    #[serde(default)]
    pub fail_strategy: FailStrategy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_config: Option<WasmVmConfig>,
    /// OR of traffic selectors; empty = all traffic.
    #[serde(rename = "match", default, skip_serializing_if = "Vec::is_empty")]
    pub traffic_match: Vec<TrafficSelector>,
    #[serde(rename = "type", default)]
    pub plugin_type: PluginType,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetReference {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WasmVmConfig {
    #[serde(default)]
    pub env: Vec<EnvVar>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvVar {
    /// A C identifier, unique in the list.
    pub name: String,
    /// For `INLINE` only (absent = empty). Istio's CRD refuses the key, even empty, with `HOST`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default)]
    pub value_from: EnvValueSource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EnvValueSource {
    /// Use `value`.
    #[default]
    Inline,
    /// Copy the gateway's own environment variable of the same name (skipped when unset).
    Host,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficSelector {
    #[serde(default)]
    pub mode: WorkloadMode,
    /// Empty = every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSelector>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortSelector {
    pub number: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WorkloadMode {
    /// = `CLIENT_AND_SERVER`.
    #[default]
    Undefined,
    Client,
    Server,
    ClientAndServer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PullPolicy {
    /// IfNotPresent, except an OCI URL ending in `:latest` (Always).
    #[default]
    #[serde(rename = "UNSPECIFIED_POLICY")]
    Unspecified,
    IfNotPresent,
    Always,
}

/// Where in the chain a WasmPlugin runs. Istio's order: `AUTHN`, `AUTHZ`, `STATS`, then unspecified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PluginPhase {
    /// After the STATS-phase plugins (and, in Wasmgate, after the listener's own `http_filters`).
    #[default]
    UnspecifiedPhase,
    Authn,
    Authz,
    Stats,
}

impl PluginPhase {
    /// 0 for AUTHN, 1 AUTHZ, 2 STATS, 3 unspecified.
    pub fn rank(self) -> u8 {
        match self {
            PluginPhase::Authn => 0,
            PluginPhase::Authz => 1,
            PluginPhase::Stats => 2,
            PluginPhase::UnspecifiedPhase => 3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FailStrategy {
    #[default]
    FailClose,
    FailOpen,
    FailReload,
}

impl From<FailStrategy> for FailurePolicy {
    fn from(s: FailStrategy) -> Self {
        match s {
            FailStrategy::FailClose => FailurePolicy::FailClosed,
            FailStrategy::FailOpen => FailurePolicy::FailOpen,
            FailStrategy::FailReload => FailurePolicy::FailReload,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PluginType {
    /// = HTTP.
    #[default]
    #[serde(rename = "UNSPECIFIED_PLUGIN_TYPE")]
    Unspecified,
    #[serde(rename = "HTTP")]
    Http,
    /// For the TCP (network filter) chain.
    #[serde(rename = "NETWORK")]
    Network,
}

impl PluginType {
    pub fn is_http(self) -> bool {
        matches!(self, PluginType::Http | PluginType::Unspecified)
    }
}

/// The document envelope as read.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Manifest {
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: ObjectMeta,
    spec: WasmPlugin,
    #[serde(default)]
    #[allow(dead_code)]
    status: Option<serde::de::IgnoredAny>,
}

impl WasmPluginSpec {
    /// `"file (document n)"`, the source name in this manifest's errors.
    pub fn source_name(&self) -> String {
        source_name(&self.file, self.document)
    }

    /// `namespace.name` as istiod names the Envoy filter, or `name` without a namespace.
    pub fn qualified_name(&self) -> String {
        match &self.metadata.namespace {
            Some(ns) => format!("{ns}.{}", self.metadata.name),
            None => self.metadata.name.clone(),
        }
    }

    /// `priority`, unset counting as `i32::MIN` (istiod's sort key).
    pub fn effective_priority(&self) -> i32 {
        self.spec.priority.unwrap_or(i32::MIN)
    }

    /// `metadata.creationTimestamp` as a time, when set and valid.
    pub fn creation_time(&self) -> Option<SystemTime> {
        let (secs, nanos) = parse_rfc3339(self.metadata.creation_timestamp.as_deref()?)?;
        let since = Duration::new(secs.unsigned_abs(), 0);
        let base = if secs >= 0 {
            SystemTime::UNIX_EPOCH.checked_add(since)?
        } else {
            SystemTime::UNIX_EPOCH.checked_sub(since)?
        };
        base.checked_add(Duration::from_nanos(nanos.into()))
    }

    /// `pluginConfig` as the JSON text the plugin reads in `on_configure`; empty when unset, null or
    /// an empty map (istiod then sends no configuration).
    pub fn plugin_config_json(&self) -> String {
        match &self.spec.plugin_config {
            None | Some(serde_json::Value::Null) => String::new(),
            Some(serde_json::Value::Object(m)) if m.is_empty() => String::new(),
            Some(v) => v.to_string(),
        }
    }

    /// Where the module comes from: `file://` and paths are local (relative ones against the
    /// manifest's folder); `http(s)://` and `oci://` remote; a scheme-less reference is OCI, as in
    /// Istio (`reg/repo:tag` becomes `oci://reg/repo:tag`).
    pub fn code_source(&self) -> CodeSource {
        let url = self.spec.url.as_str();
        let base = self.file.parent().unwrap_or(Path::new(""));
        let sha256 = self.spec.sha256.clone().filter(|s| !s.is_empty());
        if let Some(path) = url.strip_prefix("file://") {
            CodeSource::Local(crate::resolve_path(base, Path::new(path)))
        } else if url.contains("://") {
            CodeSource::Remote {
                uri: url.to_owned(),
                sha256,
            }
        } else if url.starts_with('/')
            || url.starts_with("./")
            || url.starts_with("../")
            || (url.ends_with(".wasm") && !url.contains(':'))
        {
            CodeSource::Local(crate::resolve_path(base, Path::new(url)))
        } else {
            CodeSource::Remote {
                uri: format!("oci://{url}"),
                sha256,
            }
        }
    }

    /// The resolved view, HOST environment values read from the process environment.
    pub fn to_plugin_spec(&self) -> PluginSpec {
        self.to_plugin_spec_with_env(&|key| std::env::var(key).ok())
    }

    /// As [`to_plugin_spec`](Self::to_plugin_spec), with `host_env` standing for the process
    /// environment.
    pub fn to_plugin_spec_with_env(&self, host_env: &dyn Fn(&str) -> Option<String>) -> PluginSpec {
        let environment = self
            .spec
            .vm_config
            .iter()
            .flat_map(|vm| &vm.env)
            .filter_map(|var| match var.value_from {
                EnvValueSource::Inline => {
                    Some((var.name.clone(), var.value.clone().unwrap_or_default()))
                }
                EnvValueSource::Host => host_env(&var.name).map(|v| (var.name.clone(), v)),
            })
            .collect();
        PluginSpec {
            name: self.qualified_name(),
            root_id: self.spec.plugin_name.clone().unwrap_or_default(),
            vm_id: String::new(),
            vm_configuration: Vec::new(),
            configuration: self.plugin_config_json().into_bytes(),
            source: self.code_source(),
            environment,
            failure_policy: self.spec.fail_strategy.into(),
            image_pull_policy: match self.spec.image_pull_policy {
                PullPolicy::Unspecified => None,
                PullPolicy::IfNotPresent => Some("IfNotPresent".into()),
                PullPolicy::Always => Some("Always".into()),
            },
            image_pull_secret: self
                .spec
                .image_pull_secret
                .clone()
                .filter(|s| !s.is_empty()),
            capabilities: None,
            reload_backoff: Default::default(),
            origin: PluginOrigin::WasmPlugin {
                file: self.file.clone(),
                document: self.document,
                name: self.metadata.name.clone(),
            },
        }
    }

    /// `targetRefs`, or the deprecated `targetRef` when `targetRefs` is empty (Istio's
    /// `GetTargetRefs`).
    pub fn target_refs(&self) -> Vec<&PolicyTargetReference> {
        if self.spec.target_refs.is_empty() {
            self.spec.target_ref.iter().collect()
        } else {
            self.spec.target_refs.iter().collect()
        }
    }

    /// Whether `match` selects a listener with this port and direction (Istio's
    /// `matchTrafficSelectors`): no selectors, or any one whose `mode` fits the direction (`CLIENT`,
    /// `SERVER`, or `CLIENT_AND_SERVER`/`UNDEFINED` for both) and whose `ports` is empty or lists
    /// the port.
    pub fn matches_listener(&self, port: u16, mode: ListenerMode) -> bool {
        self.spec.traffic_match.is_empty()
            || self.spec.traffic_match.iter().any(|s| {
                mode.matches(s.mode)
                    && (s.ports.is_empty()
                        || s.ports
                            .iter()
                            .any(|p| p.number != 0 && p.number == u32::from(port)))
            })
    }

    /// The checks Istio makes: the CRD's OpenAPI schema and CEL rules
    /// (`manifests/charts/base/files/crd-all.gen.yaml`) and the validating webhook
    /// (`pkg/config/validation/validation.go` `ValidateWasmPlugin`), plus the env var name rule the
    /// API documents (a C identifier).
    fn validate(&self, report: &mut Report<'_>) {
        let meta = &self.metadata;
        if !is_dns_subdomain(&meta.name) {
            report.push(
                "metadata.name",
                format!(
                    "{:?} is not a valid name (lowercase letters, digits, '-' and '.', at most 253)",
                    meta.name
                ),
            );
        }
        if let Some(ns) = &meta.namespace
            && !is_dns_label(ns)
        {
            report.push(
                "metadata.namespace",
                format!("{ns:?} is not a valid namespace"),
            );
        }
        if let Some(ts) = &meta.creation_timestamp
            && parse_rfc3339(ts).is_none()
        {
            report.push(
                "metadata.creationTimestamp",
                format!("{ts:?} is not an RFC 3339 time such as 2024-05-01T10:00:00Z"),
            );
        }

        let spec = &self.spec;
        if let Err(reason) = check_url(&spec.url) {
            report.push("spec.url", reason);
        }
        if let Some(sha) = &spec.sha256
            && !sha.is_empty()
            && !(sha.len() == 64 && sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        {
            report.push(
                "spec.sha256",
                format!("{sha:?} is not 64 lowercase hexadecimal characters"),
            );
        }
        let set = usize::from(spec.selector.is_some())
            + usize::from(spec.target_ref.is_some())
            + usize::from(!spec.target_refs.is_empty());
        if set > 1 {
            report.push("spec", "only one of targetRefs or selector can be set");
        }
        if let Some(selector) = &spec.selector {
            if selector.match_labels.len() > 4096 {
                report.push("spec.selector.matchLabels", "at most 4096 labels");
            }
            for (key, value) in &selector.match_labels {
                let at = format!("spec.selector.matchLabels.{key}");
                if key.is_empty() {
                    report.push("spec.selector.matchLabels", "key must not be empty");
                } else if key.contains('*') {
                    report.push(&at, "wildcard not allowed in label key match");
                }
                if value.contains('*') {
                    report.push(&at, "wildcard not allowed in label value match");
                } else if value.len() > 63 {
                    report.push(&at, "a label value has at most 63 characters");
                }
            }
        }
        if spec.target_refs.len() > 16 {
            report.push(
                "spec.targetRefs",
                format!("at most 16 entries ({} given)", spec.target_refs.len()),
            );
        }
        let refs = spec
            .target_ref
            .iter()
            .map(|r| ("spec.targetRef".to_owned(), r))
            .chain(
                spec.target_refs
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (format!("spec.targetRefs[{i}]"), r)),
            );
        for (at, r) in refs {
            check_target_ref(&at, r, report);
        }
        if let Some(secret) = &spec.image_pull_secret
            && !(1..=253).contains(&secret.len())
        {
            report.push("spec.imagePullSecret", "must be 1 to 253 characters");
        }
        if let Some(name) = &spec.plugin_name
            && !(1..=256).contains(&name.len())
        {
            report.push("spec.pluginName", "must be 1 to 256 characters");
        }
        if let Some(config) = &spec.plugin_config
            && !(config.is_object() || config.is_null())
        {
            report.push("spec.pluginConfig", "must be a map");
        }
        if let Some(vm) = &spec.vm_config {
            if vm.env.len() > 256 {
                report.push(
                    "spec.vmConfig.env",
                    format!("at most 256 entries ({} given)", vm.env.len()),
                );
            }
            let mut seen: HashMap<&str, usize> = HashMap::new();
            for (i, var) in vm.env.iter().enumerate() {
                let at = format!("spec.vmConfig.env[{i}]");
                if !(1..=256).contains(&var.name.len()) {
                    report.push(format!("{at}.name"), "must be 1 to 256 characters");
                } else if !is_c_identifier(&var.name) {
                    report.push(
                        format!("{at}.name"),
                        format!(
                            "{:?} is not a valid environment variable name (a C identifier)",
                            var.name
                        ),
                    );
                } else if let Some(first) = seen.insert(&var.name, i) {
                    seen.insert(&var.name, first);
                    report.push(
                        format!("{at}.name"),
                        format!("duplicate name {:?} (also env[{first}])", var.name),
                    );
                }
                if var.value_from == EnvValueSource::Host && var.value.is_some() {
                    report.push(
                        format!("{at}.value"),
                        "value may only be set when valueFrom is INLINE",
                    );
                }
                if var.value.as_ref().is_some_and(|v| v.len() > 2048) {
                    report.push(format!("{at}.value"), "at most 2048 characters");
                }
            }
        }
        for (i, selector) in spec.traffic_match.iter().enumerate() {
            let mut ports: HashMap<u32, usize> = HashMap::new();
            for (j, port) in selector.ports.iter().enumerate() {
                let at = format!("spec.match[{i}].ports[{j}].number");
                if !(1..=65535).contains(&port.number) {
                    report.push(at, format!("port {} is outside 1..=65535", port.number));
                } else if let Some(first) = ports.insert(port.number, j) {
                    ports.insert(port.number, first);
                    report.push(
                        at,
                        format!("duplicate port {} (also ports[{first}])", port.number),
                    );
                }
            }
        }
    }
}

/// The `url` rule of Istio's CRD and webhook: not empty; parsed as Go's `url.ParseRequestURI` does
/// (else as `http://` + url), its scheme must be one of [`ALLOWED_URL_SCHEMES`] or none. Like Go,
/// `host:port/path` parses with the scheme `host`, so a scheme-less OCI reference with a port needs
/// `oci://`.
fn check_url(url: &str) -> Result<(), String> {
    if url.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if url.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err("invalid control character in URL".to_owned());
    }
    if url.contains(' ') {
        return Err("a URL has no spaces".to_owned());
    }
    let bytes = url.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = |k: usize| bytes.get(k).is_some_and(u8::is_ascii_hexdigit);
            if !(hex(i + 1) && hex(i + 2)) {
                let end = (i + 3).min(url.len());
                return Err(format!(
                    "invalid URL escape {:?}",
                    url.get(i..end).unwrap_or("%")
                ));
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    match go_url_scheme(url)? {
        None => Ok(()),
        Some(scheme) => {
            let scheme = scheme.to_ascii_lowercase();
            if ALLOWED_URL_SCHEMES.contains(&scheme.as_str()) {
                Ok(())
            } else {
                Err(format!(
                    "unsupported URL scheme {scheme:?} (allowed: {}, or none for OCI; a \
                     registry with a port needs oci://)",
                    ALLOWED_URL_SCHEMES.join(", ")
                ))
            }
        }
    }
}

/// The scheme Go's `url.Parse` finds (`getScheme`): letters, then letters, digits, `+`, `-`, `.`,
/// up to a `:`; any other character first means no scheme.
fn go_url_scheme(url: &str) -> Result<Option<&str>, String> {
    for (i, c) in url.bytes().enumerate() {
        match c {
            b'a'..=b'z' | b'A'..=b'Z' => {}
            b'0'..=b'9' | b'+' | b'-' | b'.' if i > 0 => {}
            b':' if i == 0 => return Err("missing protocol scheme".to_owned()),
            b':' => return Ok(Some(&url[..i])),
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// One `targetRef(s)` entry: the CRD's schema (kind, name, group patterns and lengths; no
/// namespace) and the webhook's allowed targets.
fn check_target_ref(at: &str, r: &PolicyTargetReference, report: &mut Report<'_>) {
    if r.kind.is_empty() || r.kind.len() > 63 || !is_kind(&r.kind) {
        report.push(
            format!("{at}.kind"),
            format!(
                "{:?} is not a kind (1 to 63 letters, digits and '-', starting with a letter)",
                r.kind
            ),
        );
    }
    if !(1..=253).contains(&r.name.len()) {
        report.push(format!("{at}.name"), "must be 1 to 253 characters");
    }
    if let Some(group) = &r.group
        && !group.is_empty()
        && !is_dns_subdomain(group)
    {
        report.push(
            format!("{at}.group"),
            format!("{group:?} is not a valid API group"),
        );
    }
    if r.namespace.as_deref().is_some_and(|ns| !ns.is_empty()) {
        report.push(
            format!("{at}.namespace"),
            "cross namespace referencing is not currently supported",
        );
    }
    let group = canonical_group(r);
    let allowed = matches!(
        (group, r.kind.as_str()),
        ("core", "Service")
            | ("networking.istio.io", "ServiceEntry")
            | (GATEWAY_API_GROUP, "Gateway")
            | (GATEWAY_API_GROUP, "GatewayClass")
    );
    if !allowed && !r.kind.is_empty() {
        report.push(
            at,
            format!(
                "targetRef must be to one of core/Service, networking.istio.io/ServiceEntry, \
                 gateway.networking.k8s.io/Gateway, gateway.networking.k8s.io/GatewayClass but was \
                 {}/{}",
                r.group.as_deref().unwrap_or(""),
                r.kind
            ),
        );
    }
}

fn is_kind(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphabetic()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
}

/// Istio's order for WasmPlugins of one namespace: phase (`AUTHN`, `AUTHZ`, `STATS`,
/// unspecified), then higher `priority` first, unset priority counting as `i32::MIN` (as istiod's
/// `WasmPluginsByListenerInfo` does, so an unset priority ties with `-2147483648`), then earlier
/// `creationTimestamp` (unset counts as the earliest, as Go's zero time does), then `name`, then
/// `namespace` (istiod's `sortConfigByCreationTime`). Remaining ties keep their order (the sort is
/// stable). For plugins of several namespaces, Istio puts the gateway's own namespace before the
/// root namespace on equal priority: see [`order_plugins_for`].
pub fn istio_order(a: &WasmPluginSpec, b: &WasmPluginSpec) -> Ordering {
    a.spec
        .phase
        .rank()
        .cmp(&b.spec.phase.rank())
        .then_with(|| b.effective_priority().cmp(&a.effective_priority()))
        .then_with(|| a.creation_time().cmp(&b.creation_time()))
        .then_with(|| a.metadata.name.cmp(&b.metadata.name))
        .then_with(|| a.metadata.namespace.cmp(&b.metadata.namespace))
}

/// Sorts WasmPlugins in Istio's order ([`istio_order`]), ignoring which namespace group each is in.
/// Works on `Vec<WasmPluginSpec>` and on `Vec<&WasmPluginSpec>` alike.
pub fn order_plugins<P: std::borrow::Borrow<WasmPluginSpec>>(plugins: &mut [P]) {
    plugins.sort_by(|a, b| istio_order(a.borrow(), b.borrow()));
}

/// Sorts the WasmPlugins that apply to `workload` exactly as istiod orders them for a proxy: by
/// phase, then higher priority first (unset = `i32::MIN`), then the plugins of the gateway's own
/// namespace before those of the root namespace (before those of a waypoint's Service namespaces),
/// then creation time, name, namespace. A manifest without a namespace is in the gateway's.
pub fn order_plugins_for<P: std::borrow::Borrow<WasmPluginSpec>>(
    workload: &Workload,
    plugins: &mut [P],
) {
    plugins.sort_by(|a, b| {
        let (a, b) = (a.borrow(), b.borrow());
        a.spec
            .phase
            .rank()
            .cmp(&b.spec.phase.rank())
            .then_with(|| b.effective_priority().cmp(&a.effective_priority()))
            .then_with(|| workload.namespace_rank(a).cmp(&workload.namespace_rank(b)))
            .then_with(|| a.creation_time().cmp(&b.creation_time()))
            .then_with(|| a.metadata.name.cmp(&b.metadata.name))
            .then_with(|| {
                workload
                    .plugin_namespace(a)
                    .cmp(workload.plugin_namespace(b))
            })
    });
}

/// Reads every `*.yaml` / `*.yml` file of `dir` (sorted by name), and returns the WasmPlugins in
/// them in file and document order (not yet in Istio's order: see [`order_plugins`]). Stops at the
/// first problem; [`load_wasm_plugins_lenient`] keeps the good manifests beside the errors.
pub fn load_wasm_plugins(dir: impl AsRef<Path>) -> Result<Vec<WasmPluginSpec>, ConfigError> {
    let (plugins, errors) = load_wasm_plugins_lenient(dir);
    match errors.into_iter().next() {
        Some(error) => Err(error),
        None => Ok(plugins),
    }
}

/// As [`load_wasm_plugins`], but a bad manifest (or file) is reported and skipped, and the others
/// are kept. A WasmPlugin whose namespace and name repeat an earlier one is reported and skipped.
pub fn load_wasm_plugins_lenient(dir: impl AsRef<Path>) -> (Vec<WasmPluginSpec>, Vec<ConfigError>) {
    let scan = scan_wasm_plugin_dir(dir);
    (scan.plugins, scan.errors)
}

/// The `*.yaml` / `*.yml` files of a plugins folder, sorted by name (sub-folders are not read).
pub fn manifest_files(dir: impl AsRef<Path>) -> Result<Vec<PathBuf>, ConfigError> {
    let dir = dir.as_ref();
    let entries = std::fs::read_dir(dir).map_err(|e| {
        let reason = format!("cannot read the plugins folder: {e}");
        ConfigError::new(dir.display().to_string(), "", reason)
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|ext| ext == "yaml" || ext == "yml")
        })
        .collect();
    files.sort();
    Ok(files)
}

/// [`scan_wasm_plugins`] over every file of [`manifest_files`], in order, and a WasmPlugin whose
/// namespace and name repeat an earlier one is an error (the earlier one is kept).
pub fn scan_wasm_plugin_dir(dir: impl AsRef<Path>) -> ManifestScan {
    let mut all = ManifestScan::default();
    let files = match manifest_files(dir) {
        Ok(files) => files,
        Err(error) => {
            all.errors.push(error);
            return all;
        }
    };
    let mut seen: HashMap<(Option<String>, String), String> = HashMap::new();
    for file in files {
        let scan = match std::fs::read_to_string(&file) {
            Ok(text) => scan_wasm_plugins(&text, &file),
            Err(e) => ManifestScan {
                errors: vec![ConfigError::new(
                    file.display().to_string(),
                    "",
                    format!("cannot read the file: {e}"),
                )],
                ..ManifestScan::default()
            },
        };
        all.errors.extend(scan.errors);
        all.skipped.extend(scan.skipped);
        for plugin in scan.plugins {
            let key = (
                plugin.metadata.namespace.clone(),
                plugin.metadata.name.clone(),
            );
            if let Some(first) = seen.get(&key) {
                all.errors.push(ConfigError::new(
                    plugin.source_name(),
                    "metadata.name",
                    format!(
                        "duplicate WasmPlugin {:?} (also in {first})",
                        plugin.qualified_name()
                    ),
                ));
            } else {
                seen.insert(key, plugin.source_name());
                all.plugins.push(plugin);
            }
        }
    }
    all
}

/// Parses the WasmPlugins of one (multi-document) YAML text read from `file` (see
/// [`scan_wasm_plugins`], whose notes on skipped documents this drops).
pub fn parse_wasm_plugins(text: &str, file: &Path) -> (Vec<WasmPluginSpec>, Vec<ConfigError>) {
    let scan = scan_wasm_plugins(text, file);
    (scan.plugins, scan.errors)
}

/// What one manifest file holds: its valid WasmPlugins, the errors of the others, and the documents
/// that are not Istio WasmPlugins.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ManifestScan {
    pub plugins: Vec<WasmPluginSpec>,
    pub errors: Vec<ConfigError>,
    pub skipped: Vec<SkippedDocument>,
}

/// A document of a manifest file that is not a WasmPlugin, and why it was passed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedDocument {
    /// `"file (document n)"`.
    pub source: String,
    pub reason: String,
}

impl std::fmt::Display for SkippedDocument {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: skipped: {}", self.source, self.reason)
    }
}

/// Reads the documents of one (multi-document) YAML text read from `file`, as a plugins folder is
/// read (the way `kubectl apply -f` would see the file, keeping only Istio's WasmPlugins):
///
/// - `kind: WasmPlugin` with `apiVersion: extensions.istio.io/v1alpha1`: parsed and checked
///   (field by field, unknown fields refused, then Istio's rules); a bad one is an error and the
///   others are kept;
/// - `kind: WasmPlugin` of `extensions.istio.io` in another version, or without `apiVersion`, or
///   an `extensions.istio.io` object without `kind`: an error;
/// - anything else (other kinds such as a Secret or a Service, a `WasmPlugin` of another API group
///   such as Higress', a document without `kind`): skipped, with a note;
/// - empty documents (only comments): passed over silently.
///
/// A YAML syntax error ends the file. Document numbers are 1-based and count every document.
pub fn scan_wasm_plugins(text: &str, file: &Path) -> ManifestScan {
    let mut scan = ManifestScan::default();
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let source = source_name(file, index);
        let value = match serde_yaml::Value::deserialize(document) {
            Ok(value) => value,
            Err(e) => {
                scan.errors.push(ConfigError::from_yaml(&source, &e));
                break;
            }
        };
        let skip = |scan: &mut ManifestScan, reason: String| {
            scan.skipped.push(SkippedDocument {
                source: source.clone(),
                reason,
            });
        };
        if value.is_null() {
            continue;
        }
        if !value.is_mapping() {
            skip(&mut scan, "not a Kubernetes object (not a map)".to_owned());
            continue;
        }
        let kind = value.get("kind").and_then(serde_yaml::Value::as_str);
        let api_version = value.get("apiVersion").and_then(serde_yaml::Value::as_str);
        let istio_group = api_version.and_then(|v| v.split('/').next()) == Some(WASM_PLUGIN_GROUP);
        match (kind, api_version) {
            (Some("WasmPlugin"), Some(v)) if WASM_PLUGIN_API_VERSIONS.contains(&v) => {}
            (Some("WasmPlugin"), Some(v)) if istio_group => {
                scan.errors.push(ConfigError::new(
                    &source,
                    "apiVersion",
                    format!(
                        "unsupported apiVersion {v:?} (supported: {})",
                        WASM_PLUGIN_API_VERSIONS.join(", ")
                    ),
                ));
                continue;
            }
            (Some("WasmPlugin"), None) => {
                scan.errors.push(ConfigError::new(
                    &source,
                    "apiVersion",
                    format!(
                        "required field is missing (a WasmPlugin is {})",
                        WASM_PLUGIN_API_VERSIONS[0]
                    ),
                ));
                continue;
            }
            (Some("WasmPlugin"), Some(v)) => {
                skip(
                    &mut scan,
                    format!("a WasmPlugin of {v:?}, not Istio's {WASM_PLUGIN_API_VERSIONS:?}"),
                );
                continue;
            }
            (None, Some(_)) if istio_group => {
                scan.errors.push(ConfigError::new(
                    &source,
                    "kind",
                    "required field is missing (WasmPlugin)",
                ));
                continue;
            }
            (None, _) => {
                skip(&mut scan, "no kind: not a Kubernetes object".to_owned());
                continue;
            }
            (Some(other), v) => {
                skip(
                    &mut scan,
                    format!(
                        "kind {other} ({}) is not a WasmPlugin",
                        v.unwrap_or("no apiVersion")
                    ),
                );
                continue;
            }
        }
        let manifest: Manifest = match serde_path_to_error::deserialize(value) {
            Ok(m) => m,
            Err(e) => {
                scan.errors.push(ConfigError::from_serde(&source, "", e));
                continue;
            }
        };
        let plugin = WasmPluginSpec {
            file: file.to_owned(),
            document: index,
            api_version: manifest.api_version,
            metadata: manifest.metadata,
            spec: manifest.spec,
        };
        let mut report = Report::new(&source);
        plugin.validate(&mut report);
        if report.errors.is_empty() {
            scan.plugins.push(plugin);
        } else {
            scan.errors.extend(report.errors);
        }
    }
    scan
}

/// Whether a YAML text reads as Kubernetes manifests rather than a gateway configuration: one of
/// its documents is a map with `kind` or `apiVersion` (keys a gateway configuration does not have).
pub fn is_kubernetes_manifest(text: &str) -> bool {
    serde_yaml::Deserializer::from_str(text)
        .map_while(|d| serde_yaml::Value::deserialize(d).ok())
        .any(|v| v.get("kind").is_some() || v.get("apiVersion").is_some())
}

fn source_name(file: &Path, document: usize) -> String {
    format!("{} (document {document})", file.display())
}

fn is_c_identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Parses an RFC 3339 time (`2024-05-01T10:00:00Z`, `2024-05-01T12:00:00.5+02:00`) into seconds
/// and nanoseconds since the Unix epoch.
fn parse_rfc3339(s: &str) -> Option<(i64, u32)> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<u32> {
        let part = s.get(from..to)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&month)
        || day == 0
        || day > month_days[month as usize - 1]
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos = 0u32;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let kept = &frac[..digits.min(9)];
        nanos = kept.parse::<u32>().ok()? * 10u32.pow(9 - kept.len() as u32);
        rest = &frac[digits..];
    }
    let offset: i64 = match rest.as_bytes() {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let digit = |c: &u8| c.is_ascii_digit().then(|| i64::from(c - b'0'));
            let hours = digit(h1)? * 10 + digit(h2)?;
            let minutes = digit(m1)? * 10 + digit(m2)?;
            if hours > 23 || minutes > 59 {
                return None;
            }
            let total = hours * 3600 + minutes * 60;
            if *sign == b'-' { -total } else { total }
        }
        _ => return None,
    };
    let days = days_from_civil(i64::from(year), month, day);
    let secs = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second) - offset;
    Some((secs, nanos))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// Istio's example manifest (../shared/reference/istio-envoy-wasm.md §1 "Example"), verbatim.
    const ISTIO_EXAMPLE: &str = r#"apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: acl-check, namespace: istio-ingress}
spec:
  selector: {matchLabels: {istio: ingressgateway}}   # or targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]
  url: oci://registry.example.com/acl/acl-check:1.2.0  # digest form: ...@sha256:<64 hex>
  imagePullPolicy: IfNotPresent
  imagePullSecret: registry-pull-secret               # dockerconfigjson Secret in istio-ingress
  phase: AUTHZ
  priority: 1000
  failStrategy: FAIL_CLOSE
  type: HTTP
  pluginName: acl_root                                # root_id, only if the module needs it
  pluginConfig: {acl_server: authz.example.com, set_header: x-authz}
  vmConfig:
    env:
    - {name: POD_NAME, valueFrom: HOST}
    - {name: TRUST_DOMAIN, value: cluster.local}
  match:
  - mode: CLIENT
    ports: [{number: 443}]
"#;

    fn parse_one(text: &str) -> WasmPluginSpec {
        let (mut plugins, errors) = parse_wasm_plugins(text, Path::new("plugins.d/a.yaml"));
        assert_eq!(errors, Vec::new());
        assert_eq!(plugins.len(), 1);
        plugins.remove(0)
    }

    fn errors_of(text: &str) -> Vec<String> {
        let (_, errors) = parse_wasm_plugins(text, Path::new("plugins.d/a.yaml"));
        errors.iter().map(ToString::to_string).collect()
    }

    fn manifest(name: &str, spec: &str) -> String {
        format!(
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n  name: {name}\n\
             spec:\n  url: file:///p.wasm\n{spec}"
        )
    }

    #[test]
    fn istio_example_manifest() {
        let p = parse_one(ISTIO_EXAMPLE);
        assert_eq!(p.file, Path::new("plugins.d/a.yaml"));
        assert_eq!(p.document, 1);
        assert_eq!(p.api_version, "extensions.istio.io/v1alpha1");
        assert_eq!(p.metadata.name, "acl-check");
        assert_eq!(p.metadata.namespace.as_deref(), Some("istio-ingress"));
        let s = &p.spec;
        assert_eq!(
            s.selector.as_ref().unwrap().match_labels,
            BTreeMap::from([("istio".to_owned(), "ingressgateway".to_owned())])
        );
        assert_eq!(s.url, "oci://registry.example.com/acl/acl-check:1.2.0");
        assert_eq!(s.image_pull_policy, PullPolicy::IfNotPresent);
        assert_eq!(s.image_pull_secret.as_deref(), Some("registry-pull-secret"));
        assert_eq!(s.phase, PluginPhase::Authz);
        assert_eq!(s.priority, Some(1000));
        assert_eq!(s.fail_strategy, FailStrategy::FailClose);
        assert_eq!(s.plugin_type, PluginType::Http);
        assert_eq!(s.plugin_name.as_deref(), Some("acl_root"));
        assert_eq!(
            p.plugin_config_json(),
            r#"{"acl_server":"authz.example.com","set_header":"x-authz"}"#
        );
        let env = &s.vm_config.as_ref().unwrap().env;
        assert_eq!(env[0].name, "POD_NAME");
        assert_eq!(env[0].value_from, EnvValueSource::Host);
        assert_eq!(env[1].value.as_deref(), Some("cluster.local"));
        assert_eq!(env[1].value_from, EnvValueSource::Inline);
        assert_eq!(s.traffic_match[0].mode, WorkloadMode::Client);
        assert_eq!(s.traffic_match[0].ports, vec![PortSelector { number: 443 }]);
        assert!(p.matches_listener(443, ListenerMode::Client));
        assert!(!p.matches_listener(443, ListenerMode::Server));
        assert!(!p.matches_listener(8080, ListenerMode::Client));

        let host = |k: &str| (k == "POD_NAME").then(|| "gw-0".to_owned());
        let spec = p.to_plugin_spec_with_env(&host);
        assert_eq!(
            spec,
            PluginSpec {
                name: "istio-ingress.acl-check".into(),
                root_id: "acl_root".into(),
                vm_id: String::new(),
                vm_configuration: Vec::new(),
                configuration: br#"{"acl_server":"authz.example.com","set_header":"x-authz"}"#
                    .to_vec(),
                source: CodeSource::Remote {
                    uri: "oci://registry.example.com/acl/acl-check:1.2.0".into(),
                    sha256: None
                },
                environment: vec![
                    ("POD_NAME".into(), "gw-0".into()),
                    ("TRUST_DOMAIN".into(), "cluster.local".into())
                ],
                failure_policy: FailurePolicy::FailClosed,
                capabilities: None,
                reload_backoff: Default::default(),
                image_pull_policy: Some("IfNotPresent".into()),
                image_pull_secret: Some("registry-pull-secret".into()),
                origin: PluginOrigin::WasmPlugin {
                    file: "plugins.d/a.yaml".into(),
                    document: 1,
                    name: "acl-check".into()
                },
            }
        );
        let no_host = p.to_plugin_spec_with_env(&|_| None);
        assert_eq!(
            no_host.environment,
            vec![("TRUST_DOMAIN".into(), "cluster.local".into())]
        );
    }

    #[test]
    fn every_other_field() {
        let p = parse_one(
            r#"apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata:
  name: rest
  creationTimestamp: "2024-05-01T10:00:00Z"
  resourceVersion: "42"
  uid: ignored-like-any-other-metadata
  labels: {app: gw}
spec:
  targetRefs:
  - {kind: Gateway, group: gateway.networking.k8s.io, name: gw}
  url: https://example.com/p.wasm
  sha256: 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
  imagePullPolicy: Always
  verificationKey: k
  phase: STATS
  failStrategy: FAIL_RELOAD
  type: NETWORK
  match:
  - mode: SERVER
  - ports: [{number: 8080}]
status: {anything: goes}
"#,
        );
        assert_eq!(
            p.metadata.creation_timestamp.as_deref(),
            Some("2024-05-01T10:00:00Z")
        );
        assert_eq!(p.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(p.metadata.labels["app"], "gw");
        assert_eq!(p.spec.target_refs[0].kind, "Gateway");
        assert_eq!(p.spec.image_pull_policy, PullPolicy::Always);
        assert_eq!(p.spec.phase, PluginPhase::Stats);
        assert_eq!(p.spec.plugin_type, PluginType::Network);
        assert!(!p.spec.plugin_type.is_http());
        assert_eq!(p.spec.traffic_match[0].mode, WorkloadMode::Server);
        assert!(
            p.matches_listener(1, ListenerMode::Server),
            "a selector without ports matches every port"
        );
        assert_eq!(p.plugin_config_json(), "");
        let spec = p.to_plugin_spec_with_env(&|_| None);
        assert_eq!(spec.name, "rest");
        assert_eq!(spec.failure_policy, FailurePolicy::FailReload);
        assert_eq!(
            spec.source,
            CodeSource::Remote {
                uri: "https://example.com/p.wasm".into(),
                sha256: Some(
                    "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into()
                )
            }
        );
        assert_eq!(
            p.creation_time(),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_714_557_600))
        );
    }

    #[test]
    fn url_forms() {
        let source = |url: &str| {
            let mut p = parse_one(&manifest("p", ""));
            p.spec.url = url.to_owned();
            p.code_source()
        };
        let local = |p: &str| CodeSource::Local(PathBuf::from(p));
        assert_eq!(source("file:///abs/p.wasm"), local("/abs/p.wasm"));
        assert_eq!(source("file://rel/p.wasm"), local("plugins.d/rel/p.wasm"));
        assert_eq!(source("/abs/p.wasm"), local("/abs/p.wasm"));
        assert_eq!(source("./p.wasm"), local("plugins.d/./p.wasm"));
        assert_eq!(source("../p.wasm"), local("plugins.d/../p.wasm"));
        assert_eq!(source("p.wasm"), local("plugins.d/p.wasm"));
        let remote = |u: &str| CodeSource::Remote {
            uri: u.into(),
            sha256: None,
        };
        assert_eq!(source("http://h/p.wasm"), remote("http://h/p.wasm"));
        assert_eq!(source("oci://reg/repo:1"), remote("oci://reg/repo:1"));
        assert_eq!(source("reg.io/repo:tag"), remote("oci://reg.io/repo:tag"));
    }

    #[test]
    fn multi_document_files() {
        let text = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc}}\nspec: {{ports: []}}\n---\n{}\n---\n\
             ---\n# only a comment\n---\napiVersion: other.example.com/v1\nkind: WasmPlugin\nmetadata: {{name: x}}\n---\n{}",
            manifest("first", "  pluginConfig: {a: 1}\n"),
            manifest("second", "  pluginConfig: \"not a map\"\n")
        );
        let (plugins, errors) = parse_wasm_plugins(&text, Path::new("plugins.d/a.yaml"));
        assert_eq!(
            errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["plugins.d/a.yaml (document 6): spec.pluginConfig: must be a map"]
        );
        assert_eq!(plugins.len(), 1);
        assert_eq!(plugins[0].metadata.name, "first");
        assert_eq!(plugins[0].document, 2);
        assert_eq!(plugins[0].source_name(), "plugins.d/a.yaml (document 2)");
        assert_eq!(plugins[0].plugin_config_json(), r#"{"a":1}"#);
    }

    #[test]
    fn errors_name_file_document_field_and_reason() {
        let doc2 = |spec: &str| format!("kind: ConfigMap\n---\n{}", manifest("p", spec));
        let cases: &[(&str, &str)] = &[
            (
                "  phse: AUTHN\n",
                "spec.phse: unknown field `phse`, expected one of `selector`, `targetRef`, \
                 `targetRefs`, `url`, `sha256`, `imagePullPolicy`, `imagePullSecret`, \
                 `verificationKey`, `pluginConfig`, `pluginName`, `phase`, `priority`, \
                 `failStrategy`, `vmConfig`, `match`, `type`",
            ),
            (
                "  phase: LATE\n",
                "spec.phase: unknown variant `LATE`, expected one of `UNSPECIFIED_PHASE`, `AUTHN`, \
                 `AUTHZ`, `STATS`",
            ),
            (
                "  priority: high\n",
                "spec.priority: invalid type: string \"high\", expected i32",
            ),
            (
                "  failStrategy: FAIL_CLOSED\n",
                "spec.failStrategy: unknown variant `FAIL_CLOSED`, expected one of `FAIL_CLOSE`, \
                 `FAIL_OPEN`, `FAIL_RELOAD`",
            ),
            (
                "  vmConfig:\n    env:\n    - {nme: A}\n",
                "spec.vmConfig.env[0].nme: unknown field `nme`, expected one of `name`, `value`, \
                 `valueFrom`",
            ),
            (
                "  sha256: ABC\n",
                "spec.sha256: \"ABC\" is not 64 lowercase hexadecimal characters",
            ),
            (
                "  selector: {matchLabels: {a: b}}\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]\n",
                "spec: only one of targetRefs or selector can be set",
            ),
            (
                "  vmConfig:\n    env:\n    - {name: A, value: x, valueFrom: HOST}\n",
                "spec.vmConfig.env[0].value: value may only be set when valueFrom is INLINE",
            ),
            (
                "  vmConfig:\n    env:\n    - {name: A, value: x}\n    - {name: A, value: y}\n",
                "spec.vmConfig.env[1].name: duplicate name \"A\" (also env[0])",
            ),
            (
                "  vmConfig:\n    env:\n    - {name: 1A}\n",
                "spec.vmConfig.env[0].name: \"1A\" is not a valid environment variable name (a C \
                 identifier)",
            ),
            (
                "  pluginName: \"\"\n",
                "spec.pluginName: must be 1 to 256 characters",
            ),
            (
                "  match:\n  - ports: [{number: 0}]\n",
                "spec.match[0].ports[0].number: port 0 is outside 1..=65535",
            ),
        ];
        for (spec, expected) in cases {
            assert_eq!(
                errors_of(&doc2(spec)),
                [format!("plugins.d/a.yaml (document 2): {expected}")],
                "{spec}"
            );
        }
        let bad_url = manifest("p", "").replace("file:///p.wasm", "ftp://h/p.wasm");
        assert_eq!(
            errors_of(&bad_url),
            [
                "plugins.d/a.yaml (document 1): spec.url: unsupported URL scheme \"ftp\" (allowed: \
              file, http, https, oci, or none for OCI; a registry with a port needs oci://)"
            ]
        );
        let no_url = "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: p}\nspec: {phase: AUTHN}\n";
        assert_eq!(
            errors_of(no_url),
            ["plugins.d/a.yaml (document 1): spec.url: required field is missing"]
        );
        let no_name = "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {namespace: ns}\nspec: {url: x.wasm}\n";
        assert_eq!(
            errors_of(no_name),
            ["plugins.d/a.yaml (document 1): metadata.name: required field is missing"]
        );
        let bad_name = manifest("Bad_Name", "");
        assert_eq!(
            errors_of(&bad_name),
            [
                "plugins.d/a.yaml (document 1): metadata.name: \"Bad_Name\" is not a valid name \
              (lowercase letters, digits, '-' and '.', at most 253)"
            ]
        );
        let bad_time =
            manifest("p", "").replace("  name: p\n", "  name: p\n  creationTimestamp: yesterday\n");
        assert_eq!(
            errors_of(&bad_time),
            [
                "plugins.d/a.yaml (document 1): metadata.creationTimestamp: \"yesterday\" is not an \
              RFC 3339 time such as 2024-05-01T10:00:00Z"
            ]
        );
        let other_version = manifest("p", "").replace("v1alpha1", "v1beta9");
        assert_eq!(
            errors_of(&other_version),
            [
                "plugins.d/a.yaml (document 1): apiVersion: unsupported apiVersion \
              \"extensions.istio.io/v1beta9\" (supported: extensions.istio.io/v1alpha1)"
            ]
        );
        let top_level = format!("{}extra: 1\n", manifest("p", ""));
        assert_eq!(
            errors_of(&top_level),
            [
                "plugins.d/a.yaml (document 1): extra: unknown field `extra`, expected one of \
              `apiVersion`, `kind`, `metadata`, `spec`, `status`"
            ]
        );
        let syntax = format!("{}---\nkind: [\n", manifest("p", ""));
        let errs = errors_of(&syntax);
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].starts_with("plugins.d/a.yaml (document 2): ") && errs[0].contains("line"),
            "{errs:?}"
        );
    }

    /// Every rule of Istio's CRD schema and validating webhook, one bad manifest each (the cases
    /// of istio/istio `pkg/config/validation/testdata/crds/wasm-invalid.yaml` among them), each
    /// rejected with its field and reason.
    #[test]
    fn istio_crd_and_webhook_rules() {
        let with_url = |url: &str| manifest("p", "").replace("file:///p.wasm", url);
        let at =
            |field: &str, reason: &str| format!("plugins.d/a.yaml (document 1): {field}: {reason}");
        let hex64 = "0123456789abcdef".repeat(4);
        let refs17 = format!(
            "  targetRefs:\n{}",
            "  - {kind: Gateway, group: gateway.networking.k8s.io, name: g}\n".repeat(17)
        );
        let env257 = format!(
            "  vmConfig:\n    env:\n{}",
            (0..257)
                .map(|i| format!("    - {{name: V{i}}}\n"))
                .collect::<String>()
        );
        let long_value = format!(
            "  vmConfig:\n    env:\n    - {{name: V, value: {}}}\n",
            "x".repeat(2049)
        );
        let cases: Vec<(String, Vec<String>)> = vec![
            // url
            (with_url("\"\""), vec![at("spec.url", "must not be empty")]),
            (
                with_url("\"#%blah$#@\""),
                vec![at("spec.url", "invalid URL escape \"%bl\"")],
            ),
            (
                with_url("fake://example.com"),
                vec![at(
                    "spec.url",
                    "unsupported URL scheme \"fake\" (allowed: file, http, https, oci, or none for \
                     OCI; a registry with a port needs oci://)",
                )],
            ),
            (
                with_url("private-registry:5000/openid:latest"),
                vec![at(
                    "spec.url",
                    "unsupported URL scheme \"private-registry\" (allowed: file, http, https, oci, \
                     or none for OCI; a registry with a port needs oci://)",
                )],
            ),
            (
                with_url("\":x\""),
                vec![at("spec.url", "missing protocol scheme")],
            ),
            (
                with_url("\"oci://a\\tb\""),
                vec![at("spec.url", "invalid control character in URL")],
            ),
            (
                with_url("\"http://a b\""),
                vec![at("spec.url", "a URL has no spaces")],
            ),
            (
                with_url("~"),
                vec![at(
                    "spec.url",
                    "invalid type: unit value, expected a string",
                )],
            ),
            // sha256, imagePullSecret, pluginName
            (
                manifest("p", "  sha256: foo\n"),
                vec![at("spec.sha256", "\"foo\" is not 64 lowercase hexadecimal characters")],
            ),
            (
                manifest("p", &format!("  sha256: {}\n", hex64.to_uppercase())),
                vec![at(
                    "spec.sha256",
                    &format!("{:?} is not 64 lowercase hexadecimal characters", hex64.to_uppercase()),
                )],
            ),
            (
                manifest("p", "  imagePullSecret: \"\"\n"),
                vec![at("spec.imagePullSecret", "must be 1 to 253 characters")],
            ),
            (
                manifest("p", &format!("  imagePullSecret: {}\n", "s".repeat(254))),
                vec![at("spec.imagePullSecret", "must be 1 to 253 characters")],
            ),
            (
                manifest("p", &format!("  pluginName: {}\n", "n".repeat(257))),
                vec![at("spec.pluginName", "must be 1 to 256 characters")],
            ),
            // selector / targetRefs
            (
                manifest("p", "  selector: {matchLabels: {istio: \"bar*\"}}\n"),
                vec![at(
                    "spec.selector.matchLabels.istio",
                    "wildcard not allowed in label value match",
                )],
            ),
            (
                manifest("p", "  selector: {matchLabels: {\"istio*\": bar}}\n"),
                vec![at(
                    "spec.selector.matchLabels.istio*",
                    "wildcard not allowed in label key match",
                )],
            ),
            (
                manifest("p", "  selector: {matchLabels: {\"\": bar}}\n"),
                vec![at("spec.selector.matchLabels", "key must not be empty")],
            ),
            (
                manifest("p", &format!("  selector: {{matchLabels: {{a: {}}}}}\n", "v".repeat(64))),
                vec![at(
                    "spec.selector.matchLabels.a",
                    "a label value has at most 63 characters",
                )],
            ),
            (
                manifest(
                    "p",
                    "  selector: {}\n  targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: g}\n",
                ),
                vec![at("spec", "only one of targetRefs or selector can be set")],
            ),
            (
                manifest(
                    "p",
                    "  targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: g}\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: g}]\n",
                ),
                vec![at("spec", "only one of targetRefs or selector can be set")],
            ),
            (
                manifest("p", &refs17),
                vec![at("spec.targetRefs", "at most 16 entries (17 given)")],
            ),
            (
                manifest(
                    "p",
                    "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: g, namespace: other}]\n",
                ),
                vec![at(
                    "spec.targetRefs[0].namespace",
                    "cross namespace referencing is not currently supported",
                )],
            ),
            (
                manifest("p", "  targetRefs: [{kind: Deployment, group: apps, name: d}]\n"),
                vec![at(
                    "spec.targetRefs[0]",
                    "targetRef must be to one of core/Service, networking.istio.io/ServiceEntry, \
                     gateway.networking.k8s.io/Gateway, gateway.networking.k8s.io/GatewayClass but \
                     was apps/Deployment",
                )],
            ),
            (
                manifest("p", "  targetRef: {kind: \"9Gateway\", group: Bad_Group, name: \"\"}\n"),
                vec![
                    at(
                        "spec.targetRef.kind",
                        "\"9Gateway\" is not a kind (1 to 63 letters, digits and '-', starting with a \
                         letter)",
                    ),
                    at("spec.targetRef.name", "must be 1 to 253 characters"),
                    at("spec.targetRef.group", "\"Bad_Group\" is not a valid API group"),
                    at(
                        "spec.targetRef",
                        "targetRef must be to one of core/Service, networking.istio.io/ServiceEntry, \
                         gateway.networking.k8s.io/Gateway, gateway.networking.k8s.io/GatewayClass \
                         but was Bad_Group/9Gateway",
                    ),
                ],
            ),
            (
                manifest("p", "  targetRefs: [{name: g}]\n"),
                vec![at(
                    "spec.targetRefs[0].kind",
                    "required field is missing",
                )],
            ),
            // vmConfig.env
            (
                manifest("p", "  vmConfig:\n    env:\n    - name: \"\"\n"),
                vec![at("spec.vmConfig.env[0].name", "must be 1 to 256 characters")],
            ),
            (
                manifest("p", "  vmConfig:\n    env:\n    - name: a\n    - name: a\n"),
                vec![at("spec.vmConfig.env[1].name", "duplicate name \"a\" (also env[0])")],
            ),
            (
                manifest(
                    "p",
                    "  vmConfig:\n    env:\n    - name: test\n      valueFrom: HOST\n      value: \"\"\n",
                ),
                vec![at(
                    "spec.vmConfig.env[0].value",
                    "value may only be set when valueFrom is INLINE",
                )],
            ),
            (
                manifest("p", "  vmConfig:\n    env:\n    - {name: A-B}\n"),
                vec![at(
                    "spec.vmConfig.env[0].name",
                    "\"A-B\" is not a valid environment variable name (a C identifier)",
                )],
            ),
            (
                manifest("p", "  vmConfig:\n    env:\n    - {name: A, valueFrom: ENV}\n"),
                vec![at(
                    "spec.vmConfig.env[0].valueFrom",
                    "unknown variant `ENV`, expected `INLINE` or `HOST`",
                )],
            ),
            (
                manifest("p", &env257),
                vec![at("spec.vmConfig.env", "at most 256 entries (257 given)")],
            ),
            (
                manifest("p", &long_value),
                vec![at("spec.vmConfig.env[0].value", "at most 2048 characters")],
            ),
            // match
            (
                manifest("p", "  match:\n    - ports:\n      - {}\n"),
                vec![at(
                    "spec.match[0].ports[0].number",
                    "required field is missing",
                )],
            ),
            (
                manifest("p", "  match:\n  - ports: [{number: 80}, {number: 80}]\n"),
                vec![at(
                    "spec.match[0].ports[1].number",
                    "duplicate port 80 (also ports[0])",
                )],
            ),
            (
                manifest("p", "  match:\n  - ports: [{number: 65536}]\n"),
                vec![at(
                    "spec.match[0].ports[0].number",
                    "port 65536 is outside 1..=65535",
                )],
            ),
            (
                manifest("p", "  match:\n  - mode: INBOUND\n"),
                vec![at(
                    "spec.match[0].mode",
                    "unknown variant `INBOUND`, expected one of `UNDEFINED`, `CLIENT`, `SERVER`, \
                     `CLIENT_AND_SERVER`",
                )],
            ),
            // enums and numbers
            (
                manifest("p", "  priority: 2147483648\n"),
                vec![at(
                    "spec.priority",
                    "invalid value: integer `2147483648`, expected i32",
                )],
            ),
            (
                manifest("p", "  imagePullPolicy: Never\n"),
                vec![at(
                    "spec.imagePullPolicy",
                    "unknown variant `Never`, expected one of `UNSPECIFIED_POLICY`, \
                     `IfNotPresent`, `Always`",
                )],
            ),
            (
                manifest("p", "  type: TCP\n"),
                vec![at(
                    "spec.type",
                    "unknown variant `TCP`, expected one of `UNSPECIFIED_PLUGIN_TYPE`, `HTTP`, \
                     `NETWORK`",
                )],
            ),
            (
                manifest("p", "  pluginConfig: [1]\n"),
                vec![at("spec.pluginConfig", "must be a map")],
            ),
            // spec
            (
                "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: p}\nspec:\n"
                    .to_owned(),
                // Istio: "spec in body must be of type object: null"; an empty spec lacks url.
                vec![at("spec.url", "required field is missing")],
            ),
            (
                "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: p}\n"
                    .to_owned(),
                vec![at("spec", "required field is missing")],
            ),
            (
                manifest("p", "").replace("  name: p\n", "  name: p\n  namespace: a.b\n"),
                vec![at("metadata.namespace", "\"a.b\" is not a valid namespace")],
            ),
        ];
        for (text, expected) in &cases {
            assert_eq!(&errors_of(text), expected, "{text}");
        }
        // What Istio accepts (wasm-valid.yaml's cases among them): URL forms, a full env list.
        for url in [
            "test",
            "http://test",
            "ghcr.io/istio-ecosystem/wasm-extensions/basic_auth:1.12.0",
            "oci://private-registry:5000/openid-connect/openid:latest",
            "docker.io/org/plugin@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "HTTPS://example.com/p.wasm",
            "file:///opt/filters/openid.wasm",
            "/opt/p.wasm",
            "./p.wasm",
            "https://example.com/a%20b.wasm",
        ] {
            assert_eq!(errors_of(&with_url(url)), Vec::<String>::new(), "{url}");
        }
        let env = manifest(
            "env",
            "  vmConfig:\n    env:\n      - name: \"test\"\n        valueFrom: HOST\n      - name: \"test2\"\n        valueFrom: INLINE\n        value: \"test\"\n      - name: \"test3\"\n        value: \"test\"\n",
        );
        let p = parse_one(&env);
        let env = &p.spec.vm_config.as_ref().unwrap().env;
        assert_eq!(env[0].value, None);
        assert_eq!(env[2].value.as_deref(), Some("test"));
        assert_eq!(
            parse_one(&manifest("p", "  priority: -2147483648\n"))
                .spec
                .priority,
            Some(i32::MIN)
        );
    }

    #[test]
    fn kinds_and_api_versions_in_a_manifest_file() {
        let text = format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: pull}}\ntype: kubernetes.io/dockerconfigjson\n---\n\
             apiVersion: extensions.higress.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: h}}\nspec: {{url: oci://x}}\n---\n\
             kind: WasmPlugin\nmetadata: {{name: q}}\nspec: {{url: oci://x}}\n---\n\
             apiVersion: extensions.istio.io/v1alpha1\nmetadata: {{name: r}}\nspec: {{url: oci://x}}\n---\n\
             apiVersion: extensions.istio.io/v1alpha1\nkind: TrafficExtension\nmetadata: {{name: t}}\nspec: {{}}\n---\n\
             [a, list]\n---\n\
             listeners: []\n---\n\
             # only a comment\n---\n{}",
            manifest("good", "")
        );
        let scan = scan_wasm_plugins(&text, Path::new("m.yaml"));
        assert_eq!(
            scan.errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            [
                "m.yaml (document 3): apiVersion: required field is missing (a WasmPlugin is \
                 extensions.istio.io/v1alpha1)",
                "m.yaml (document 4): kind: required field is missing (WasmPlugin)",
            ]
        );
        assert_eq!(
            scan.skipped
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            [
                "m.yaml (document 1): skipped: kind Secret (v1) is not a WasmPlugin",
                "m.yaml (document 2): skipped: a WasmPlugin of \"extensions.higress.io/v1alpha1\", \
                 not Istio's [\"extensions.istio.io/v1alpha1\"]",
                "m.yaml (document 5): skipped: kind TrafficExtension \
                 (extensions.istio.io/v1alpha1) is not a WasmPlugin",
                "m.yaml (document 6): skipped: not a Kubernetes object (not a map)",
                "m.yaml (document 7): skipped: no kind: not a Kubernetes object",
            ]
        );
        assert_eq!(scan.plugins.len(), 1);
        assert_eq!(scan.plugins[0].document, 9);
        assert!(is_kubernetes_manifest(&text));
        assert!(!is_kubernetes_manifest("listeners: []\nworkers: 1\n"));
        assert!(!is_kubernetes_manifest(""));
    }

    #[test]
    fn loads_a_folder_in_file_order() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(d.join("b.yml"), manifest("from-b", "")).unwrap();
        fs::write(
            d.join("a.yaml"),
            format!(
                "{}---\n{}",
                manifest("from-a1", ""),
                manifest("from-a2", "")
            ),
        )
        .unwrap();
        fs::write(d.join("notes.txt"), "not yaml: [").unwrap();
        fs::create_dir(d.join("sub.yaml")).unwrap();
        let plugins = load_wasm_plugins(d).unwrap();
        let names: Vec<_> = plugins.iter().map(|p| p.metadata.name.as_str()).collect();
        assert_eq!(names, ["from-a1", "from-a2", "from-b"]);
        assert_eq!(plugins[1].file, d.join("a.yaml"));
        assert_eq!(plugins[1].document, 2);

        fs::write(d.join("c.yaml"), manifest("from-b", "")).unwrap();
        fs::write(d.join("d.yaml"), manifest("broken", "  phase: NOPE\n")).unwrap();
        let err = load_wasm_plugins(d).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{} (document 1): metadata.name: duplicate WasmPlugin \"from-b\" (also in {} \
                 (document 1))",
                d.join("c.yaml").display(),
                d.join("b.yml").display()
            )
        );
        let (plugins, errors) = load_wasm_plugins_lenient(d);
        assert_eq!(plugins.len(), 3, "the good manifests are kept");
        assert_eq!(errors.len(), 2);
        assert_eq!(
            errors[1].source,
            format!("{} (document 1)", d.join("d.yaml").display())
        );
        assert_eq!(errors[1].field, "spec.phase");

        let missing = load_wasm_plugins(d.join("nope")).unwrap_err();
        assert!(
            missing.reason.starts_with("cannot read the plugins folder"),
            "{missing}"
        );
    }

    fn plugin(
        name: &str,
        phase: PluginPhase,
        priority: Option<i32>,
        created: Option<&str>,
    ) -> WasmPluginSpec {
        WasmPluginSpec {
            file: PathBuf::from("p.yaml"),
            document: 1,
            api_version: WASM_PLUGIN_API_VERSIONS[0].to_owned(),
            metadata: ObjectMeta {
                name: name.to_owned(),
                creation_timestamp: created.map(str::to_owned),
                ..Default::default()
            },
            spec: WasmPlugin {
                url: format!("file:///{name}.wasm"),
                phase,
                priority,
                ..Default::default()
            },
        }
    }

    #[test]
    fn istio_ordering() {
        use PluginPhase::*;
        let mut plugins = vec![
            plugin("u-none", UnspecifiedPhase, None, None),
            plugin("stats-1", Stats, Some(1), None),
            plugin("authz-low", Authz, Some(-5), None),
            plugin("authn-none", Authn, None, None),
            plugin("authz-min", Authz, Some(i32::MIN), None),
            plugin("authz-high", Authz, Some(100), None),
            plugin(
                "authn-10-late",
                Authn,
                Some(10),
                Some("2024-01-02T00:00:00Z"),
            ),
            plugin(
                "authn-10-early",
                Authn,
                Some(10),
                Some("2024-01-01T23:00:00-02:00"),
            ),
            plugin("authn-10-b", Authn, Some(10), Some("2024-01-01T00:00:00Z")),
            plugin("authn-10-a", Authn, Some(10), Some("2024-01-01T00:00:00Z")),
            plugin("authn-10-untimed", Authn, Some(10), None),
            plugin("u-5", UnspecifiedPhase, Some(5), None),
            plugin("authz-none", Authz, None, None),
        ];
        order_plugins(&mut plugins);
        let names: Vec<_> = plugins.iter().map(|p| p.metadata.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "authn-10-untimed", // unset creation time counts as the earliest (Go's zero time)
                "authn-10-a",       // same time: by name
                "authn-10-b",
                "authn-10-late",  // 2024-01-02T00:00Z
                "authn-10-early", // 2024-01-02T01:00Z, later once the offset is applied
                "authn-none",
                "authz-high",
                "authz-low",
                "authz-min",
                "authz-none", // unset counts as i32::MIN: a tie with authz-min, broken by name
                "stats-1",
                "u-5",
                "u-none",
            ]
        );
        // Ties in everything keep their input order; namespaces break name ties.
        let mut a = plugin("same", Authn, None, None);
        a.metadata.namespace = Some("ns-b".into());
        a.document = 1;
        let mut b = a.clone();
        b.metadata.namespace = Some("ns-a".into());
        let mut c = a.clone();
        c.document = 2;
        let mut refs = vec![&a, &c, &b];
        order_plugins(&mut refs);
        assert_eq!(
            refs.iter()
                .map(|p| (p.metadata.namespace.as_deref().unwrap(), p.document))
                .collect::<Vec<_>>(),
            [("ns-a", 1), ("ns-b", 1), ("ns-b", 2)]
        );
    }

    #[test]
    fn chain_order_around_the_listeners_own_filters() {
        use PluginPhase::*;
        let config = crate::GatewayConfig::from_yaml_str(
            "listeners:\n  - name: main\n    address: 127.0.0.1:8080\n    http_filters:\n      - name: own-1\n        vm_config: { code: { local: { filename: /o1.wasm } } }\n      - name: own-2\n        vm_config: { code: { local: { filename: /o2.wasm } } }\n",
            "gw.yaml",
        )
        .unwrap();
        let mut network = plugin("network", Authn, None, None);
        network.spec.plugin_type = PluginType::Network;
        let mut other_port = plugin("other-port", Authn, None, None);
        other_port.spec.traffic_match = vec![TrafficSelector {
            mode: WorkloadMode::Client,
            ports: vec![PortSelector { number: 443 }],
        }];
        let mut this_port = plugin("this-port", Stats, None, None);
        this_port.spec.traffic_match = vec![TrafficSelector {
            mode: WorkloadMode::Undefined,
            ports: vec![PortSelector { number: 8080 }],
        }];
        let wasm_plugins = vec![
            plugin("last", UnspecifiedPhase, Some(1), None),
            plugin("authz", Authz, None, None),
            network,
            other_port,
            this_port,
            plugin("authn", Authn, Some(1), None),
            plugin("after-last", UnspecifiedPhase, None, None),
        ];
        let chain = config.chain_for_listener(0, &wasm_plugins);
        let names: Vec<_> = chain.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "authn",
                "authz",
                "this-port",
                "own-1",
                "own-2",
                "last",
                "after-last"
            ]
        );
        assert_eq!(
            chain[3].origin,
            PluginOrigin::EnvoyFilter {
                listener: "main".into(),
                index: 0
            }
        );
        assert_eq!(chain[0].source, CodeSource::Local("/authn.wasm".into()));
    }

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some((0, 0)));
        assert_eq!(
            parse_rfc3339("2000-03-01T00:00:00Z"),
            Some((951_868_800, 0))
        );
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59Z"), Some((-1, 0)));
        assert_eq!(
            parse_rfc3339("2024-05-01T12:00:00.25+02:00"),
            Some((1_714_557_600, 250_000_000))
        );
        assert_eq!(
            parse_rfc3339("2024-02-29T00:00:00Z").map(|t| t.0),
            Some(1_709_164_800)
        );
        for bad in [
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-01-01T00:00:00",
            "2024-01-01T00:00:00.Z",
            "2024-01-01",
            "yesterday",
            "2024-01-01T24:00:00Z",
            "2024-01-01T00:00:00+0100",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
