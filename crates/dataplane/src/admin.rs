//! The admin server on its own address and thread, as Envoy's: readiness, Prometheus stats, log
//! levels at run time, the effective configuration, and the plugins' state.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use parking_lot::RwLock;
use tokio::sync::watch;
use wasmgate_abi::LogLevel;
use wasmgate_runtime::Runtime;

use crate::stats::GatewayStats;

/// Changes the gateway's own log filter (a tracing reload handle, say).
pub type LogFilterSetter = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Whether `/stats/prometheus` shows a plugin-defined metric, by the name the plugin gave it.
pub type MetricFilter = Arc<dyn Fn(&str) -> bool + Send + Sync>;

#[derive(Clone)]
pub struct AdminState {
    pub runtime: Arc<Runtime>,
    pub stats: Arc<GatewayStats>,
    /// `/config_dump`: the effective configuration, secrets already removed.
    pub config_dump: Arc<RwLock<serde_json::Value>>,
    /// `/plugins`: url, sha256 and state of each plugin.
    pub plugins: Arc<RwLock<serde_json::Value>>,
    pub set_log_filter: Option<LogFilterSetter>,
    /// More Prometheus text appended to `/stats/prometheus` (the module fetcher's metrics, say).
    pub extra_metrics: Option<Arc<dyn Fn() -> String + Send + Sync>>,
    /// Which plugin-defined metrics to show (the config's `stats_matcher`); all when `None`. A
    /// reload replaces it.
    pub metric_filter: Arc<RwLock<Option<MetricFilter>>>,
}

pub struct AdminHandle {
    pub address: SocketAddr,
    shutdown: watch::Sender<bool>,
    thread: std::thread::JoinHandle<()>,
}

impl AdminHandle {
    pub fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.thread.join();
    }
}

pub fn start_admin(address: SocketAddr, state: AdminState) -> std::io::Result<AdminHandle> {
    let socket = std::net::TcpListener::bind(address)?;
    socket.set_nonblocking(true)?;
    let address = socket.local_addr()?;
    let (shutdown, mut stop) = watch::channel(false);
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let thread = std::thread::Builder::new()
        .name("wasmgate-admin".into())
        .spawn(move || {
            tokio.block_on(async move {
                let Ok(socket) = tokio::net::TcpListener::from_std(socket) else {
                    return;
                };
                loop {
                    let accepted = tokio::select! {
                        accepted = socket.accept() => accepted,
                        _ = stop.changed() => return,
                    };
                    let Ok((stream, _)) = accepted else { continue };
                    let state = state.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |request| {
                            let state = state.clone();
                            async move { Ok::<_, Infallible>(serve(&state, request)) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        })?;
    Ok(AdminHandle {
        address,
        shutdown,
        thread,
    })
}

fn text(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        content_type.parse().expect("valid content type"),
    );
    response
}

fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_string_pretty(value).unwrap_or_else(|_| "null".into());
    text(StatusCode::OK, "application/json", body + "\n")
}

fn serve(state: &AdminState, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let query = request.uri().query().unwrap_or("");
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/ready") => text(StatusCode::OK, "text/plain", "LIVE\n"),
        (&Method::GET, "/stats/prometheus") => text(StatusCode::OK, "text/plain; version=0.0.4", {
            let metrics = &state.runtime.shared().metrics;
            let filter = state.metric_filter.read().clone();
            let mut text = match &filter {
                Some(filter) => state.stats.prometheus_filtered(metrics, filter.as_ref()),
                None => state.stats.prometheus(metrics),
            };
            if let Some(extra) = &state.extra_metrics {
                text.push_str(&extra());
            }
            text
        }),
        (&Method::GET, "/config_dump") => json(&state.config_dump.read()),
        // Envoy's `/listeners`: `name::address` per line, or JSON with `?format=json`.
        (&Method::GET, "/listeners") => listeners(state, query),
        (&Method::GET, "/plugins") => json(&with_vm_health(state)),
        (&Method::GET, "/logging") => text(StatusCode::OK, "text/plain", loggers(state)),
        (&Method::POST, "/logging") => set_logging(state, query),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// `/plugins` with each plugin's run-time VM health: failures, failed VMs now, FAIL_RELOAD's
/// rebuilds, and the last failure's reason.
fn with_vm_health(state: &AdminState) -> serde_json::Value {
    let mut plugins = state.plugins.read().clone();
    let health = state.stats.plugin_health();
    if let Some(entries) = plugins.as_array_mut() {
        for entry in entries {
            let Some(name) = entry.get("name").and_then(|n| n.as_str()) else {
                continue;
            };
            let h = health.iter().find(|h| h.plugin == name);
            let failed_vms = h.map_or(0, |h| h.failed_vms);
            entry["vm"] = serde_json::json!({
                "state": if failed_vms > 0 { "failed" } else { "running" },
                "failures": h.map_or(0, |h| h.vm_failures),
                "failed_vms": failed_vms,
                "reloads": {
                    "success": h.map_or(0, |h| h.reloads_succeeded),
                    "failure": h.map_or(0, |h| h.reloads_failed),
                    "backoff": h.map_or(0, |h| h.reloads_in_backoff),
                },
                "last_failure": h.and_then(|h| h.last_failure.clone()),
            });
        }
    }
    plugins
}

fn loggers(state: &AdminState) -> String {
    let mut out = format!("active loggers:\n  wasm: {}\n", state.runtime.log_level());
    for (plugin, level) in state.runtime.plugin_log_levels() {
        out.push_str(&format!("  wasm.{plugin}: {level}\n"));
    }
    out
}

/// `POST /logging?wasm=debug` sets the plugins' level; `?level=debug` sets every logger, the
/// gateway's own included, as Envoy's admin does. One plugin's level (and so its host/VM trace):
/// `?wasm=trace&plugin=NAME`, or `?wasm.NAME=trace`.
/// Envoy's shape: `[{"name": ..., "local_address": {"socket_address": {"address", "port_value"}}}]`
/// under `listener_statuses`, or `name::ip:port` lines.
fn listeners(state: &AdminState, query: &str) -> Response<Full<Bytes>> {
    let listeners = state.stats.listeners();
    if query.split('&').any(|pair| pair == "format=json") {
        let statuses: Vec<_> = listeners
            .iter()
            .map(|(name, address)| {
                serde_json::json!({
                    "name": name,
                    "local_address": { "socket_address": {
                        "address": address.ip().to_string(),
                        "port_value": address.port(),
                    } },
                })
            })
            .collect();
        return json(&serde_json::json!({ "listener_statuses": statuses }));
    }
    let lines: String = listeners
        .iter()
        .map(|(name, address)| format!("{name}::{address}\n"))
        .collect();
    text(StatusCode::OK, "text/plain", lines)
}

fn set_logging(state: &AdminState, query: &str) -> Response<Full<Bytes>> {
    let pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(name), percent_decode(value))
        })
        .collect();
    let plugin = pairs
        .iter()
        .find(|(name, _)| name == "plugin")
        .map(|(_, value)| value.clone());
    // Checked before anything changes: a request naming an unknown plugin changes nothing.
    let known = plugin_names(state);
    let named = pairs
        .iter()
        .filter_map(|(name, _)| name.strip_prefix("wasm."))
        .chain(plugin.as_deref());
    for name in named {
        if !known.iter().any(|k| k == name) {
            return text(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!(
                    "unknown plugin {name:?}; the plugins are: {}\n",
                    known.join(", ")
                ),
            );
        }
    }
    for (name, value) in &pairs {
        let (name, value) = (name.as_str(), value.as_str());
        if name == "plugin" {
            continue;
        }
        let Some(level) = LogLevel::parse(value) else {
            return text(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("unknown log level {value:?}\n"),
            );
        };
        match name {
            "wasm" => match &plugin {
                Some(plugin) => state.runtime.set_plugin_log_level(plugin, level),
                None => state.runtime.set_log_level(level),
            },
            _ if name.starts_with("wasm.") => {
                state
                    .runtime
                    .set_plugin_log_level(&name["wasm.".len()..], level);
            }
            "level" => {
                state.runtime.set_log_level(level);
                if let Some(set) = &state.set_log_filter
                    && let Err(error) = set(level.as_str())
                {
                    return text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        format!("{error}\n"),
                    );
                }
            }
            other => {
                return text(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    format!("unknown logger {other:?}; use wasm, wasm.PLUGIN or level\n"),
                );
            }
        }
    }
    text(StatusCode::OK, "text/plain", loggers(state))
}

/// The configured plugins' names, as `/plugins` lists them.
fn plugin_names(state: &AdminState) -> Vec<String> {
    let plugins = state.plugins.read();
    let mut names: Vec<String> = plugins
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter_map(|entry| entry["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.dedup();
    names
}

/// `%XX` escapes in a query component (plugin names may hold `/` or `.`); `+` is a space.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(byte) => {
                        out.push(byte);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
