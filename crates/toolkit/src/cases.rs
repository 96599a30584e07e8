//! `wasmgate plugin test`: declared requests and responses run through a real module, and what the
//! plugin did checked against what the cases file expects.
//!
//! A cases file is YAML:
//!
//! ```yaml
//! plugin:                                  # how the plugin is started (all optional)
//!   configuration: { header: x-hello }     # a string is passed as is, anything else as JSON
//!   root_id: ""
//!   env: { TOKEN: abc }
//! cases:
//!   - name: adds the header
//!     request: { method: GET, path: /, headers: { x-a: b }, body: "..." }
//!     upstream: { status: 200, headers: { content-type: text/plain }, body: "hi" }
//!     http_calls:                          # answers to the plugin's proxy_http_call, in order
//!       - { cluster: auth, path: /check, response: { status: 200 } }
//!     expect:
//!       response: { status: 200, headers: { x-hello: world }, body: "hi" }
//! ```
//!
//! Cases run in order against one VM, as requests reach one worker, so state a plugin keeps (a
//! counter, a rate limiter's bucket) carries from case to case. A case with its own
//! `configuration` starts a fresh VM with it; a trap also ends the VM, and the next case gets a
//! fresh one.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::rc::Rc;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::{self, Deserializer};
use thiserror::Error;
use wasmgate_abi::{HeaderMap, HttpCallRequest, LogLevel};
use wasmgate_runtime::{CallOutcome, CompiledModule, PluginConfig, Runtime, VmConfig};

use crate::harness::{Exchange, Harness, HarnessError, Message, RecordingHost};

/// A cases file that could not be read: the field path says where.
#[derive(Debug, Error)]
pub enum CasesError {
    #[error("{origin}: {reason}")]
    Yaml { origin: String, reason: String },
    #[error("{origin}: {path}: {reason}")]
    Invalid {
        origin: String,
        path: String,
        reason: String,
    },
}

/// The whole cases file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CasesFile {
    #[serde(default)]
    pub plugin: PluginSetup,
    pub cases: Vec<Case>,
}

/// How the plugin is started: the fields of an Envoy filter entry, flattened.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSetup {
    #[serde(default)]
    pub configuration: Option<serde_yaml::Value>,
    #[serde(default)]
    pub vm_configuration: Option<serde_yaml::Value>,
    #[serde(default)]
    pub root_id: String,
    #[serde(default)]
    pub vm_id: Option<String>,
    /// Environment variables the plugin sees (`vmConfig.env`); the host's own are never passed.
    #[serde(default)]
    pub env: BTreeMap<String, Scalar>,
    /// Clusters `proxy_http_call` may name besides those the cases' fixtures name (a call to any
    /// other is BAD_ARGUMENT, as in Envoy).
    #[serde(default)]
    pub clusters: Vec<String>,
    /// The plugin's log level: lines below it are neither recorded nor checkable.
    #[serde(default)]
    pub log_level: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    /// Starts a fresh VM with this plugin configuration for this case.
    #[serde(default)]
    pub configuration: Option<serde_yaml::Value>,
    /// `proxy_on_tick` calls on the root context before the request.
    #[serde(default)]
    pub ticks: u32,
    #[serde(default)]
    pub request: RequestSpec,
    /// The upstream's answer to whatever the plugin lets through.
    #[serde(default)]
    pub upstream: ResponseSpec,
    /// Answers to the plugin's `proxy_http_call`s, matched in order by cluster, method and path.
    #[serde(default)]
    pub http_calls: Vec<CallFixtureSpec>,
    #[serde(default)]
    pub expect: Expect,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestSpec {
    #[serde(default = "default_method")]
    pub method: String,
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default = "default_authority")]
    pub authority: String,
    #[serde(default = "default_scheme")]
    pub scheme: String,
    #[serde(default)]
    pub headers: Headers,
    #[serde(default)]
    pub body: Option<String>,
    /// The body as separate chunks, each delivered to its own body callback.
    #[serde(default)]
    pub body_chunks: Vec<String>,
    #[serde(default)]
    pub trailers: Option<Headers>,
}

impl Default for RequestSpec {
    fn default() -> Self {
        Self {
            method: default_method(),
            path: default_path(),
            authority: default_authority(),
            scheme: default_scheme(),
            headers: Headers::default(),
            body: None,
            body_chunks: Vec::new(),
            trailers: None,
        }
    }
}

fn default_method() -> String {
    "GET".into()
}
fn default_path() -> String {
    "/".into()
}
fn default_authority() -> String {
    "example.com".into()
}
fn default_scheme() -> String {
    "http".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseSpec {
    #[serde(default = "default_status")]
    pub status: u16,
    #[serde(default)]
    pub headers: Headers,
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub body_chunks: Vec<String>,
    #[serde(default)]
    pub trailers: Option<Headers>,
}

impl Default for ResponseSpec {
    fn default() -> Self {
        Self {
            status: default_status(),
            headers: Headers::default(),
            body: None,
            body_chunks: Vec::new(),
            trailers: None,
        }
    }
}

fn default_status() -> u16 {
    200
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallFixtureSpec {
    /// Matches calls to this cluster (any cluster when absent).
    #[serde(default)]
    pub cluster: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
    /// Matches the call's `:path` exactly.
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub response: Option<ResponseSpec>,
    /// Answers as a failed call (reset or timeout): no headers, `proxy_get_status` is
    /// BROKEN_CONNECTION.
    #[serde(default)]
    pub failure: bool,
}

/// What the case checks. Every field is optional; only what is given is checked.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// The request as the upstream received it.
    #[serde(default)]
    pub upstream_request: Option<ExpectMessage>,
    /// Whether the request reached the upstream at all.
    #[serde(default)]
    pub reaches_upstream: Option<bool>,
    /// The response as the client received it.
    #[serde(default)]
    pub response: Option<ExpectMessage>,
    /// Whether the plugin answered with `proxy_send_local_response`.
    #[serde(default)]
    pub local_reply: Option<bool>,
    /// Whether the stream stalled: paused and never resumed.
    #[serde(default)]
    pub stalled: Option<bool>,
    /// The `http_call`s the plugin made, in order; each given field must match.
    #[serde(default)]
    pub http_calls: Option<Vec<ExpectCall>>,
    /// Log lines the plugin wrote during the case: a substring, or `{ level, contains }`.
    #[serde(default)]
    pub logs: Vec<ExpectLog>,
    /// Substrings no log line of the case may contain.
    #[serde(default)]
    pub logs_absent: Vec<String>,
    /// Plugin-defined metrics by name, and their value after the case.
    #[serde(default)]
    pub metrics: BTreeMap<String, i64>,
    /// The plugin refuses the case's configuration (`on_configure` answers false, or the VM does
    /// not start): no request is sent; `logs` is checked against what it logged.
    #[serde(default)]
    pub configuration_rejected: Option<bool>,
    /// The case traps (the plugin crashes); a string must appear in the error or the log.
    #[serde(default)]
    pub trap: Option<TrapExpectation>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectMessage {
    /// The response status (responses only).
    #[serde(default)]
    pub status: Option<u16>,
    /// Each header must be present with this value (among its values).
    #[serde(default)]
    pub headers: Headers,
    #[serde(default)]
    pub headers_absent: Vec<String>,
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub body_contains: Vec<String>,
    #[serde(default)]
    pub trailers: Headers,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectCall {
    #[serde(default)]
    pub cluster: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub headers: Headers,
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub timeout_ms: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct ExpectLog {
    pub level: Option<LogLevel>,
    pub contains: String,
}

impl<'de> Deserialize<'de> for ExpectLog {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            #[serde(default)]
            level: Option<String>,
            contains: String,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Text(String),
            Full(Full),
        }
        match Form::deserialize(deserializer).map_err(|_| {
            de::Error::custom("expected a substring, or { level: LEVEL, contains: TEXT }")
        })? {
            Form::Text(contains) => Ok(Self {
                level: None,
                contains,
            }),
            Form::Full(full) => {
                let level = match full.level {
                    Some(name) => Some(LogLevel::parse(&name).ok_or_else(|| {
                        de::Error::custom(format!(
                            "unknown log level {name:?} (trace, debug, info, warn, error, critical)"
                        ))
                    })?),
                    None => None,
                };
                Ok(Self {
                    level,
                    contains: full.contains,
                })
            }
        }
    }
}

/// `trap: true`, or `trap: "text the error must contain"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TrapExpectation {
    Expected(bool),
    Containing(String),
}

/// A YAML scalar read as text: `x-count: 5` and `x-flag: true` are header values too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scalar(pub String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match serde_yaml::Value::deserialize(deserializer)? {
            serde_yaml::Value::String(s) => Ok(Scalar(s)),
            serde_yaml::Value::Number(n) => Ok(Scalar(n.to_string())),
            serde_yaml::Value::Bool(b) => Ok(Scalar(b.to_string())),
            serde_yaml::Value::Null => Ok(Scalar(String::new())),
            _ => Err(de::Error::custom("expected a string, number or boolean")),
        }
    }
}

/// Headers as a map (`name: value`, or `name: [v1, v2]` for a repeated header), or a list of
/// `"name: value"` strings. Names are lower-cased, as HTTP/2 and Envoy have them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, String)>);

impl<'de> Deserialize<'de> for Headers {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Values {
            One(Scalar),
            Many(Vec<Scalar>),
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Map(serde_yaml::Mapping),
            List(Vec<String>),
        }
        let form = Form::deserialize(deserializer).map_err(|_| {
            de::Error::custom(
                "expected a map of header names to values, or a list of \"name: value\"",
            )
        })?;
        let mut pairs = Vec::new();
        match form {
            Form::Map(map) => {
                for (name, value) in map {
                    let name = Scalar::deserialize(name)
                        .map_err(|e| de::Error::custom(format!("header name: {e}")))?;
                    let name = name.0.to_ascii_lowercase();
                    match Values::deserialize(value)
                        .map_err(|e| de::Error::custom(format!("header {name}: {e}")))?
                    {
                        Values::One(v) => pairs.push((name, v.0)),
                        Values::Many(vs) => {
                            pairs.extend(vs.into_iter().map(|v| (name.clone(), v.0)))
                        }
                    }
                }
            }
            Form::List(lines) => {
                for line in lines {
                    let (name, value) = line.split_once(':').ok_or_else(|| {
                        de::Error::custom(format!("header {line:?} is not \"name: value\""))
                    })?;
                    pairs.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
                }
            }
        }
        Ok(Headers(pairs))
    }
}

impl CasesFile {
    /// Reads a cases file; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, CasesError> {
        let invalid = |path: String, reason: String| CasesError::Invalid {
            origin: origin.to_owned(),
            path,
            reason,
        };
        // serde_yaml's messages already carry the field path and the line.
        let file: CasesFile = serde_yaml::from_str(text).map_err(|e| CasesError::Yaml {
            origin: origin.to_owned(),
            reason: e.to_string(),
        })?;
        if file.cases.is_empty() {
            return Err(invalid("cases".into(), "there are no cases".into()));
        }
        for (index, case) in file.cases.iter().enumerate() {
            if case.request.body.is_some() && !case.request.body_chunks.is_empty() {
                return Err(invalid(
                    format!("cases[{index}].request"),
                    "give body or body_chunks, not both".into(),
                ));
            }
            if case.upstream.body.is_some() && !case.upstream.body_chunks.is_empty() {
                return Err(invalid(
                    format!("cases[{index}].upstream"),
                    "give body or body_chunks, not both".into(),
                ));
            }
            for (call, fixture) in case.http_calls.iter().enumerate() {
                if fixture.failure == fixture.response.is_some() {
                    return Err(invalid(
                        format!("cases[{index}].http_calls[{call}]"),
                        "give exactly one of response or failure: true".into(),
                    ));
                }
            }
        }
        if let Some(level) = &file.plugin.log_level
            && LogLevel::parse(level).is_none()
        {
            return Err(invalid(
                "plugin.log_level".into(),
                format!("unknown log level {level:?} (trace, debug, info, warn, error, critical)"),
            ));
        }
        Ok(file)
    }
}

/// The bytes a configuration value stands for: a string as is, anything else as JSON, as the
/// gateway passes an Envoy filter's `configuration`.
pub fn configuration_bytes(value: &serde_yaml::Value) -> Vec<u8> {
    match value {
        serde_yaml::Value::String(s) => s.clone().into_bytes(),
        serde_yaml::Value::Null => Vec::new(),
        other => serde_json::to_vec(other).unwrap_or_default(),
    }
}

/// One expectation that did not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Where, as a path into the case: `response.status`, `response.headers.x-user`.
    pub what: String,
    pub expected: String,
    pub actual: String,
}

#[derive(Debug, Clone)]
pub struct CaseResult {
    pub name: String,
    pub mismatches: Vec<Mismatch>,
    /// The plugin's log lines during the case, shown when it fails.
    pub logs: Vec<String>,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        self.mismatches.is_empty()
    }
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub cases: Vec<CaseResult>,
}

impl Report {
    pub fn failed(&self) -> usize {
        self.cases.iter().filter(|c| !c.passed()).count()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, case) in self.cases.iter().enumerate() {
            let number = index + 1;
            if case.passed() {
                writeln!(f, "ok   {number} {}", case.name)?;
                continue;
            }
            writeln!(f, "FAIL {number} {}", case.name)?;
            for mismatch in &case.mismatches {
                write_mismatch(f, mismatch)?;
            }
            if !case.logs.is_empty() {
                writeln!(f, "     plugin logs:")?;
                for line in &case.logs {
                    writeln!(f, "       {}", line.replace('\n', "\n         "))?;
                }
            }
        }
        let failed = self.failed();
        writeln!(
            f,
            "{} cases: {} passed, {failed} failed",
            self.cases.len(),
            self.cases.len() - failed
        )
    }
}

fn write_mismatch(f: &mut fmt::Formatter<'_>, mismatch: &Mismatch) -> fmt::Result {
    let multiline = mismatch.expected.contains('\n') || mismatch.actual.contains('\n');
    if !multiline {
        return writeln!(
            f,
            "     {}: expected {}, got {}",
            mismatch.what, mismatch.expected, mismatch.actual
        );
    }
    writeln!(f, "     {}: (- expected, + got)", mismatch.what)?;
    for line in line_diff(&mismatch.expected, &mismatch.actual) {
        writeln!(f, "       {line}")?;
    }
    Ok(())
}

/// A line diff by longest common subsequence: bodies in cases are small.
fn line_diff(expected: &str, actual: &str) -> Vec<String> {
    let a: Vec<&str> = expected.lines().collect();
    let b: Vec<&str> = actual.lines().collect();
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push(format!("  {}", a[i]));
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push(format!("+ {}", b[j]));
            j += 1;
        } else {
            out.push(format!("- {}", a[i]));
            i += 1;
        }
    }
    out
}

/// What to run: the module, and overrides from the command line.
pub struct RunOptions {
    /// Replaces `plugin.configuration` (the CLI's `--config`).
    pub configuration: Option<Vec<u8>>,
    /// Only cases whose name contains this.
    pub filter: Option<String>,
    /// A name for the plugin in logs.
    pub plugin_name: String,
}

/// Runs every case of `file` against `module` and reports what held and what did not. An error
/// is returned only when the plugin cannot start at all (a bad module, a rejected configuration
/// outside any case).
pub fn run(
    runtime: &Arc<Runtime>,
    module: &Arc<CompiledModule>,
    file: &CasesFile,
    options: &RunOptions,
) -> Result<Report, HarnessError> {
    let base_configuration = options.configuration.clone().unwrap_or_else(|| {
        file.plugin
            .configuration
            .as_ref()
            .map(configuration_bytes)
            .unwrap_or_default()
    });
    let mut clusters = file.plugin.clusters.clone();
    for case in &file.cases {
        for fixture in &case.http_calls {
            if let Some(cluster) = &fixture.cluster
                && !clusters.contains(cluster)
            {
                clusters.push(cluster.clone());
            }
        }
    }
    let fixtures: Rc<RefCell<Fixtures>> = Rc::default();
    let start = |configuration: &[u8]| -> Result<Harness, StartFailure> {
        let vm_config = VmConfig {
            vm_id: file
                .plugin
                .vm_id
                .clone()
                .unwrap_or_else(|| options.plugin_name.clone()),
            configuration: file
                .plugin
                .vm_configuration
                .as_ref()
                .map(configuration_bytes)
                .unwrap_or_default(),
            environment: file
                .plugin
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.0.clone()))
                .collect(),
            capabilities: None,
        };
        let plugin = PluginConfig {
            name: options.plugin_name.clone(),
            root_id: file.plugin.root_id.clone(),
            configuration: configuration.to_vec(),
        };
        let host = RecordingHost::new(clusters.clone());
        let recorded = host.recorded.clone();
        match Harness::new(runtime.clone(), module, vm_config, plugin, host) {
            Ok(mut harness) => {
                let fixtures = fixtures.clone();
                harness.answer_calls_with(Box::new(move |call| fixtures.borrow_mut().answer(call)));
                Ok(harness)
            }
            Err(error) => Err(StartFailure {
                error,
                logs: recorded.lock().logs.clone(),
            }),
        }
    };

    let mut report = Report::default();
    let mut shared: Option<Harness> = None;
    for case in &file.cases {
        if let Some(filter) = &options.filter
            && !case.name.contains(filter.as_str())
        {
            continue;
        }
        *fixtures.borrow_mut() = Fixtures::new(&case.http_calls);
        if case.expect.configuration_rejected == Some(true) {
            let configuration = match &case.configuration {
                Some(configuration) => configuration_bytes(configuration),
                None => base_configuration.clone(),
            };
            report
                .cases
                .push(expect_rejection(case, start(&configuration)));
            continue;
        }
        // A case's own configuration gets its own VM; the others share one, built lazily so a
        // configuration the plugin rejects is reported against the case that needed it.
        let mut own;
        let harness = match &case.configuration {
            Some(configuration) => match start(&configuration_bytes(configuration)) {
                Ok(started) => {
                    own = started;
                    &mut own
                }
                Err(error) => {
                    report.cases.push(start_failure(case, &error));
                    continue;
                }
            },
            None => {
                if shared.is_none() {
                    match start(&base_configuration) {
                        Ok(started) => shared = Some(started),
                        Err(error) => {
                            report.cases.push(start_failure(case, &error));
                            continue;
                        }
                    }
                }
                shared.as_mut().expect("started above")
            }
        };
        let result = run_case(harness, case, &fixtures);
        let trapped = result.trapped;
        report.cases.push(result.result);
        if trapped && case.configuration.is_none() {
            shared = None;
        }
    }
    Ok(report)
}

/// Why a plugin did not start, and what it logged while it tried.
struct StartFailure {
    error: HarnessError,
    logs: Vec<wasmgate_abi::LogRecord>,
}

fn log_lines(logs: &[wasmgate_abi::LogRecord]) -> Vec<String> {
    logs.iter()
        .map(|r| format!("[{}] {}", r.level, r.message))
        .collect()
}

fn start_failure(case: &Case, failure: &StartFailure) -> CaseResult {
    CaseResult {
        name: case.name.clone(),
        mismatches: vec![Mismatch {
            what: "plugin start".into(),
            expected: "the plugin to start and accept its configuration".into(),
            actual: format!("{:#}", failure.error),
        }],
        logs: log_lines(&failure.logs),
    }
}

/// A case that expects the plugin to refuse its configuration: only the start and its logs are
/// checked.
fn expect_rejection(case: &Case, started: Result<Harness, StartFailure>) -> CaseResult {
    let mut check = Checker::default();
    let logs = match started {
        Ok(harness) => {
            check.fail(
                "configuration_rejected",
                "the plugin to refuse its configuration".into(),
                "it accepted".into(),
            );
            harness.logs()
        }
        Err(failure) => failure.logs,
    };
    check.logs(&case.expect, &logs);
    CaseResult {
        name: case.name.clone(),
        mismatches: check.mismatches,
        logs: log_lines(&logs),
    }
}

/// The case's `http_calls` fixtures, each answering one call.
#[derive(Default)]
struct Fixtures {
    unused: Vec<(usize, CallFixtureSpec)>,
    /// Calls no fixture matched, described for the report.
    unmatched: Vec<String>,
}

impl Fixtures {
    fn new(specs: &[CallFixtureSpec]) -> Self {
        Self {
            unused: specs.iter().cloned().enumerate().collect(),
            unmatched: Vec::new(),
        }
    }

    fn answer(&mut self, call: &HttpCallRequest) -> CallOutcome {
        let method = call.headers.get_str(":method").unwrap_or_default();
        let path = call.headers.get_str(":path").unwrap_or_default();
        let found = self.unused.iter().position(|(_, f)| {
            f.cluster.as_deref().is_none_or(|c| c == call.upstream)
                && f.method.as_deref().is_none_or(|m| m == method)
                && f.path.as_deref().is_none_or(|p| p == path)
        });
        let Some(index) = found else {
            self.unmatched
                .push(format!("{} {} {}", call.upstream, method, path));
            return CallOutcome::Failure {
                message: "no fixture in the case answers this call".into(),
            };
        };
        let (_, fixture) = self.unused.remove(index);
        match fixture.response {
            Some(response) if !fixture.failure => {
                let message = response_message(&response);
                CallOutcome::Response {
                    headers: message.headers,
                    body: message.body.concat(),
                    trailers: message.trailers.unwrap_or_default(),
                }
            }
            _ => CallOutcome::Failure {
                message: "the fixture fails the call".into(),
            },
        }
    }
}

fn header_map(headers: &Headers) -> HeaderMap {
    HeaderMap::from_pairs(headers.0.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

fn body_chunks(body: &Option<String>, chunks: &[String]) -> Vec<Vec<u8>> {
    match body {
        Some(body) => vec![body.clone().into_bytes()],
        None => chunks.iter().map(|c| c.clone().into_bytes()).collect(),
    }
}

fn request_message(spec: &RequestSpec) -> Message {
    let mut message = Message::request(&spec.method, &spec.path);
    message
        .headers
        .replace(":authority", spec.authority.clone());
    message.headers.replace(":scheme", spec.scheme.clone());
    for (name, value) in &spec.headers.0 {
        message.headers.add(name.clone(), value.clone());
    }
    message.body = body_chunks(&spec.body, &spec.body_chunks);
    message.trailers = spec.trailers.as_ref().map(header_map);
    message
}

fn response_message(spec: &ResponseSpec) -> Message {
    let mut message = Message::response(spec.status);
    for (name, value) in &spec.headers.0 {
        message.headers.add(name.clone(), value.clone());
    }
    message.body = body_chunks(&spec.body, &spec.body_chunks);
    message.trailers = spec.trailers.as_ref().map(header_map);
    message
}

struct CaseRun {
    result: CaseResult,
    trapped: bool,
}

fn run_case(harness: &mut Harness, case: &Case, fixtures: &Rc<RefCell<Fixtures>>) -> CaseRun {
    let logs_before = harness.host.recorded.lock().logs.len();
    let calls_before = harness.host.recorded.lock().http_calls.len();
    let mut outcome: Result<Exchange, HarnessError> = Ok(Exchange::default());
    for _ in 0..case.ticks {
        if let Err(error) = harness.tick() {
            outcome = Err(error);
            break;
        }
    }
    if outcome.is_ok() {
        let upstream = response_message(&case.upstream);
        outcome = harness.exchange(request_message(&case.request), &mut |_| upstream.clone());
    }

    let recorded = harness.host.recorded.lock();
    let logs: Vec<_> = recorded.logs[logs_before..].to_vec();
    let calls: Vec<HttpCallRequest> = recorded.http_calls[calls_before..]
        .iter()
        .map(|(_, _, call)| call.clone())
        .collect();
    drop(recorded);

    let mut check = Checker::default();
    let trapped = outcome.is_err();
    match (&outcome, &case.expect.trap) {
        (Err(error), None | Some(TrapExpectation::Expected(false))) => {
            check.fail("plugin", "no trap".into(), format!("a trap: {error:#}"))
        }
        (Err(error), Some(TrapExpectation::Containing(text))) => {
            // A panic's message reaches the log (the SDKs log it before they abort), not the trap.
            let error = format!("{error:#}");
            let logged = logs.iter().any(|r| r.message.contains(text.as_str()));
            if !error.contains(text.as_str()) && !logged {
                check.fail(
                    "trap",
                    format!("a trap whose error or log contains {text:?}"),
                    error,
                );
            }
        }
        (Ok(_), Some(TrapExpectation::Expected(true) | TrapExpectation::Containing(_))) => {
            check.fail("trap", "a trap".into(), "none".into())
        }
        _ => {}
    }
    if let Ok(exchange) = &outcome {
        check.exchange(&case.expect, exchange);
    }
    {
        let fixtures = fixtures.borrow();
        for call in &fixtures.unmatched {
            check.fail(
                "http_calls",
                "a fixture for every call".into(),
                format!("a call to {call} that no fixture answers (answered as failed)"),
            );
        }
        // Unused fixtures are only a mistake when the case ran to its end.
        if !trapped {
            for (index, fixture) in &fixtures.unused {
                check.fail(
                    &format!("http_calls[{index}]"),
                    format!("a call to {}", describe_fixture(fixture)),
                    "no such call".into(),
                );
            }
        }
    }
    if let Some(expected) = &case.expect.http_calls {
        check.calls(expected, &calls);
    }
    check.logs(&case.expect, &logs);
    for (name, expected) in &case.expect.metrics {
        let actual = harness.runtime.shared().metrics.find(name);
        match actual {
            Some(metric) if metric.value == *expected => {}
            Some(metric) => check.fail(
                &format!("metrics.{name}"),
                expected.to_string(),
                metric.value.to_string(),
            ),
            None => check.fail(
                &format!("metrics.{name}"),
                expected.to_string(),
                "no such metric (the plugin never defined it)".into(),
            ),
        }
    }
    CaseRun {
        result: CaseResult {
            name: case.name.clone(),
            mismatches: check.mismatches,
            logs: log_lines(&logs),
        },
        trapped,
    }
}

fn describe_fixture(fixture: &CallFixtureSpec) -> String {
    let mut text = fixture
        .cluster
        .clone()
        .unwrap_or_else(|| "any cluster".into());
    if let Some(method) = &fixture.method {
        let _ = write!(text, " {method}");
    }
    if let Some(path) = &fixture.path {
        let _ = write!(text, " {path}");
    }
    text
}

#[derive(Default)]
struct Checker {
    mismatches: Vec<Mismatch>,
}

fn quoted(text: &str) -> String {
    format!("{text:?}")
}

impl Checker {
    fn fail(&mut self, what: &str, expected: String, actual: String) {
        self.mismatches.push(Mismatch {
            what: what.to_owned(),
            expected,
            actual,
        });
    }

    fn exchange(&mut self, expect: &Expect, exchange: &Exchange) {
        let reached = exchange.upstream_request.is_some();
        if let Some(expected) = expect.reaches_upstream
            && expected != reached
        {
            self.fail(
                "reaches_upstream",
                expected.to_string(),
                reached.to_string(),
            );
        }
        if let Some(expected) = expect.local_reply {
            let actual = exchange.local_response.is_some();
            if expected != actual {
                let detail = match &exchange.local_response {
                    Some(local) => format!("true (status {})", local.status_code),
                    None => "false".into(),
                };
                self.fail("local_reply", expected.to_string(), detail);
            }
        }
        if let Some(expected) = expect.stalled {
            let actual = exchange.stalled_in.is_some();
            if expected != actual {
                let detail = match exchange.stalled_in {
                    Some(callback) => format!("true (paused in {callback}, never resumed)"),
                    None => "false".into(),
                };
                self.fail("stalled", expected.to_string(), detail);
            }
        }
        if let Some(expected) = &expect.upstream_request {
            match &exchange.upstream_request {
                Some(actual) => self.message("upstream_request", expected, actual),
                None => self.fail(
                    "upstream_request",
                    "the request to reach the upstream".into(),
                    not_reached(exchange),
                ),
            }
        }
        if let Some(expected) = &expect.response {
            match &exchange.response {
                Some(actual) => self.message("response", expected, actual),
                None => self.fail(
                    "response",
                    "a response".into(),
                    format!(
                        "none: the stream stalled in {}",
                        exchange.stalled_in.unwrap_or("a callback")
                    ),
                ),
            }
        }
    }

    fn message(&mut self, side: &str, expected: &ExpectMessage, actual: &Message) {
        if let Some(status) = expected.status {
            let got = actual.headers.get_str(":status").unwrap_or_default();
            if got != status.to_string() {
                self.fail(
                    &format!("{side}.status"),
                    status.to_string(),
                    got.to_owned(),
                );
            }
        }
        self.headers(
            &format!("{side}.headers"),
            &expected.headers,
            &actual.headers,
        );
        for name in &expected.headers_absent {
            let name = name.to_ascii_lowercase();
            let values = header_values(&actual.headers, &name);
            if !values.is_empty() {
                self.fail(
                    &format!("{side}.headers_absent.{name}"),
                    "absent".into(),
                    quoted(&values.join(", ")),
                );
            }
        }
        let body = String::from_utf8_lossy(&actual.body_bytes()).into_owned();
        if let Some(expected) = &expected.body
            && *expected != body
        {
            self.fail(&format!("{side}.body"), quoted(expected), quoted(&body));
            if let Some(last) = self.mismatches.last_mut()
                && (expected.contains('\n') || body.contains('\n'))
            {
                last.expected = expected.clone();
                last.actual = body.clone();
            }
        }
        for needle in &expected.body_contains {
            if !body.contains(needle.as_str()) {
                self.fail(
                    &format!("{side}.body_contains"),
                    quoted(needle),
                    format!("a body without it: {}", quoted(&body)),
                );
            }
        }
        if !expected.trailers.0.is_empty() {
            let trailers = actual.trailers.clone().unwrap_or_default();
            self.headers(&format!("{side}.trailers"), &expected.trailers, &trailers);
        }
    }

    fn headers(&mut self, what: &str, expected: &Headers, actual: &HeaderMap) {
        for (name, value) in &expected.0 {
            let values = header_values(actual, name);
            if values.iter().any(|v| v == value) {
                continue;
            }
            let got = if values.is_empty() {
                let present: Vec<String> = actual
                    .to_string_pairs()
                    .into_iter()
                    .map(|(n, _)| n)
                    .collect();
                format!("no such header (present: {})", present.join(", "))
            } else {
                quoted(&values.join(", "))
            };
            self.fail(&format!("{what}.{name}"), quoted(value), got);
        }
    }

    fn calls(&mut self, expected: &[ExpectCall], actual: &[HttpCallRequest]) {
        if expected.len() != actual.len() {
            let made: Vec<String> = actual.iter().map(describe_call).collect();
            self.fail(
                "http_calls",
                format!("{} call(s)", expected.len()),
                format!("{} call(s) [{}]", actual.len(), made.join("; ")),
            );
        }
        for (index, (want, call)) in expected.iter().zip(actual).enumerate() {
            let what = format!("http_calls[{index}]");
            let method = call.headers.get_str(":method").unwrap_or_default();
            let path = call.headers.get_str(":path").unwrap_or_default();
            if let Some(cluster) = &want.cluster
                && *cluster != call.upstream
            {
                self.fail(
                    &format!("{what}.cluster"),
                    quoted(cluster),
                    quoted(&call.upstream),
                );
            }
            if let Some(m) = &want.method
                && m != method
            {
                self.fail(&format!("{what}.method"), quoted(m), quoted(method));
            }
            if let Some(p) = &want.path
                && p != path
            {
                self.fail(&format!("{what}.path"), quoted(p), quoted(path));
            }
            self.headers(&format!("{what}.headers"), &want.headers, &call.headers);
            if let Some(body) = &want.body {
                let got = String::from_utf8_lossy(&call.body);
                if *body != got {
                    self.fail(&format!("{what}.body"), quoted(body), quoted(&got));
                }
            }
            if let Some(timeout) = want.timeout_ms
                && timeout != call.timeout_ms
            {
                self.fail(
                    &format!("{what}.timeout_ms"),
                    timeout.to_string(),
                    call.timeout_ms.to_string(),
                );
            }
        }
    }

    fn logs(&mut self, expect: &Expect, logs: &[wasmgate_abi::LogRecord]) {
        for (index, want) in expect.logs.iter().enumerate() {
            let found = logs.iter().any(|record| {
                record.message.contains(want.contains.as_str())
                    && want.level.is_none_or(|level| level == record.level)
            });
            if !found {
                let expected = match want.level {
                    Some(level) => format!(
                        "a line at level {level} containing {}",
                        quoted(&want.contains)
                    ),
                    None => format!("a line containing {}", quoted(&want.contains)),
                };
                self.fail(
                    &format!("logs[{index}]"),
                    expected,
                    format!("{} line(s), none matching", logs.len()),
                );
            }
        }
        for needle in &expect.logs_absent {
            if let Some(line) = logs.iter().find(|r| r.message.contains(needle.as_str())) {
                self.fail(
                    "logs_absent",
                    format!("no line containing {}", quoted(needle)),
                    quoted(&line.message),
                );
            }
        }
    }
}

fn header_values(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name.as_bytes())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

fn not_reached(exchange: &Exchange) -> String {
    match (&exchange.local_response, exchange.stalled_in) {
        (Some(local), _) => format!("a local reply with status {}", local.status_code),
        (None, Some(callback)) => format!("the stream stalled in {callback}"),
        (None, None) => "it did not".into(),
    }
}

fn describe_call(call: &HttpCallRequest) -> String {
    format!(
        "{} {} {}",
        call.upstream,
        call.headers.get_str(":method").unwrap_or_default(),
        call.headers.get_str(":path").unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_read_from_maps_lists_and_scalars() {
        let file = CasesFile::parse(
            "cases:\n  - name: a\n    request:\n      headers: { X-Count: 5, x-flag: true, x-many: [a, b] }\n  - name: b\n    request:\n      headers: [\"X-A: one: two\"]\n",
            "t.yaml",
        )
        .unwrap();
        assert_eq!(
            file.cases[0].request.headers.0,
            vec![
                ("x-count".to_string(), "5".to_string()),
                ("x-flag".into(), "true".into()),
                ("x-many".into(), "a".into()),
                ("x-many".into(), "b".into()),
            ]
        );
        assert_eq!(
            file.cases[1].request.headers.0,
            vec![("x-a".to_string(), "one: two".to_string())]
        );
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let error = CasesFile::parse(
            "cases:\n  - name: a\n    expect:\n      response: { status: fourhundred }\n",
            "cases.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.starts_with("cases.yaml: cases[0].expect.response.status: "),
            "{error}"
        );
        let error = CasesFile::parse("cases:\n  - name: a\n    expct: {}\n", "c.yaml")
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown field `expct`"), "{error}");
        let error = CasesFile::parse(
            "cases:\n  - name: a\n    http_calls: [ { cluster: x } ]\n",
            "c.yaml",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            error,
            "c.yaml: cases[0].http_calls[0]: give exactly one of response or failure: true"
        );
        let error = CasesFile::parse("cases: []\n", "c.yaml")
            .unwrap_err()
            .to_string();
        assert_eq!(error, "c.yaml: cases: there are no cases");
        let error = CasesFile::parse(
            "cases:\n  - name: a\n    expect: { logs: [ { level: loud, contains: x } ] }\n",
            "c.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("unknown log level \"loud\""), "{error}");
    }

    #[test]
    fn configuration_strings_pass_as_is_and_maps_as_json() {
        let map: serde_yaml::Value = serde_yaml::from_str("{ a: 1 }").unwrap();
        assert_eq!(configuration_bytes(&map), br#"{"a":1}"#);
        let text = serde_yaml::Value::String("raw {".into());
        assert_eq!(configuration_bytes(&text), b"raw {");
    }

    #[test]
    fn line_diff_marks_changes() {
        assert_eq!(
            line_diff("a\nb\nc", "a\nx\nc"),
            vec!["  a", "+ x", "- b", "  c"]
        );
    }
}
