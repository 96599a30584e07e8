//! `wasmgate run`: the configuration turned into a running gateway (the control side, in small):
//! parse and validate, read and compile each plugin's module, build the data plane's snapshot,
//! start the workers and the admin server, and drain on SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use parking_lot::RwLock;
use serde_json::json;
use wasmgate_config::{
    CodeSource, GatewayConfig, PathMatcher, PluginSpec, RouteAction as ConfigAction,
};
use wasmgate_dataplane::{
    AdminState, ClusterSpec, FailurePolicy, FilterSpec, GatewaySpec, GatewayStats, Limits,
    ListenerSpec, PathMatch, RouteAction, RouteSpec, TlsFiles, UpstreamTls,
};
use wasmgate_runtime::{PluginConfig, Runtime, RuntimeConfig, VmConfig};

/// Where compiled modules are kept between runs: `$WASMGATE_CACHE_DIR`, else the user's cache folder.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("WASMGATE_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("wasmgate").join("compiled"))
}

pub fn new_runtime() -> anyhow::Result<Arc<Runtime>> {
    Ok(Runtime::new(RuntimeConfig {
        cache_dir: cache_dir(),
        ..Default::default()
    })?)
}

/// A plugin as it was loaded, for `/plugins`.
pub struct LoadedPlugin {
    pub listener: String,
    pub spec: PluginSpec,
    pub sha256: String,
}

/// Everything `run` builds from a configuration before it serves.
pub struct Prepared {
    pub spec: GatewaySpec,
    pub admin: SocketAddr,
    pub config_dump: serde_json::Value,
    pub plugins: Vec<LoadedPlugin>,
}

/// Reads, validates and compiles: any error here stops start-up with the file, field and reason.
pub fn prepare(config: &GatewayConfig, runtime: &Runtime) -> anyhow::Result<Prepared> {
    let wasm_plugins = match &config.plugins_dir {
        Some(dir) => wasmgate_config::load_wasm_plugins(dir).map_err(|e| anyhow::anyhow!("{e}"))?,
        None => Vec::new(),
    };
    let mut listeners = Vec::new();
    let mut loaded = Vec::new();
    for (index, listener) in config.listeners.iter().enumerate() {
        let mut filters = Vec::new();
        for plugin in config.chain_for_listener(index, &wasm_plugins) {
            let (filter, sha256) = compile_filter(&plugin, runtime)?;
            filters.push(filter);
            loaded.push(LoadedPlugin {
                listener: listener.name.clone(),
                spec: plugin,
                sha256,
            });
        }
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
            missing_plugins: Vec::new(),
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
        "plugins": loaded.iter().map(plugin_json).collect::<Vec<_>>(),
    });
    Ok(Prepared {
        spec: GatewaySpec {
            workers: config.workers.max(1),
            listeners,
            clusters,
        },
        admin: config.admin,
        config_dump,
        plugins: loaded,
    })
}

fn nonzero_or(value: Duration, otherwise: Duration) -> Duration {
    if value.is_zero() { otherwise } else { value }
}

fn compile_filter(plugin: &PluginSpec, runtime: &Runtime) -> anyhow::Result<(FilterSpec, String)> {
    let path = match &plugin.source {
        CodeSource::Local(path) => path,
        CodeSource::Remote { uri, .. } => bail!(
            "plugin {} ({}): fetching modules from {uri} is not supported by this build yet; use a local file",
            plugin.name,
            plugin.origin
        ),
    };
    let bytes =
        read_module(path).with_context(|| format!("plugin {} ({})", plugin.name, plugin.origin))?;
    let module = runtime.load(&bytes).with_context(|| {
        format!(
            "plugin {} ({}): {}",
            plugin.name,
            plugin.origin,
            path.display()
        )
    })?;
    let sha256 = module.sha256().to_owned();
    let filter = FilterSpec {
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
    };
    Ok((filter, sha256))
}

fn read_module(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn plugin_json(plugin: &LoadedPlugin) -> serde_json::Value {
    json!({
        "name": plugin.spec.name,
        "listener": plugin.listener,
        "origin": plugin.spec.origin.to_string(),
        "url": match &plugin.spec.source {
            CodeSource::Local(path) => format!("file://{}", path.display()),
            CodeSource::Remote { uri, .. } => uri.clone(),
        },
        "sha256": plugin.sha256,
        "root_id": plugin.spec.root_id,
        "vm_id": plugin.spec.vm_id,
        "failure_policy": format!("{:?}", plugin.spec.failure_policy),
    })
}

/// Serves `prepared` until SIGTERM or SIGINT, then drains requests in flight.
pub fn serve(
    runtime: Arc<Runtime>,
    prepared: Prepared,
    set_log_filter: Option<wasmgate_dataplane::LogFilterSetter>,
) -> anyhow::Result<()> {
    let stats = Arc::new(GatewayStats::default());
    let plugins = Arc::new(RwLock::new(json!([])));
    let admin = wasmgate_dataplane::start_admin(
        prepared.admin,
        AdminState {
            runtime: runtime.clone(),
            stats: stats.clone(),
            config_dump: Arc::new(RwLock::new(prepared.config_dump.clone())),
            plugins: plugins.clone(),
            set_log_filter,
        },
    )
    .with_context(|| format!("admin: cannot listen on {}", prepared.admin))?;
    let gateway = match wasmgate_dataplane::start(runtime, prepared.spec.clone(), stats) {
        Ok(gateway) => gateway,
        Err(error) => {
            admin.shutdown();
            return Err(error.into());
        }
    };
    *plugins.write() = json!(
        prepared
            .plugins
            .iter()
            .map(|p| {
                let mut value = plugin_json(p);
                value["state"] = json!("loaded");
                value
            })
            .collect::<Vec<_>>()
    );
    for (name, address) in gateway.addresses() {
        println!("listener {name} on {address}");
    }
    println!("admin on {}", admin.address);
    use std::io::Write;
    let _ = std::io::stdout().flush();
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
    gateway.shutdown();
    admin.shutdown();
    Ok(())
}
