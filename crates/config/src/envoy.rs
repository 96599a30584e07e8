//! Envoy's Wasm filter form (`envoy.extensions.wasm.v3.PluginConfig`), as written in a listener's
//! `http_filters`, so an Envoy user can paste their filter config.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration::{serde_duration, serde_opt_duration};
use crate::error::Report;
use crate::plugin::{CodeSource, FailurePolicy, PluginOrigin, PluginSpec, ReloadBackoff};
use crate::value::deserialize_configuration;

/// One Wasm plugin in a listener's `http_filters`, in Envoy's `PluginConfig` shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpFilter {
    /// The plugin name (logs, metrics).
    #[serde(default)]
    pub name: String,
    /// Selects the root context in the module; empty = the blank root.
    #[serde(default)]
    pub root_id: String,
    pub vm_config: VmConfig,
    /// Passed to `proxy_on_configure`: a YAML string as is, a map/list as JSON, or Envoy's `Any` form
    /// with `google.protobuf.StringValue` / `google.protobuf.Struct`.
    #[serde(default, deserialize_with = "deserialize_configuration")]
    pub configuration: String,
    #[serde(default)]
    pub failure_policy: EnvoyFailurePolicy,
    /// Deprecated in Envoy; `true` = `FAIL_OPEN`.
    #[serde(default)]
    pub fail_open: bool,
    /// The host functions and callbacks the plugin may use; absent allows all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capability_restriction_config: Option<CapabilityRestrictionConfig>,
    /// FAIL_RELOAD's backoff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload_config: Option<ReloadConfig>,
}

/// Envoy's `CapabilityRestrictionConfig`: capability names (`proxy_log`, `fd_write`,
/// `proxy_on_request_headers`, ...) mapped to a `SanitizationConfig` that Envoy, and Wasmgate,
/// ignore.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilityRestrictionConfig {
    #[serde(default)]
    pub allowed_capabilities: BTreeMap<String, serde_json::Value>,
}

/// Envoy's `ReloadConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<BackoffStrategy>,
}

/// Envoy's `failure_policy` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EnvoyFailurePolicy {
    /// = `FAIL_CLOSED` (unless the legacy `fail_open: true`).
    #[default]
    Unspecified,
    FailClosed,
    FailOpen,
    FailReload,
}

/// Envoy's `VmConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(default)]
    pub vm_id: String,
    /// Accepted and ignored (`envoy.wasm.runtime.v8` and the like): Wasmgate always runs wasmtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    pub code: Code,
    /// Passed to `proxy_on_vm_start`; same forms as [`HttpFilter::configuration`].
    #[serde(default, deserialize_with = "deserialize_configuration")]
    pub configuration: String,
    #[serde(default)]
    pub environment_variables: EnvironmentVariables,
    /// Accepted and ignored.
    #[serde(default)]
    pub allow_precompiled: bool,
    /// Accepted and ignored.
    #[serde(default)]
    pub nack_on_code_cache_miss: bool,
}

/// Envoy's `AsyncDataSource` for code: exactly one of `local` / `remote`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Code {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalCode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteCode>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalCode {
    /// Resolved against the config file's folder when relative.
    pub filename: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteCode {
    pub http_uri: HttpUri,
    /// Required (as Envoy requires it): 64 hex characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_policy: Option<RetryPolicy>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpUri {
    pub uri: String,
    /// Accepted for compatibility; Wasmgate fetches modules itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    #[serde(
        default,
        with = "serde_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_back_off: Option<BackoffStrategy>,
}

/// Envoy's `BackoffStrategy`: `max_interval` defaults to ten times `base_interval`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackoffStrategy {
    #[serde(with = "serde_duration")]
    pub base_interval: Duration,
    #[serde(
        default,
        with = "serde_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_interval: Option<Duration>,
}

/// Envoy's `EnvironmentVariables`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentVariables {
    /// Copied from the gateway's own environment; keys it lacks are skipped.
    #[serde(default)]
    pub host_env_keys: Vec<String>,
    #[serde(default)]
    pub key_values: BTreeMap<String, String>,
}

impl HttpFilter {
    /// The failure policy in force: `failure_policy`, or `FAIL_OPEN` for the legacy `fail_open: true`,
    /// `FAIL_CLOSED` when neither says otherwise.
    pub fn effective_failure_policy(&self) -> FailurePolicy {
        match self.failure_policy {
            EnvoyFailurePolicy::FailOpen => FailurePolicy::FailOpen,
            EnvoyFailurePolicy::FailReload => FailurePolicy::FailReload,
            EnvoyFailurePolicy::FailClosed => FailurePolicy::FailClosed,
            EnvoyFailurePolicy::Unspecified if self.fail_open => FailurePolicy::FailOpen,
            EnvoyFailurePolicy::Unspecified => FailurePolicy::FailClosed,
        }
    }

    /// The resolved view, HOST environment values read from the process environment. `None` when
    /// `vm_config.code` has neither `local` nor `remote` (which validation rejects).
    pub fn to_plugin_spec(&self, listener: &str, index: usize) -> Option<PluginSpec> {
        self.to_plugin_spec_with_env(listener, index, &|key| std::env::var(key).ok())
    }

    /// As [`to_plugin_spec`](Self::to_plugin_spec), with `host_env` standing for the process
    /// environment.
    pub fn to_plugin_spec_with_env(
        &self,
        listener: &str,
        index: usize,
        host_env: &dyn Fn(&str) -> Option<String>,
    ) -> Option<PluginSpec> {
        let code = &self.vm_config.code;
        let source = match (&code.local, &code.remote) {
            (Some(local), _) => CodeSource::Local(local.filename.clone()),
            (None, Some(remote)) => CodeSource::Remote {
                uri: remote.http_uri.uri.clone(),
                sha256: remote.sha256.as_ref().map(|s| s.to_ascii_lowercase()),
            },
            (None, None) => return None,
        };
        let env = &self.vm_config.environment_variables;
        let mut environment: Vec<(String, String)> = env
            .host_env_keys
            .iter()
            .filter_map(|key| host_env(key).map(|value| (key.clone(), value)))
            .collect();
        environment.extend(env.key_values.iter().map(|(k, v)| (k.clone(), v.clone())));
        Some(PluginSpec {
            name: self.name.clone(),
            root_id: self.root_id.clone(),
            vm_id: self.vm_config.vm_id.clone(),
            vm_configuration: self.vm_config.configuration.clone().into_bytes(),
            configuration: self.configuration.clone().into_bytes(),
            source,
            environment,
            failure_policy: self.effective_failure_policy(),
            capabilities: self
                .capability_restriction_config
                .as_ref()
                .map(|c| c.allowed_capabilities.keys().cloned().collect()),
            reload_backoff: self.reload_backoff(),
            image_pull_policy: None,
            image_pull_secret: None,
            origin: PluginOrigin::EnvoyFilter {
                listener: listener.to_owned(),
                index,
            },
        })
    }

    fn reload_backoff(&self) -> ReloadBackoff {
        match self.reload_config.as_ref().and_then(|r| r.backoff.as_ref()) {
            Some(backoff) => ReloadBackoff {
                base: backoff.base_interval,
                max: backoff.max_interval.unwrap_or(backoff.base_interval * 10),
            },
            None => ReloadBackoff::default(),
        }
    }

    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        if let Some(local) = &mut self.vm_config.code.local {
            local.filename = crate::resolve_path(base, &local.filename);
        }
    }

    /// Semantic checks; `field` is this filter's path (`listeners[0].http_filters[1]`).
    pub(crate) fn validate(&self, field: &str, report: &mut Report<'_>) {
        let mut err = |sub: &str, reason: String| report.push(format!("{field}.{sub}"), reason);
        let code = &self.vm_config.code;
        match (&code.local, &code.remote) {
            (Some(_), Some(_)) => err(
                "vm_config.code",
                "exactly one of local, remote must be set (found both)".to_owned(),
            ),
            (None, None) => err(
                "vm_config.code",
                "exactly one of local, remote must be set (found neither)".to_owned(),
            ),
            _ => {}
        }
        if let Some(local) = &code.local
            && let Some(reason) = crate::check_file(&local.filename)
        {
            err("vm_config.code.local.filename", reason);
        }
        if let Some(remote) = &code.remote {
            let uri = &remote.http_uri.uri;
            if uri.is_empty() {
                err(
                    "vm_config.code.remote.http_uri.uri",
                    "must not be empty".to_owned(),
                );
            } else if !(uri.starts_with("http://") || uri.starts_with("https://")) {
                err(
                    "vm_config.code.remote.http_uri.uri",
                    format!("unsupported URI {uri:?}: expected http:// or https://"),
                );
            }
            match &remote.sha256 {
                None => err(
                    "vm_config.code.remote.sha256",
                    "required for remote code".to_owned(),
                ),
                Some(sha) if !crate::is_sha256_hex(sha) => err(
                    "vm_config.code.remote.sha256",
                    format!("{sha:?} is not 64 hexadecimal characters"),
                ),
                Some(_) => {}
            }
        }
        if self.fail_open
            && matches!(
                self.failure_policy,
                EnvoyFailurePolicy::FailClosed | EnvoyFailurePolicy::FailReload
            )
        {
            err(
                "fail_open",
                format!(
                    "conflicts with failure_policy {}",
                    match self.failure_policy {
                        EnvoyFailurePolicy::FailReload => "FAIL_RELOAD",
                        _ => "FAIL_CLOSED",
                    }
                ),
            );
        }
        if let Some(backoff) = self.reload_config.as_ref().and_then(|r| r.backoff.as_ref()) {
            if backoff.base_interval < Duration::from_millis(1) {
                err(
                    "reload_config.backoff.base_interval",
                    "must be at least 1ms".to_owned(),
                );
            }
            if let Some(max) = backoff.max_interval
                && max < backoff.base_interval
            {
                err(
                    "reload_config.backoff.max_interval",
                    "must not be less than base_interval".to_owned(),
                );
            }
            if self.effective_failure_policy() != FailurePolicy::FailReload {
                err(
                    "reload_config",
                    "only applies with failure_policy FAIL_RELOAD".to_owned(),
                );
            }
        }
        let env = &self.vm_config.environment_variables;
        for (i, key) in env.host_env_keys.iter().enumerate() {
            if key.is_empty() {
                err(
                    &format!("vm_config.environment_variables.host_env_keys[{i}]"),
                    "must not be empty".to_owned(),
                );
            }
        }
        for key in env.key_values.keys() {
            if env.host_env_keys.contains(key) {
                err(
                    &format!("vm_config.environment_variables.key_values.{key}"),
                    format!("{key:?} is also listed in host_env_keys"),
                );
            }
        }
    }
}
