//! `wasmgate run`: the configuration turned into a running gateway (the control side, in small):
//! parse and validate, read and compile each plugin's module, build the data plane's snapshot,
//! start the workers and the admin server, and drain on SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use parking_lot::RwLock;
use serde_json::json;
use wasmgate_config::{
    CodeSource, GatewayConfig, PathMatcher, PluginSpec, RouteAction as ConfigAction,
};
use wasmgate_dataplane::{
    AdminState, ClusterSpec, FailurePolicy, FilterSpec, GatewayHandle, GatewaySpec, GatewayStats,
    Limits, ListenerRouting, ListenerSpec, PathMatch, RouteAction, RouteSpec, SniRoute,
    TcpProxySpec, TlsFiles, UpstreamTls,
};
use wasmgate_fetch::{
    Cache, DockerConfig, FetchError, FetchErrorKind, FetchOptions, Fetched, Fetcher, ModuleRequest,
    ModuleUrl, PullPolicy, redact_credentials,
};
use wasmgate_runtime::{CompiledModule, PluginConfig, Runtime, RuntimeConfig, Vm, VmConfig};
use wasmgate_toolkit::harness::RecordingHost;

/// The cache folder: the configuration's `module_cache.dir`, else `$WASMGATE_CACHE_DIR`, else the
/// user's cache folder. Fetched modules and their compiled artefacts live in `modules/` there.
pub fn cache_root(config: &GatewayConfig) -> PathBuf {
    if let Some(dir) = &config.module_cache.dir {
        return dir.clone();
    }
    if let Some(dir) = std::env::var_os("WASMGATE_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("wasmgate")
}

/// The fetch options a configuration asks for.
pub fn fetch_options(config: &GatewayConfig) -> anyhow::Result<FetchOptions> {
    let fetch = &config.module_fetch;
    let mut extra_root_certificates = Vec::new();
    for ca in &fetch.ca_files {
        extra_root_certificates.push(
            std::fs::read(ca)
                .with_context(|| format!("module_fetch.ca_files: cannot read {}", ca.display()))?,
        );
    }
    Ok(FetchOptions {
        attempt_timeout: fetch.attempt_timeout,
        deadline: fetch.timeout,
        max_attempts: fetch.max_attempts,
        max_size: fetch.max_module_bytes,
        insecure_registries: config.insecure_registries.clone(),
        extra_root_certificates,
        ..FetchOptions::default()
    })
}

/// How long start-up waits for the Kubernetes API's first lists.
const KUBERNETES_SYNC_WAIT: Duration = Duration::from_secs(30);

/// What the control side works with: the engine, the module fetcher and its cache.
pub struct Control {
    pub runtime: Arc<Runtime>,
    pub fetcher: Arc<Fetcher>,
    /// Runs fetches for the control thread (module downloads are async).
    io: tokio::runtime::Runtime,
    /// Where `imagePullSecret` names are looked up, in order: `pull_secrets_dir`, then the
    /// Kubernetes mirror's secrets.
    secrets_dirs: Vec<PathBuf>,
    /// WasmPlugin folders beside the configuration's `plugins_dir`: the Kubernetes mirror's.
    extra_plugin_dirs: Vec<PathBuf>,
    /// The Kubernetes mirror, while it runs.
    kubernetes: parking_lot::Mutex<Option<wasmgate_kube::KubeHandle>>,
    retry_initial_backoff: Duration,
    cache_expiry: Duration,
    purge_interval: Duration,
}

impl Control {
    pub fn new(config: &GatewayConfig) -> anyhow::Result<Self> {
        let cache = Cache::open(cache_root(config)).map_err(|e| anyhow::anyhow!("{e}"))?;
        let runtime = Runtime::new(RuntimeConfig {
            cache_dir: Some(cache.modules_dir()),
            callback_time_limit: config.plugin_limits.callback_time_limit,
            max_memory_bytes: config.plugin_limits.max_memory_bytes,
            max_stack_bytes: config.plugin_limits.max_stack_bytes,
            max_http_calls: config.plugin_limits.max_http_calls,
            max_queue_length: config.plugin_limits.max_queue_length,
            ..Default::default()
        })?;
        let fetcher = Fetcher::new(fetch_options(config)?, Arc::new(cache))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut secrets_dirs: Vec<PathBuf> = config.pull_secrets_dir.iter().cloned().collect();
        let mut extra_plugin_dirs = Vec::new();
        let kubernetes = match &config.kubernetes {
            Some(source) => {
                let handle = wasmgate_kube::KubeSource {
                    namespace: config.workload.namespace.clone(),
                    root_namespace: config.workload.root_namespace.clone(),
                    kubeconfig: source.kubeconfig.clone(),
                    mirror_dir: source
                        .mirror_dir
                        .clone()
                        .unwrap_or_else(|| cache_root(config).join("kubernetes")),
                }
                .start()
                .context("kubernetes")?;
                if !handle.wait_synced(KUBERNETES_SYNC_WAIT) {
                    tracing::warn!(
                        "the Kubernetes API did not list the WasmPlugins within {KUBERNETES_SYNC_WAIT:?}; starting with what the mirror holds, changes apply when they arrive"
                    );
                }
                secrets_dirs.push(handle.secrets_dir());
                extra_plugin_dirs.push(handle.plugins_dir());
                Some(handle)
            }
            None => None,
        };
        Ok(Self {
            runtime,
            fetcher: Arc::new(fetcher),
            io: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            secrets_dirs,
            extra_plugin_dirs,
            kubernetes: parking_lot::Mutex::new(kubernetes),
            retry_initial_backoff: config.module_fetch.retry_initial_backoff,
            cache_expiry: config.module_cache.expiry,
            purge_interval: config.module_cache.purge_interval,
        })
    }

    /// The dockerconfigjson an `imagePullSecret` names, from `pull_secrets_dir` or the Kubernetes
    /// mirror.
    fn pull_secret(&self, name: &str) -> Result<DockerConfig, String> {
        if self.secrets_dirs.is_empty() {
            return Err(format!(
                "imagePullSecret {name:?} is set but the gateway has no pull_secrets_dir (nor a kubernetes source)"
            ));
        }
        let path = self
            .secrets_dirs
            .iter()
            .flat_map(|dir| [dir.join(name), dir.join(format!("{name}.json"))])
            .find(|p| p.is_file())
            .ok_or_else(|| {
                let dirs: Vec<String> = self
                    .secrets_dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect();
                format!(
                    "imagePullSecret {name:?}: no file {name} or {name}.json in {}",
                    dirs.join(" or ")
                )
            })?;
        DockerConfig::from_file(&path).map_err(|e| format!("imagePullSecret {name:?}: {e}"))
    }

    /// Every folder of WasmPlugin manifests: the configuration's `plugins_dir`, then the mirror's.
    fn plugin_dirs(&self, config: &GatewayConfig) -> Vec<PathBuf> {
        config
            .plugins_dir
            .iter()
            .chain(&self.extra_plugin_dirs)
            .cloned()
            .collect()
    }

    /// Stops the Kubernetes mirror, if one runs.
    fn stop(&self) {
        if let Some(handle) = self.kubernetes.lock().take() {
            handle.stop();
        }
    }

    /// A remote plugin's module, fetched (or taken from the cache) and compiled.
    fn fetch_remote(
        &self,
        plugin: &PluginSpec,
        uri: &str,
        sha256: Option<&str>,
    ) -> Result<(Arc<CompiledModule>, String), String> {
        let credentials = match &plugin.image_pull_secret {
            Some(name) => Some(self.pull_secret(name)?),
            None => None,
        };
        let pull_policy = match plugin.image_pull_policy.as_deref() {
            Some(policy) => PullPolicy::from_istio(policy)?,
            None => None,
        };
        let request = ModuleRequest {
            url: uri,
            sha256,
            pull_policy,
            credentials: credentials.as_ref(),
        };
        let fetched = match self.io.block_on(self.fetcher.fetch(request)) {
            Ok(fetched) => fetched,
            Err(error) => match self.stale_copy(&plugin.name, uri, &error) {
                Some(bytes) => bytes,
                None => return Err(error.message),
            },
        };
        let module = self
            .runtime
            .load(&fetched.bytes)
            .map_err(|e| format!("the module does not load: {e}"))?;
        Ok((module, fetched.sha256))
    }

    /// After a transport failure, the module this URL gave last time (an `Always` pull whose
    /// registry is down, say): serving it beats failing the plugin. Never after a checksum or
    /// content error, which says the cached answer is not what was asked for.
    fn stale_copy(&self, plugin: &str, uri: &str, error: &FetchError) -> Option<Fetched> {
        if !matches!(
            error.kind,
            FetchErrorKind::DownloadFailure | FetchErrorKind::ManifestFailure
        ) {
            return None;
        }
        let cache = self.fetcher.cache();
        // The keys the fetcher writes: OCI references in their canonical form, other URLs without
        // their credentials.
        let key = match ModuleUrl::parse(uri).ok()? {
            ModuleUrl::Oci(reference) => reference.to_string(),
            _ => redact_credentials(uri).into_owned(),
        };
        let entry = cache.url(&key)?;
        let bytes = cache.get(&entry.sha256)?;
        tracing::warn!(
            plugin = %plugin,
            url = %redact_credentials(uri),
            sha256 = entry.sha256,
            "cannot refresh the module ({}); serving the copy fetched before",
            error.message
        );
        Some(Fetched {
            bytes: bytes.into(),
            sha256: entry.sha256.clone(),
            path: cache.modules_dir().join(format!("{}.wasm", entry.sha256)),
            cache_hit: true,
            digest: entry.digest,
        })
    }

    /// Starts the plugin once on this thread, as Envoy does on its main thread before the
    /// workers, so a plugin that refuses its configuration is caught before it is swapped in.
    fn check_starts(&self, filter: &FilterSpec) -> Result<(), String> {
        let host = RecordingHost::default();
        let mut vm = Vm::new(
            &self.runtime,
            &filter.module,
            filter.vm.clone(),
            Box::new(host),
        )
        .map_err(|e| e.to_string())?;
        vm.start_plugin(filter.plugin.clone())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// One plugin in one listener's chain, and whether its module is in hand.
/// Which of a listener's chains a plugin is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainKind {
    /// `http_filters` and HTTP WasmPlugins.
    Http,
    /// `network_filters` and `type: NETWORK` WasmPlugins, on the connection's bytes.
    Network,
}

#[derive(Clone)]
pub struct Slot {
    pub listener: String,
    pub chain: ChainKind,
    pub spec: PluginSpec,
    pub state: SlotState,
    /// Set when `spec` (a newer version of the plugin) could not be loaded and the version that was
    /// serving before still does: why the new one failed. Retried like a failed slot.
    pub outdated: Option<String>,
    /// Background retries so far, and when the next one is due.
    retries: u32,
    next_retry: Instant,
}

#[derive(Clone)]
pub enum SlotState {
    // Boxed: a FilterSpec is large beside the failure's reason.
    Loaded {
        filter: Box<FilterSpec>,
        sha256: String,
    },
    Failed {
        reason: String,
    },
}

impl Slot {
    fn new(
        listener: &str,
        chain: ChainKind,
        spec: PluginSpec,
        state: SlotState,
        control: &Control,
    ) -> Self {
        Self {
            listener: listener.to_owned(),
            chain,
            spec,
            state,
            outdated: None,
            retries: 0,
            next_retry: Instant::now() + control.retry_initial_backoff,
        }
    }

    fn needs_retry(&self) -> bool {
        matches!(self.state, SlotState::Failed { .. }) || self.outdated.is_some()
    }

    fn json(&self) -> serde_json::Value {
        let mut value = json!({
            "name": self.spec.name,
            "listener": self.listener,
            "origin": self.spec.origin.to_string(),
            "url": plugin_url(&self.spec),
            "chain": match self.chain {
                ChainKind::Http => "http",
                ChainKind::Network => "network",
            },
            "root_id": self.spec.root_id,
            "vm_id": self.spec.vm_id,
            "failure_policy": format!("{:?}", self.spec.failure_policy),
        });
        match &self.state {
            SlotState::Loaded { sha256, .. } => {
                value["sha256"] = json!(sha256);
                value["state"] = json!("loaded");
                if let Some(reason) = &self.outdated {
                    value["state"] = json!("outdated");
                    value["error"] = json!(format!(
                        "the new version could not be loaded ({reason}); the earlier version serves"
                    ));
                }
            }
            SlotState::Failed { reason } => {
                value["state"] = json!("failed");
                value["error"] = json!(reason);
                value["action"] = json!(failure_action(self.spec.failure_policy));
            }
        }
        value
    }
}

fn failure_action(policy: wasmgate_config::FailurePolicy) -> &'static str {
    match policy {
        wasmgate_config::FailurePolicy::FailOpen => "FAIL_OPEN: its traffic passes without it",
        _ => "FAIL_CLOSE: its traffic is denied with 403",
    }
}

/// The chain a listener serves with its slots as they are: loaded plugins in order, and the
/// FAIL_CLOSE plugins that are missing.
fn listener_chain(
    slots: &[Slot],
    listener: &str,
    chain: ChainKind,
) -> (Vec<FilterSpec>, Vec<String>) {
    let mut filters = Vec::new();
    let mut missing = Vec::new();
    for slot in slots
        .iter()
        .filter(|s| s.listener == listener && s.chain == chain)
    {
        match &slot.state {
            SlotState::Loaded { filter, .. } => filters.push((**filter).clone()),
            SlotState::Failed { .. } => {
                if slot.spec.failure_policy != wasmgate_config::FailurePolicy::FailOpen {
                    missing.push(slot.spec.name.clone());
                }
            }
        }
    }
    (filters, missing)
}

/// Everything `run` builds from a configuration before it serves.
pub struct Prepared {
    pub spec: GatewaySpec,
    pub admin: SocketAddr,
    pub config_dump: serde_json::Value,
    pub slots: Vec<Slot>,
    /// The compiled `stats_matcher` (a reload replaces the admin's).
    pub metric_filter: Option<wasmgate_config::MetricFilter>,
}

/// Reads, validates, fetches and compiles. A configuration error or a local module that does not
/// load is an error with the file, field and reason (start-up stops; a reload is refused whole); a
/// bad WasmPlugin manifest is logged and skipped, the others load; a remote module that cannot be
/// had leaves its plugin failed (see [`Slot`]) and is retried in the background once serving.
///
/// `previous` is what serves now: plugins whose specification did not change are taken from it as
/// they are (same module, same VMs once swapped in), and a plugin whose new version fails keeps its
/// earlier version serving.
pub fn prepare(
    config: &GatewayConfig,
    control: &Control,
    previous: &[Slot],
) -> anyhow::Result<Prepared> {
    let started = Instant::now();
    let mut wasm_plugins = Vec::new();
    let mut rejected = Vec::new();
    for dir in control.plugin_dirs(config) {
        let (plugins, errors) = wasmgate_config::load_wasm_plugins_lenient(&dir);
        wasm_plugins.extend(plugins);
        rejected.extend(errors);
    }
    for error in &rejected {
        tracing::error!("WasmPlugin manifest rejected, the other plugins load: {error}");
    }
    let mut listeners = Vec::new();
    let mut slots = Vec::new();
    for (index, listener) in config.listeners.iter().enumerate() {
        let http = config.chain_for_listener(index, &wasm_plugins);
        let network = config.chain_for_network_listener(index, &wasm_plugins);
        let chains = (http.into_iter().map(|p| (ChainKind::Http, p)))
            .chain(network.into_iter().map(|p| (ChainKind::Network, p)));
        for (chain, plugin) in chains {
            slots.push(place_plugin(
                plugin,
                &listener.name,
                chain,
                previous,
                control,
            )?);
        }
        let (filters, mut missing_plugins) =
            listener_chain(&slots, &listener.name, ChainKind::Http);
        // A missing FAIL_CLOSE network plugin denies the listener's traffic too (Istio's network
        // deny-all RBAC in its place).
        let (network_filters, network_missing) =
            listener_chain(&slots, &listener.name, ChainKind::Network);
        missing_plugins.extend(network_missing);
        let mut routes = Vec::new();
        for (route_index, route) in listener.routes.iter().enumerate() {
            let field = format!(
                "{}: listeners[{index}].routes[{route_index}]",
                config.source
            );
            let path = match route
                .route_match
                .matcher()
                .map_err(|e| anyhow::anyhow!("{field}.match: {e}"))?
            {
                PathMatcher::Prefix(prefix) => PathMatch::Prefix(prefix),
                PathMatcher::Exact(exact) => PathMatch::Exact(exact),
                PathMatcher::Regex(regex) => PathMatch::Regex(regex),
            };
            let action = match route.action() {
                Some(ConfigAction::Cluster(cluster)) => RouteAction::Cluster(cluster.to_owned()),
                Some(ConfigAction::DirectResponse(direct)) => RouteAction::DirectResponse {
                    status: direct.status,
                    body: direct.body.clone(),
                },
                None => bail!("{field}: exactly one of cluster and direct_response must be set"),
            };
            routes.push(RouteSpec {
                name: route
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("{}-{route_index}", listener.name)),
                domains: route.domains.clone(),
                path,
                action,
                timeout: route.timeout.filter(|t| !t.is_zero()),
            });
        }
        let limits = &listener.limits;
        listeners.push(ListenerSpec {
            name: listener.name.clone(),
            address: listener.address,
            routes,
            filters,
            missing_plugins,
            network_filters,
            tcp_proxy: listener.tcp_proxy.as_ref().map(|proxy| TcpProxySpec {
                cluster: proxy.cluster.clone(),
                sni_routes: proxy
                    .sni_routes
                    .iter()
                    .map(|route| SniRoute {
                        server_names: route.server_names.clone(),
                        cluster: route.cluster.clone(),
                    })
                    .collect(),
            }),
            limits: Limits {
                max_request_headers_bytes: limits.max_request_headers_kb as usize * 1024,
                max_headers_count: limits.max_headers_count as usize,
                header_read_timeout: nonzero_or(
                    limits.header_read_timeout,
                    Duration::from_secs(3600),
                ),
                idle_timeout: nonzero_or(limits.idle_timeout, Duration::from_secs(24 * 3600)),
                per_stream_buffer_limit: limits.per_stream_buffer_limit_bytes,
            },
            tls: listener.tls.as_ref().map(|tls| TlsFiles {
                cert_file: tls.cert_file.clone(),
                key_file: tls.key_file.clone(),
            }),
        });
    }
    let mut clusters = Vec::new();
    for cluster in &config.clusters {
        clusters.push(ClusterSpec {
            name: cluster.name.clone(),
            endpoints: cluster.endpoints.iter().map(ToString::to_string).collect(),
            connect_timeout: cluster.connect_timeout,
            request_timeout: (!cluster.request_timeout.is_zero())
                .then_some(cluster.request_timeout),
            http2: cluster.http2,
            tls: cluster.tls.as_ref().map(|tls| UpstreamTls {
                sni: tls.sni.clone(),
                ca_file: tls.ca_file.clone(),
                insecure_skip_verify: tls.insecure_skip_verify,
            }),
        });
    }
    let config_dump = redacted(json!({
        "config": config,
        "plugins": plugins_json(&slots),
        "rejected_manifests": rejected.iter().map(ToString::to_string).collect::<Vec<_>>(),
    }));
    control
        .fetcher
        .metrics()
        .config_conversion(started.elapsed());
    Ok(Prepared {
        spec: GatewaySpec {
            workers: config.workers.max(1),
            listeners,
            clusters,
        },
        admin: config.admin,
        config_dump,
        slots,
        metric_filter: config.stats_matcher.as_ref().and_then(|m| m.compile()),
    })
}

fn nonzero_or(value: Duration, otherwise: Duration) -> Duration {
    if value.is_zero() { otherwise } else { value }
}

/// A plugin's slot in a new configuration: taken as it is from `previous` when its specification
/// (and local module) did not change, else loaded; a new version that fails keeps the earlier one
/// serving.
fn place_plugin(
    plugin: PluginSpec,
    listener: &str,
    chain: ChainKind,
    previous: &[Slot],
    control: &Control,
) -> anyhow::Result<Slot> {
    // A failed one too, and one whose new version failed while the earlier one serves: neither
    // is logged again. What made the reload (a pull secret that arrived, say) may be what it
    // lacked, so the background retries it at once, from the first backoff.
    let unchanged = previous.iter().find(|s| {
        s.listener == listener && s.chain == chain && s.spec == plugin && same_local_module(s)
    });
    if let Some(unchanged) = unchanged {
        let mut slot = unchanged.clone();
        if slot.needs_retry() {
            slot.retries = 0;
            slot.next_retry = Instant::now();
        }
        return Ok(slot);
    }
    let state = load_plugin(&plugin, control)?;
    let earlier = previous.iter().find(|s| {
        s.listener == listener
            && s.chain == chain
            && s.spec.name == plugin.name
            && matches!(s.state, SlotState::Loaded { .. })
    });
    Ok(match (state, earlier) {
        (SlotState::Failed { reason }, Some(earlier)) => {
            tracing::error!(
                plugin = %plugin.name,
                url = %plugin_url(&plugin),
                "cannot load the plugin's new version: {reason}; the earlier version keeps serving; retrying in the background"
            );
            Slot {
                outdated: Some(reason),
                ..Slot::new(listener, chain, plugin, earlier.state.clone(), control)
            }
        }
        (state, _) => {
            if let SlotState::Failed { reason } = &state {
                log_fetch_failure(&plugin, reason);
            }
            Slot::new(listener, chain, plugin, state, control)
        }
    })
}

/// For a plugin from a local file: whether the file still holds the module that was loaded (a
/// rebuilt module at the same path is a change). Remote modules change only with their spec.
fn same_local_module(slot: &Slot) -> bool {
    let (CodeSource::Local(path), SlotState::Loaded { sha256, .. }) =
        (&slot.spec.source, &slot.state)
    else {
        return true;
    };
    std::fs::read(path).is_ok_and(|bytes| wasmgate_fetch::cache::sha256_hex(&bytes) == *sha256)
}

/// A plugin's module read or fetched, compiled, and made a filter. Local modules must load (they
/// are part of the configuration); a remote one that cannot be had gives a failed slot.
fn load_plugin(plugin: &PluginSpec, control: &Control) -> anyhow::Result<SlotState> {
    let (module, sha256) = match &plugin.source {
        CodeSource::Local(path) => {
            let bytes = std::fs::read(path).with_context(|| {
                format!(
                    "plugin {} ({}): cannot read {}",
                    plugin.name,
                    plugin.origin,
                    path.display()
                )
            })?;
            let module = control.runtime.load(&bytes).with_context(|| {
                format!(
                    "plugin {} ({}): {}",
                    plugin.name,
                    plugin.origin,
                    path.display()
                )
            })?;
            let sha256 = module.sha256().to_owned();
            (module, sha256)
        }
        CodeSource::Remote { uri, sha256 } => {
            match control.fetch_remote(plugin, uri, sha256.as_deref()) {
                Ok(loaded) => loaded,
                Err(reason) => return Ok(SlotState::Failed { reason }),
            }
        }
    };
    let filter = filter_spec(plugin, module);
    if matches!(plugin.source, CodeSource::Remote { .. })
        && let Err(reason) = control.check_starts(&filter)
    {
        return Ok(SlotState::Failed {
            reason: format!("the plugin does not start: {reason}"),
        });
    }
    Ok(SlotState::Loaded {
        filter: Box::new(filter),
        sha256,
    })
}

fn filter_spec(plugin: &PluginSpec, module: Arc<CompiledModule>) -> FilterSpec {
    FilterSpec {
        name: plugin.name.clone(),
        module,
        vm: VmConfig {
            vm_id: plugin.vm_id.clone(),
            configuration: plugin.vm_configuration.clone(),
            environment: plugin.environment.clone(),
            capabilities: plugin.capabilities.clone(),
        },
        plugin: PluginConfig {
            name: plugin.name.clone(),
            root_id: plugin.root_id.clone(),
            configuration: plugin.configuration.clone(),
        },
        failure_policy: match plugin.failure_policy {
            wasmgate_config::FailurePolicy::FailClosed => FailurePolicy::FailClosed,
            wasmgate_config::FailurePolicy::FailOpen => FailurePolicy::FailOpen,
            wasmgate_config::FailurePolicy::FailReload => FailurePolicy::FailReload,
        },
        reload_backoff: plugin.reload_backoff.base,
        reload_backoff_max: plugin.reload_backoff.max,
    }
}

/// Where a plugin's module comes from, as logs and the admin show it: credentials in the URL
/// redacted.
fn plugin_url(plugin: &PluginSpec) -> String {
    match &plugin.source {
        CodeSource::Local(path) => format!("file://{}", path.display()),
        CodeSource::Remote { uri, .. } => redact_credentials(uri).into_owned(),
    }
}

/// `value` with credentials redacted from every URL in its strings: what `/plugins` and
/// `/config_dump` serve (a remote `uri` in the configuration, an error quoting one).
fn redacted(mut value: serde_json::Value) -> serde_json::Value {
    fn walk(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::String(text) => {
                if let std::borrow::Cow::Owned(clean) = redact_credentials(text) {
                    *text = clean;
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            serde_json::Value::Object(fields) => fields.values_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut value);
    value
}

/// The one log line a fetch failure gets: the URL, the reason, and what the gateway does.
fn log_fetch_failure(plugin: &PluginSpec, reason: &str) {
    tracing::error!(
        plugin = %plugin.name,
        url = %plugin_url(plugin),
        "cannot load the plugin's module: {reason}; {}; retrying in the background",
        failure_action(plugin.failure_policy)
    );
}

/// What the control thread is asked to do.
enum ControlEvent {
    /// Reload the configuration (a file changed, SIGHUP): the reason, for the log.
    Reload(String),
    Stop,
}

/// Counts reloads for `/stats/prometheus`.
#[derive(Default)]
struct ReloadStats {
    generation: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
}

impl ReloadStats {
    fn prometheus(&self) -> String {
        format!(
            "# TYPE wasmgate_config_generation gauge\nwasmgate_config_generation {}\n\
             # TYPE wasmgate_config_reloads_total counter\n\
             wasmgate_config_reloads_total{{result=\"success\"}} {}\n\
             wasmgate_config_reloads_total{{result=\"failure\"}} {}\n",
            self.generation.load(Ordering::Relaxed),
            self.succeeded.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed)
        )
    }
}

/// Serves `prepared` until SIGTERM or SIGINT, then drains requests in flight. Plugins whose module
/// could not be had are retried in the background and swapped in when they arrive. With
/// `config_path`, changes to that file and to `plugins_dir` (and SIGHUP) reload the configuration.
pub fn serve(
    control: Control,
    config: GatewayConfig,
    config_path: Option<PathBuf>,
    prepared: Prepared,
    set_log_filter: Option<wasmgate_dataplane::LogFilterSetter>,
) -> anyhow::Result<()> {
    let stats = Arc::new(GatewayStats::default());
    let plugins = Arc::new(RwLock::new(plugins_json(&prepared.slots)));
    let config_dump = Arc::new(RwLock::new(prepared.config_dump.clone()));
    let fetch_metrics = control.fetcher.metrics().clone();
    let reloads = Arc::new(ReloadStats::default());
    let reload_metrics = reloads.clone();
    let metric_filter = Arc::new(RwLock::new(admin_metric_filter(
        prepared.metric_filter.clone(),
    )));
    let admin = wasmgate_dataplane::start_admin(
        prepared.admin,
        AdminState {
            runtime: control.runtime.clone(),
            stats: stats.clone(),
            config_dump: config_dump.clone(),
            plugins: plugins.clone(),
            set_log_filter,
            extra_metrics: Some(Arc::new(move || {
                fetch_metrics.prometheus() + &reload_metrics.prometheus()
            })),
            metric_filter: metric_filter.clone(),
        },
    )
    .with_context(|| format!("admin: cannot listen on {}", prepared.admin))?;
    // Where each plugin was declared, so a plugin that refuses to start is named with its file.
    let origins: Vec<(String, String)> = prepared
        .slots
        .iter()
        .map(|slot| {
            (
                slot.spec.name.clone(),
                declared_at(&slot.spec.origin, config_path.as_deref()),
            )
        })
        .collect();
    let gateway = match wasmgate_dataplane::start(control.runtime.clone(), prepared.spec, stats) {
        Ok(gateway) => Arc::new(gateway),
        Err(error) => {
            admin.shutdown();
            if let wasmgate_dataplane::StartError::Plugin { plugin, .. } = &error
                && let Some((_, origin)) = origins.iter().find(|(name, _)| name == plugin)
            {
                return Err(anyhow::anyhow!("{origin}: {error}"));
            }
            return Err(error.into());
        }
    };
    // Signal handlers and watching start before readiness is announced, so no SIGTERM, SIGHUP or
    // change that follows the announcement is missed.
    let signals = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut term, mut int, mut hup) = {
        use tokio::signal::unix::{SignalKind, signal};
        let _context = signals.enter();
        (
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
            signal(SignalKind::hangup())?,
        )
    };
    let (events, received) = std::sync::mpsc::channel::<ControlEvent>();
    // Kept alive while serving: dropping it stops the watching.
    let _watcher = match &config_path {
        Some(path) => watch(
            path,
            &control.plugin_dirs(&config),
            &control.secrets_dirs,
            events.clone(),
        ),
        None => None,
    };
    for (name, address) in gateway.addresses() {
        println!("listener {name} on {address}");
    }
    println!("admin on {}", admin.address);
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let background = {
        let gateway = gateway.clone();
        let state = ControlState {
            slots: prepared.slots,
            config,
            config_path,
            metric_filter,
        };
        std::thread::Builder::new()
            .name("wasmgate-control".into())
            .spawn(move || {
                background(
                    &control,
                    state,
                    &gateway,
                    &received,
                    &reloads,
                    |slots, dump| {
                        if let Some(dump) = dump {
                            *config_dump.write() = dump;
                        }
                        let value = plugins_json(slots);
                        config_dump.write()["plugins"] = value.clone();
                        *plugins.write() = value;
                    },
                );
                control.stop();
            })?
    };

    signals.block_on(async {
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => {
                    let _ = events.send(ControlEvent::Reload("SIGHUP".into()));
                }
            }
        }
        Ok::<_, std::io::Error>(())
    })?;
    eprintln!("shutting down: draining requests in flight");
    let _ = events.send(ControlEvent::Stop);
    let _ = background.join();
    if let Ok(gateway) = Arc::try_unwrap(gateway) {
        gateway.shutdown();
    }
    admin.shutdown();
    Ok(())
}

/// Watches the config file, the plugin folders and the secret folders; each change asks for a
/// reload.
fn watch(
    config_path: &Path,
    plugin_dirs: &[PathBuf],
    secrets_dirs: &[PathBuf],
    events: std::sync::mpsc::Sender<ControlEvent>,
) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
    let config_path = canonical(config_path);
    // A changed secret matters too: a plugin whose pull failed for want of it is tried again.
    let dirs: Vec<PathBuf> = plugin_dirs
        .iter()
        .chain(secrets_dirs)
        .map(|d| canonical(d))
        .collect();
    let watched_config = config_path.clone();
    let watched_dirs = dirs.clone();
    let handler = move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        let relevant = event.paths.iter().find(|path| {
            *path == &watched_config || watched_dirs.iter().any(|dir| path.starts_with(dir))
        });
        if let Some(path) = relevant {
            let _ = events.send(ControlEvent::Reload(format!("{} changed", path.display())));
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(watcher) => watcher,
        Err(error) => {
            tracing::warn!("cannot watch the configuration for changes ({error}); SIGHUP reloads");
            return None;
        }
    };
    // The folder, not the file: editors and `kubectl` replace files by renaming over them.
    let config_dir = config_path.parent().unwrap_or(Path::new("/"));
    for dir in std::iter::once(config_dir).chain(dirs.iter().map(PathBuf::as_path)) {
        if let Err(error) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            tracing::warn!(
                "cannot watch {} for changes ({error}); SIGHUP reloads",
                dir.display()
            );
        }
    }
    Some(watcher)
}

/// Each plugin's entry for `/plugins` and `/config_dump`, with its place in its listener's chain
/// (0 runs first on requests).
fn plugins_json(slots: &[Slot]) -> serde_json::Value {
    let mut places: Vec<(&str, usize)> = Vec::new();
    let entries: Vec<serde_json::Value> = slots
        .iter()
        .map(|slot| {
            let place = match places.iter_mut().find(|(l, _)| *l == slot.listener) {
                Some((_, next)) => {
                    *next += 1;
                    *next - 1
                }
                None => {
                    places.push((&slot.listener, 1));
                    0
                }
            };
            let mut value = slot.json();
            value["chain_position"] = json!(place);
            value
        })
        .collect();
    redacted(json!(entries))
}

/// Longest wait between two background fetch attempts for one plugin.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(300);

/// Changes arriving within this window after a first one are taken in the same reload (an editor
/// or `cp` writes a file in several steps).
const RELOAD_SETTLE: Duration = Duration::from_millis(150);

/// What the control thread keeps between events.
struct ControlState {
    slots: Vec<Slot>,
    config: GatewayConfig,
    config_path: Option<PathBuf>,
    /// The admin's `stats_matcher` filter, replaced by a reload.
    metric_filter: Arc<RwLock<Option<wasmgate_dataplane::MetricFilter>>>,
}

/// The admin server's form of a compiled `stats_matcher`.
fn admin_metric_filter(
    filter: Option<wasmgate_config::MetricFilter>,
) -> Option<wasmgate_dataplane::MetricFilter> {
    filter.map(|filter| {
        Arc::new(move |name: &str| filter.allows(name)) as wasmgate_dataplane::MetricFilter
    })
}

/// The control thread's loop: reloads the configuration when asked, retries failed plugins with
/// exponential backoff and swaps each into its listener's chain when its module arrives, and
/// purges the cache of unused modules.
fn background(
    control: &Control,
    mut state: ControlState,
    gateway: &GatewayHandle,
    events: &std::sync::mpsc::Receiver<ControlEvent>,
    reloads: &ReloadStats,
    publish: impl Fn(&[Slot], Option<serde_json::Value>),
) {
    use std::sync::mpsc::RecvTimeoutError;
    let purge_every = control.purge_interval.max(Duration::from_secs(1));
    let mut next_purge = Instant::now() + purge_every;
    loop {
        let next_retry = state
            .slots
            .iter()
            .filter(|s| s.needs_retry())
            .map(|s| s.next_retry)
            .min();
        let wake = next_retry.map_or(next_purge, |retry| retry.min(next_purge));
        match events.recv_timeout(wake.saturating_duration_since(Instant::now())) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(ControlEvent::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Ok(ControlEvent::Reload(reason)) => {
                let mut reasons = vec![reason];
                let settle = Instant::now() + RELOAD_SETTLE;
                loop {
                    match events.recv_timeout(settle.saturating_duration_since(Instant::now())) {
                        Ok(ControlEvent::Reload(more)) => reasons.push(more),
                        Ok(ControlEvent::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                        Err(RecvTimeoutError::Timeout) => break,
                    }
                }
                reasons.dedup();
                match reload(control, &mut state, gateway) {
                    Ok(dump) => {
                        let generation = reloads.generation.fetch_add(1, Ordering::Relaxed) + 1;
                        reloads.succeeded.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(
                            generation,
                            "configuration reloaded ({})",
                            reasons.join(", ")
                        );
                        publish(&state.slots, Some(dump));
                    }
                    Err(error) => {
                        reloads.failed.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(
                            "configuration reload refused, the serving configuration stays ({}): {error:#}",
                            reasons.join(", ")
                        );
                    }
                }
                continue;
            }
        }
        let now = Instant::now();
        if now >= next_purge {
            next_purge = now + purge_every;
            // What serves is kept whatever its age: it was read once at load and serves from
            // memory since, so its last use in the cache says nothing.
            let in_use: Vec<String> = state
                .slots
                .iter()
                .filter_map(|slot| match &slot.state {
                    SlotState::Loaded { sha256, .. } => Some(sha256.clone()),
                    SlotState::Failed { .. } => None,
                })
                .collect();
            match control
                .fetcher
                .cache()
                .prune_keeping(control.cache_expiry, &in_use)
            {
                Ok(removed) if !removed.is_empty() => {
                    tracing::info!(
                        modules = removed.len(),
                        "removed modules unused for {:?}",
                        control.cache_expiry
                    );
                }
                Ok(_) => {}
                Err(error) => tracing::warn!("cannot purge the module cache: {error}"),
            }
            control
                .fetcher
                .metrics()
                .set_cache_entries(control.fetcher.cache().len());
        }
        let mut changed: Vec<String> = Vec::new();
        for slot in &mut state.slots {
            if !slot.needs_retry() || slot.next_retry > now {
                continue;
            }
            slot.retries += 1;
            match load_plugin(&slot.spec, control) {
                Ok(loaded @ SlotState::Loaded { .. }) => {
                    tracing::info!(
                        plugin = %slot.spec.name,
                        retries = slot.retries,
                        "the plugin's module is loaded; the plugin now serves"
                    );
                    slot.state = loaded;
                    slot.outdated = None;
                    if !changed.contains(&slot.listener) {
                        changed.push(slot.listener.clone());
                    }
                }
                Ok(SlotState::Failed { reason }) => {
                    let backoff = control
                        .retry_initial_backoff
                        .saturating_mul(1 << slot.retries.min(16))
                        .min(MAX_RETRY_BACKOFF);
                    tracing::debug!(plugin = %slot.spec.name, retries = slot.retries, ?backoff, "still cannot load the module: {reason}");
                    slot.next_retry = Instant::now() + backoff;
                    if slot.outdated.is_some() {
                        slot.outdated = Some(reason);
                    } else {
                        slot.state = SlotState::Failed { reason };
                    }
                }
                Err(error) => {
                    tracing::debug!(plugin = %slot.spec.name, "still cannot load the module: {error:#}");
                    slot.next_retry = Instant::now() + MAX_RETRY_BACKOFF;
                }
            }
        }
        for listener in &changed {
            let tcp_proxy = state
                .config
                .listeners
                .iter()
                .any(|l| l.name == *listener && l.tcp_proxy.is_some());
            if let Err(error) = swap_chains(gateway, &state.slots, listener, tcp_proxy) {
                tracing::error!(listener, "cannot swap in the new chain: {error}");
            }
        }
        if !changed.is_empty() {
            publish(&state.slots, None);
        }
    }
}

/// Where a plugin was declared, with the gateway configuration's file for its own filters.
fn declared_at(origin: &wasmgate_config::PluginOrigin, config_path: Option<&Path>) -> String {
    use wasmgate_config::PluginOrigin;
    match (origin, config_path) {
        (
            PluginOrigin::EnvoyFilter { .. } | PluginOrigin::EnvoyNetworkFilter { .. },
            Some(path),
        ) => format!("{}: {origin}", path.display()),
        _ => origin.to_string(),
    }
}

/// Builds the configuration on disk beside the serving one (manifests read, modules fetched and
/// compiled, plugins started once), then swaps each listener's chain. Returns the new
/// `/config_dump`. On error nothing changed.
fn reload(
    control: &Control,
    state: &mut ControlState,
    gateway: &GatewayHandle,
) -> anyhow::Result<serde_json::Value> {
    let Some(path) = &state.config_path else {
        bail!("the built-in quickstart has no configuration file to reload");
    };
    let config = GatewayConfig::load(path).map_err(|errors| anyhow::anyhow!("{errors}"))?;
    let prepared = prepare(&config, control, &state.slots)?;
    if let Some(what) = needs_restart(&state.config, &config) {
        tracing::warn!(
            "{what} changed: that takes effect on restart; plugins, listeners, routes and \
             clusters apply now"
        );
    }
    let plan = ListenerPlan::new(&state.config, &config);
    // New sockets first: an address that cannot be bound refuses the reload before anything
    // changed. A listener that keeps its address but changes how it serves is bound after its
    // old self closed.
    let mut bound = Vec::new();
    for (index, listener) in prepared.spec.listeners.iter().enumerate() {
        if plan.binds_first(&listener.name) {
            bound.push(
                gateway
                    .bind(index, listener.clone())
                    .context("binding a new listener")?,
            );
        }
    }
    // Clusters and routes before chains: a new plugin may call a new cluster at once.
    if routing_changed(&state.config, &config, &plan.kept) {
        let routes = prepared
            .spec
            .listeners
            .iter()
            .filter(|l| plan.kept.contains(&l.name))
            .map(|l| {
                let routing = match &l.tcp_proxy {
                    Some(proxy) => ListenerRouting::Tcp(proxy.clone()),
                    None => ListenerRouting::Http(l.routes.clone()),
                };
                (l.name.clone(), routing)
            })
            .collect();
        gateway
            .update_routing(routes, prepared.spec.clusters.clone())
            .context("applying the new routes and clusters")?;
        tracing::info!("routes and clusters updated");
    }
    for listener in &prepared.spec.listeners {
        if !plan.kept.contains(&listener.name) {
            continue;
        }
        swap_chains(
            gateway,
            &prepared.slots,
            &listener.name,
            listener.tcp_proxy.is_some(),
        )
        .with_context(|| format!("listener {}", listener.name))?;
    }
    for name in plan.removed.iter().chain(&plan.replaced) {
        gateway
            .remove_listener(name)
            .with_context(|| format!("removing listener {name}"))?;
        tracing::info!(listener = %name, "listener stopped; its requests in flight finish");
    }
    for (index, listener) in prepared.spec.listeners.iter().enumerate() {
        if plan.replaced.contains(&listener.name) && !plan.binds_first(&listener.name) {
            bound.push(
                gateway
                    .bind(index, listener.clone())
                    .context("binding a changed listener")?,
            );
        }
    }
    for listener in bound {
        let name = listener.name().to_owned();
        let address = gateway
            .add_listener(listener)
            .with_context(|| format!("starting listener {name}"))?;
        tracing::info!(listener = %name, %address, "listener started");
        // The same line start-up prints, for whoever reads the addresses from stdout.
        println!("listener {name} on {address}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
    state.slots = prepared.slots;
    *state.metric_filter.write() = admin_metric_filter(prepared.metric_filter);
    state.config = config;
    Ok(prepared.config_dump)
}

/// How a reload changes the set of listeners, by name.
struct ListenerPlan {
    /// In both configurations and serving the same way: their chains, routes and TCP targets
    /// are swapped in place.
    kept: Vec<String>,
    /// Gone from the new configuration.
    removed: Vec<String>,
    /// Only in the new configuration.
    added: Vec<String>,
    /// In both, but with another address, TLS, limits, mode or kind (HTTP or TCP proxy): the
    /// old one stops and the new one starts.
    replaced: Vec<String>,
    /// The addresses of the replaced listeners before the reload, by name.
    old_addresses: Vec<(String, SocketAddr)>,
    new_addresses: Vec<(String, SocketAddr)>,
}

impl ListenerPlan {
    fn new(old: &GatewayConfig, new: &GatewayConfig) -> Self {
        let mut plan = ListenerPlan {
            kept: Vec::new(),
            removed: Vec::new(),
            added: Vec::new(),
            replaced: Vec::new(),
            old_addresses: old
                .listeners
                .iter()
                .map(|l| (l.name.clone(), l.address))
                .collect(),
            new_addresses: new
                .listeners
                .iter()
                .map(|l| (l.name.clone(), l.address))
                .collect(),
        };
        for listener in &new.listeners {
            match old.listeners.iter().find(|l| l.name == listener.name) {
                None => plan.added.push(listener.name.clone()),
                Some(before) if serving(before) == serving(listener) => {
                    plan.kept.push(listener.name.clone())
                }
                Some(_) => plan.replaced.push(listener.name.clone()),
            }
        }
        for listener in &old.listeners {
            if !new.listeners.iter().any(|l| l.name == listener.name) {
                plan.removed.push(listener.name.clone());
            }
        }
        plan
    }

    /// Whether `name`'s new socket is bound before anything changes: every new listener, and a
    /// replaced one unless it keeps an address that a listener being removed or replaced holds
    /// (a fixed port cannot be bound twice).
    fn binds_first(&self, name: &str) -> bool {
        let address =
            |list: &[(String, SocketAddr)]| list.iter().find(|(n, _)| n == name).map(|(_, a)| *a);
        if !self.added.iter().chain(&self.replaced).any(|n| n == name) {
            return false;
        }
        let Some(new) = address(&self.new_addresses) else {
            return false;
        };
        let released = self
            .removed
            .iter()
            .chain(&self.replaced)
            .filter_map(|n| {
                self.old_addresses
                    .iter()
                    .find(|(old, _)| old == n)
                    .map(|(_, a)| *a)
            })
            .any(|old| old == new && new.port() != 0);
        !released
    }
}

/// What makes a listener the same listener: everything but its plugins, routes and TCP target.
fn serving(listener: &wasmgate_config::Listener) -> wasmgate_config::Listener {
    let mut listener = listener.clone();
    listener.http_filters.clear();
    listener.network_filters.clear();
    listener.routes.clear();
    // Turning a listener into a TCP proxy or back replaces it; its target does not.
    if let Some(proxy) = &mut listener.tcp_proxy {
        proxy.cluster.clear();
        proxy.sni_routes.clear();
    }
    listener
}

/// Swaps a listener's chains on every worker for those `slots` describe.
fn swap_chains(
    gateway: &GatewayHandle,
    slots: &[Slot],
    listener: &str,
    tcp_proxy: bool,
) -> Result<(), wasmgate_dataplane::StartError> {
    let (filters, mut missing) = listener_chain(slots, listener, ChainKind::Http);
    let (network, network_missing) = listener_chain(slots, listener, ChainKind::Network);
    missing.extend(network_missing);
    if tcp_proxy {
        gateway.update_network_chain(listener, network, missing)
    } else {
        // Network plugins on an HTTP listener run before its HTTP codec; a missing FAIL_CLOSE
        // one denies through the HTTP chain's list.
        gateway.update_network_chain(listener, network, Vec::new())?;
        gateway.update_chain(listener, filters, missing)
    }
}

/// Whether the clusters, or the routes or TCP proxy target of a listener kept across a reload,
/// changed.
fn routing_changed(old: &GatewayConfig, new: &GatewayConfig, kept: &[String]) -> bool {
    let routing = |config: &GatewayConfig, name: &str| {
        config
            .listeners
            .iter()
            .find(|l| l.name == name)
            .map(|l| (l.routes.clone(), l.tcp_proxy.clone()))
    };
    old.clusters != new.clusters
        || kept
            .iter()
            .any(|name| routing(old, name) != routing(new, name))
}

/// What changed that a reload does not apply (it applies plugins, listeners, routes and
/// clusters).
fn needs_restart(old: &GatewayConfig, new: &GatewayConfig) -> Option<&'static str> {
    if old.workers != new.workers || old.admin != new.admin {
        Some("workers or admin")
    } else if old.module_fetch != new.module_fetch
        || old.module_cache != new.module_cache
        || old.insecure_registries != new.insecure_registries
        || old.pull_secrets_dir != new.pull_secrets_dir
        || old.kubernetes != new.kubernetes
        || old.plugin_limits != new.plugin_limits
    {
        Some(
            "module_fetch, module_cache, insecure_registries, pull_secrets_dir, kubernetes or \
             plugin_limits",
        )
    } else {
        None
    }
}
