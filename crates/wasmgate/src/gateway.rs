//! `wasmgate run`: the configuration turned into a running gateway (the control side, in small):
//! parse and validate, read and compile each plugin's module, build the data plane's snapshot,
//! start the workers and the admin server, and drain on SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use parking_lot::RwLock;
use serde_json::json;
use wasmgate_config::{
    CodeSource, GatewayConfig, PathMatcher, PluginSpec, RouteAction as ConfigAction,
};
use wasmgate_dataplane::{
    AdminState, ClusterSpec, FailurePolicy, FilterSpec, GatewayHandle, GatewaySpec, GatewayStats,
    Limits, ListenerSpec, PathMatch, RouteAction, RouteSpec, TlsFiles, UpstreamTls,
};
use wasmgate_fetch::{
    Cache, DockerConfig, FetchError, FetchErrorKind, FetchOptions, Fetched, Fetcher, ModuleRequest,
    ModuleUrl, PullPolicy,
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

/// What the control side works with: the engine, the module fetcher and its cache.
pub struct Control {
    pub runtime: Arc<Runtime>,
    pub fetcher: Arc<Fetcher>,
    /// Runs fetches for the control thread (module downloads are async).
    io: tokio::runtime::Runtime,
    pull_secrets_dir: Option<PathBuf>,
    retry_initial_backoff: Duration,
    cache_expiry: Duration,
    purge_interval: Duration,
}

impl Control {
    pub fn new(config: &GatewayConfig) -> anyhow::Result<Self> {
        let cache = Cache::open(cache_root(config)).map_err(|e| anyhow::anyhow!("{e}"))?;
        let runtime = Runtime::new(RuntimeConfig {
            cache_dir: Some(cache.modules_dir()),
            ..Default::default()
        })?;
        let fetcher = Fetcher::new(fetch_options(config)?, Arc::new(cache))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Self {
            runtime,
            fetcher: Arc::new(fetcher),
            io: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            pull_secrets_dir: config.pull_secrets_dir.clone(),
            retry_initial_backoff: config.module_fetch.retry_initial_backoff,
            cache_expiry: config.module_cache.expiry,
            purge_interval: config.module_cache.purge_interval,
        })
    }

    /// The dockerconfigjson an `imagePullSecret` names, from `pull_secrets_dir`.
    fn pull_secret(&self, name: &str) -> Result<DockerConfig, String> {
        let Some(dir) = &self.pull_secrets_dir else {
            return Err(format!(
                "imagePullSecret {name:?} is set but the gateway has no pull_secrets_dir"
            ));
        };
        let candidates = [dir.join(name), dir.join(format!("{name}.json"))];
        let Some(path) = candidates.iter().find(|p| p.is_file()) else {
            return Err(format!(
                "imagePullSecret {name:?}: no file {name} or {name}.json in {}",
                dir.display()
            ));
        };
        DockerConfig::from_file(path).map_err(|e| format!("imagePullSecret {name:?}: {e}"))
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
            Err(error) => match self.stale_copy(uri, &error) {
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
    fn stale_copy(&self, uri: &str, error: &FetchError) -> Option<Fetched> {
        if !matches!(
            error.kind,
            FetchErrorKind::DownloadFailure | FetchErrorKind::ManifestFailure
        ) {
            return None;
        }
        let cache = self.fetcher.cache();
        let key = match ModuleUrl::parse(uri).ok()? {
            ModuleUrl::Oci(reference) => reference.to_string(),
            _ => uri.to_owned(),
        };
        let entry = cache.url(&key)?;
        let bytes = cache.get(&entry.sha256)?;
        tracing::warn!(
            url = uri,
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
pub struct Slot {
    pub listener: String,
    pub spec: PluginSpec,
    pub state: SlotState,
    /// Background retries so far, and when the next one is due.
    retries: u32,
    next_retry: Instant,
}

pub enum SlotState {
    Loaded { filter: FilterSpec, sha256: String },
    Failed { reason: String },
}

impl Slot {
    fn json(&self) -> serde_json::Value {
        let mut value = json!({
            "name": self.spec.name,
            "listener": self.listener,
            "origin": self.spec.origin.to_string(),
            "url": match &self.spec.source {
                CodeSource::Local(path) => format!("file://{}", path.display()),
                CodeSource::Remote { uri, .. } => uri.clone(),
            },
            "root_id": self.spec.root_id,
            "vm_id": self.spec.vm_id,
            "failure_policy": format!("{:?}", self.spec.failure_policy),
        });
        match &self.state {
            SlotState::Loaded { sha256, .. } => {
                value["sha256"] = json!(sha256);
                value["state"] = json!("loaded");
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
fn listener_chain(slots: &[Slot], listener: &str) -> (Vec<FilterSpec>, Vec<String>) {
    let mut filters = Vec::new();
    let mut missing = Vec::new();
    for slot in slots.iter().filter(|s| s.listener == listener) {
        match &slot.state {
            SlotState::Loaded { filter, .. } => filters.push(filter.clone()),
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
}

/// Reads, validates, fetches and compiles. A configuration error or a local module that does not
/// load stops start-up with the file, field and reason; a remote module that cannot be had leaves
/// its plugin failed (see [`Slot`]) and is retried in the background once serving.
pub fn prepare(config: &GatewayConfig, control: &Control) -> anyhow::Result<Prepared> {
    let started = Instant::now();
    let wasm_plugins = match &config.plugins_dir {
        Some(dir) => wasmgate_config::load_wasm_plugins(dir).map_err(|e| anyhow::anyhow!("{e}"))?,
        None => Vec::new(),
    };
    let mut listeners = Vec::new();
    let mut slots = Vec::new();
    for (index, listener) in config.listeners.iter().enumerate() {
        for plugin in config.chain_for_listener(index, &wasm_plugins) {
            let state = load_plugin(&plugin, control)?;
            if let SlotState::Failed { reason } = &state {
                log_fetch_failure(&plugin, reason);
            }
            slots.push(Slot {
                listener: listener.name.clone(),
                spec: plugin,
                state,
                retries: 0,
                next_retry: Instant::now() + control.retry_initial_backoff,
            });
        }
        let (filters, missing_plugins) = listener_chain(&slots, &listener.name);
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
    let config_dump = json!({
        "config": config,
        "plugins": slots.iter().map(Slot::json).collect::<Vec<_>>(),
    });
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
    })
}

fn nonzero_or(value: Duration, otherwise: Duration) -> Duration {
    if value.is_zero() { otherwise } else { value }
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
    Ok(SlotState::Loaded { filter, sha256 })
}

fn filter_spec(plugin: &PluginSpec, module: Arc<CompiledModule>) -> FilterSpec {
    FilterSpec {
        name: plugin.name.clone(),
        module,
        vm: VmConfig {
            vm_id: plugin.vm_id.clone(),
            configuration: plugin.vm_configuration.clone(),
            environment: plugin.environment.clone(),
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
    }
}

/// The one log line a fetch failure gets: the URL, the reason, and what the gateway does.
fn log_fetch_failure(plugin: &PluginSpec, reason: &str) {
    let url = match &plugin.source {
        CodeSource::Remote { uri, .. } => uri.as_str(),
        CodeSource::Local(_) => "",
    };
    tracing::error!(
        plugin = %plugin.name,
        url,
        "cannot load the plugin's module: {reason}; {}; retrying in the background",
        failure_action(plugin.failure_policy)
    );
}

/// Serves `prepared` until SIGTERM or SIGINT, then drains requests in flight. Plugins whose module
/// could not be had are retried in the background and swapped in when they arrive.
pub fn serve(
    control: Control,
    prepared: Prepared,
    set_log_filter: Option<wasmgate_dataplane::LogFilterSetter>,
) -> anyhow::Result<()> {
    let stats = Arc::new(GatewayStats::default());
    let plugins = Arc::new(RwLock::new(plugins_json(&prepared.slots)));
    let config_dump = Arc::new(RwLock::new(prepared.config_dump.clone()));
    let fetch_metrics = control.fetcher.metrics().clone();
    let admin = wasmgate_dataplane::start_admin(
        prepared.admin,
        AdminState {
            runtime: control.runtime.clone(),
            stats: stats.clone(),
            config_dump: config_dump.clone(),
            plugins: plugins.clone(),
            set_log_filter,
            extra_metrics: Some(Arc::new(move || fetch_metrics.prometheus())),
        },
    )
    .with_context(|| format!("admin: cannot listen on {}", prepared.admin))?;
    let gateway = match wasmgate_dataplane::start(control.runtime.clone(), prepared.spec, stats) {
        Ok(gateway) => Arc::new(gateway),
        Err(error) => {
            admin.shutdown();
            return Err(error.into());
        }
    };
    for (name, address) in gateway.addresses() {
        println!("listener {name} on {address}");
    }
    println!("admin on {}", admin.address);
    use std::io::Write;
    let _ = std::io::stdout().flush();

    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let background = {
        let gateway = gateway.clone();
        let slots = prepared.slots;
        std::thread::Builder::new()
            .name("wasmgate-control".into())
            .spawn(move || {
                background(&control, slots, &gateway, &stopped, |slots| {
                    let value = plugins_json(slots);
                    config_dump.write()["plugins"] = value.clone();
                    *plugins.write() = value;
                });
            })?
    };

    let signals = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    signals.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        Ok::<_, std::io::Error>(())
    })?;
    eprintln!("shutting down: draining requests in flight");
    drop(stop);
    let _ = background.join();
    if let Ok(gateway) = Arc::try_unwrap(gateway) {
        gateway.shutdown();
    }
    admin.shutdown();
    Ok(())
}

fn plugins_json(slots: &[Slot]) -> serde_json::Value {
    json!(slots.iter().map(Slot::json).collect::<Vec<_>>())
}

/// Longest wait between two background fetch attempts for one plugin.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(300);

/// The control thread's loop: retries failed plugins with exponential backoff, swaps each into
/// its listener's chain when its module arrives, and purges the cache of unused modules.
fn background(
    control: &Control,
    mut slots: Vec<Slot>,
    gateway: &GatewayHandle,
    stop: &std::sync::mpsc::Receiver<()>,
    publish: impl Fn(&[Slot]),
) {
    let purge_every = control.purge_interval.max(Duration::from_secs(1));
    let mut next_purge = Instant::now() + purge_every;
    loop {
        let next_retry = slots
            .iter()
            .filter(|s| matches!(s.state, SlotState::Failed { .. }))
            .map(|s| s.next_retry)
            .min();
        let wake = next_retry.map_or(next_purge, |retry| retry.min(next_purge));
        match stop.recv_timeout(wake.saturating_duration_since(Instant::now())) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let now = Instant::now();
        if now >= next_purge {
            next_purge = now + purge_every;
            match control.fetcher.cache().prune(control.cache_expiry) {
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
        for slot in &mut slots {
            if !matches!(slot.state, SlotState::Failed { .. }) || slot.next_retry > now {
                continue;
            }
            slot.retries += 1;
            match load_plugin(&slot.spec, control) {
                Ok(state @ SlotState::Loaded { .. }) => {
                    tracing::info!(
                        plugin = %slot.spec.name,
                        retries = slot.retries,
                        "the plugin's module is loaded; the plugin now serves"
                    );
                    slot.state = state;
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
                    slot.state = SlotState::Failed { reason };
                }
                Err(error) => {
                    tracing::debug!(plugin = %slot.spec.name, "still cannot load the module: {error:#}");
                    slot.next_retry = Instant::now() + MAX_RETRY_BACKOFF;
                }
            }
        }
        for listener in &changed {
            let (filters, missing) = listener_chain(&slots, listener);
            if let Err(error) = gateway.update_chain(listener, filters, missing) {
                tracing::error!(listener, "cannot swap in the new chain: {error}");
            }
        }
        if !changed.is_empty() {
            publish(&slots);
        }
    }
}
