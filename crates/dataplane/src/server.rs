//! Workers and listeners. Each worker is a thread with a current-thread tokio runtime that owns a
//! VM per plugin, so a request's contexts live on one thread and the hot path takes no lock. All
//! workers accept on the same listening sockets; the kernel spreads connections among them.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tokio_rustls::TlsAcceptor;
use wasmgate_abi::StreamInfo;
use wasmgate_runtime::{Runtime, VmError};

use crate::chain::Plugin;
use crate::host::ClusterNames;
use crate::idle::{Activity, IdleIo};
use crate::proxy::{ActiveChain, ConnInfo, ListenerState, handle};
use crate::spec::{ClusterSpec, FilterSpec, GatewaySpec, RouteSpec, TcpProxySpec};
use crate::stats::GatewayStats;
use crate::tcp::{
    self, ConnectionTracker, NetworkChain, NetworkPlugin, TcpClusters, TcpListenerState,
};
use crate::tls::{self, ClusterTls};
use crate::upstream::{Upstreams, UpstreamsCell};

/// How long a graceful shutdown waits for requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("listeners[{index}] ({name}): cannot listen on {address}: {source}")]
    Bind {
        index: usize,
        name: String,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("listener {listener}: plugin {plugin} did not start: {error}")]
    Plugin {
        listener: String,
        plugin: String,
        error: Box<VmError>,
    },
    /// A listener's certificate or key could not be loaded.
    #[error("listener {listener}: TLS {}: {reason}", file.display())]
    ListenerTls {
        listener: String,
        file: PathBuf,
        reason: String,
    },
    /// A cluster's upstream TLS settings are unusable (`file` is the CA file when it is at fault).
    #[error(
        "cluster {cluster}: upstream TLS{}: {reason}",
        file.as_ref().map(|f| format!(" {}", f.display())).unwrap_or_default()
    )]
    ClusterTls {
        cluster: String,
        file: Option<PathBuf>,
        reason: String,
    },
    #[error("starting worker threads: {0}")]
    Worker(String),
    #[error("no listener named {0:?}")]
    UnknownListener(String),
}

/// Where a listener sends what it accepts: an HTTP listener's routes, or a TCP proxy's clusters.
#[derive(Clone)]
pub enum ListenerRouting {
    Http(Vec<RouteSpec>),
    Tcp(TcpProxySpec),
}

/// What the control side asks of a running worker.
enum WorkerCommand {
    /// Serve new requests on the listener with this chain; requests in flight finish on theirs.
    Chain {
        listener: usize,
        filters: Vec<FilterSpec>,
        missing_plugins: Vec<String>,
        done: std::sync::mpsc::Sender<Result<(), StartError>>,
    },
    /// The same for a TCP proxy listener's network plugins.
    NetworkChain {
        listener: usize,
        filters: Vec<FilterSpec>,
        missing_plugins: Vec<String>,
        done: std::sync::mpsc::Sender<Result<(), StartError>>,
    },
    /// New routes (by listener index; `None` keeps a listener's) and clusters: new requests and
    /// calls take them, those in flight finish on what they started with.
    Routing {
        routes: Vec<Option<ListenerRouting>>,
        clusters: Vec<ClusterSpec>,
        tls: Arc<HashMap<String, ClusterTls>>,
        done: std::sync::mpsc::Sender<Result<(), StartError>>,
    },
}

/// A running gateway. Dropping it without [`GatewayHandle::shutdown`] leaves the workers running.
pub struct GatewayHandle {
    listeners: Vec<(String, SocketAddr)>,
    pub stats: Arc<GatewayStats>,
    shutdown: watch::Sender<bool>,
    workers: Vec<std::thread::JoinHandle<()>>,
    commands: Vec<tokio::sync::mpsc::UnboundedSender<WorkerCommand>>,
    cluster_names: Arc<ClusterNames>,
}

impl GatewayHandle {
    /// The bound address of a listener (useful with port 0).
    pub fn address(&self, listener: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(name, _)| name == listener)
            .map(|(_, a)| *a)
    }

    pub fn addresses(&self) -> &[(String, SocketAddr)] {
        &self.listeners
    }

    /// Stops accepting, lets requests in flight finish (up to 30 s), and joins the workers.
    /// Swaps a listener's filter chain on every worker: new requests take the new chain, requests
    /// in flight finish on the one they started with, and plugins that did not change keep their
    /// VMs. Returns once every worker has switched. A worker whose new plugins fail to start keeps
    /// its old chain and the error is returned; the caller should have started the plugins once
    /// itself to validate them (as Envoy does on its main thread).
    pub fn update_chain(
        &self,
        listener: &str,
        filters: Vec<FilterSpec>,
        missing_plugins: Vec<String>,
    ) -> Result<(), StartError> {
        self.on_every_worker(listener, |index, done| WorkerCommand::Chain {
            listener: index,
            filters: filters.clone(),
            missing_plugins: missing_plugins.clone(),
            done,
        })
    }

    /// Swaps a TCP proxy listener's network plugins on every worker, as [`Self::update_chain`]
    /// does for HTTP filters: new connections take the new chain, open ones keep theirs, and
    /// plugins that did not change keep their VMs.
    pub fn update_network_chain(
        &self,
        listener: &str,
        filters: Vec<FilterSpec>,
        missing_plugins: Vec<String>,
    ) -> Result<(), StartError> {
        self.on_every_worker(listener, |index, done| WorkerCommand::NetworkChain {
            listener: index,
            filters: filters.clone(),
            missing_plugins: missing_plugins.clone(),
            done,
        })
    }

    /// Replaces the routes of the named listeners and the whole cluster table on every worker:
    /// new requests and plugin calls use them, those in flight finish on what they started with,
    /// and no plugin restarts. A cluster whose TLS settings cannot be loaded changes nothing.
    pub fn update_routing(
        &self,
        routes: Vec<(String, ListenerRouting)>,
        clusters: Vec<ClusterSpec>,
    ) -> Result<(), StartError> {
        let tls = Arc::new(cluster_tls(&clusters)?);
        let mut by_index: Vec<Option<ListenerRouting>> = vec![None; self.listeners.len()];
        for (listener, table) in routes {
            let index = self.listener_index(&listener)?;
            by_index[index] = Some(table);
        }
        self.cluster_names
            .replace(clusters.iter().map(|c| c.name.clone()));
        self.broadcast(|done| WorkerCommand::Routing {
            routes: by_index.clone(),
            clusters: clusters.clone(),
            tls: tls.clone(),
            done,
        })
    }

    fn listener_index(&self, listener: &str) -> Result<usize, StartError> {
        self.listeners
            .iter()
            .position(|(name, _)| name == listener)
            .ok_or_else(|| StartError::UnknownListener(listener.to_owned()))
    }

    /// Sends a listener's command to every worker and waits for their answers.
    fn on_every_worker(
        &self,
        listener: &str,
        command: impl Fn(usize, std::sync::mpsc::Sender<Result<(), StartError>>) -> WorkerCommand,
    ) -> Result<(), StartError> {
        let index = self.listener_index(listener)?;
        self.broadcast(|done| command(index, done))
    }

    /// Sends a command to every worker and waits for their answers; the last error wins.
    fn broadcast(
        &self,
        mut command: impl FnMut(std::sync::mpsc::Sender<Result<(), StartError>>) -> WorkerCommand,
    ) -> Result<(), StartError> {
        let (done, results) = std::sync::mpsc::channel();
        let mut asked = 0;
        for commands in &self.commands {
            if commands.send(command(done.clone())).is_ok() {
                asked += 1;
            }
        }
        drop(done);
        let mut outcome = Ok(());
        for _ in 0..asked {
            match results.recv() {
                Ok(Ok(())) => {}
                Ok(Err(error)) => outcome = Err(error),
                Err(_) => break,
            }
        }
        outcome
    }

    pub fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for worker in self.workers {
            let _ = worker.join();
        }
    }
}

/// Binds every listener and starts the workers; returns once every worker has its plugins running.
pub fn start(
    runtime: Arc<Runtime>,
    spec: GatewaySpec,
    stats: Arc<GatewayStats>,
) -> Result<GatewayHandle, StartError> {
    // TLS first: a bad file stops start-up before anything listens.
    let acceptors: Vec<Option<TlsAcceptor>> = spec
        .listeners
        .iter()
        .map(|l| Ok(tls::listener_config(l)?.map(TlsAcceptor::from)))
        .collect::<Result<_, StartError>>()?;
    let cluster_tls = Arc::new(cluster_tls(&spec.clusters)?);
    let cluster_names = Arc::new(ClusterNames::new(
        spec.clusters.iter().map(|c| c.name.clone()),
    ));
    let mut sockets = Vec::new();
    let mut listeners = Vec::new();
    for (index, listener) in spec.listeners.iter().enumerate() {
        let bind_error = |source| StartError::Bind {
            index,
            name: listener.name.clone(),
            address: listener.address,
            source,
        };
        let socket = std::net::TcpListener::bind(listener.address).map_err(bind_error)?;
        socket.set_nonblocking(true).map_err(bind_error)?;
        listeners.push((
            listener.name.clone(),
            socket.local_addr().map_err(bind_error)?,
        ));
        sockets.push(socket);
    }
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), StartError>>();
    let connection_ids = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    let mut commands = Vec::new();
    for worker in 0..spec.workers.max(1) {
        let (command_tx, command_rx) = tokio::sync::mpsc::unbounded_channel();
        commands.push(command_tx);
        let sockets = sockets
            .iter()
            .map(|s| s.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StartError::Worker(e.to_string()))?;
        let (runtime, spec, stats, ready, shutdown, ids) = (
            runtime.clone(),
            spec.clone(),
            stats.clone(),
            ready_tx.clone(),
            shutdown_rx.clone(),
            connection_ids.clone(),
        );
        let tls = WorkerTls {
            acceptors: acceptors.clone(),
            clusters: cluster_tls.clone(),
            names: cluster_names.clone(),
        };
        // Guest code runs on this thread's stack: room for the Wasm stack limit on top of the
        // 2 MiB a Rust thread gets by default.
        let stack_size = (2 << 20) + runtime.config().max_stack_bytes;
        let thread = std::thread::Builder::new()
            .name(format!("wasmgate-worker-{worker}"))
            .stack_size(stack_size)
            .spawn(move || {
                run_worker(
                    runtime, spec, tls, sockets, stats, ready, shutdown, ids, command_rx,
                )
            })
            .map_err(|e| StartError::Worker(e.to_string()))?;
        workers.push(thread);
    }
    drop(ready_tx);
    let handle = GatewayHandle {
        listeners,
        stats,
        shutdown,
        workers,
        commands,
        cluster_names,
    };
    for _ in 0..handle.workers.len() {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                handle.shutdown();
                return Err(error);
            }
            Err(_) => {
                handle.shutdown();
                return Err(StartError::Worker("a worker exited during start-up".into()));
            }
        }
    }
    Ok(handle)
}

/// Runs futures that are not `Send` (they touch the worker's VMs) on the worker's own thread.
#[derive(Clone, Copy)]
struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future + 'static,
{
    fn execute(&self, future: F) {
        tokio::task::spawn_local(future);
    }
}

/// Every cluster's client TLS settings by name (plain clusters carry the plain configuration).
fn cluster_tls(clusters: &[ClusterSpec]) -> Result<HashMap<String, ClusterTls>, StartError> {
    let plain = tls::plain_cluster_config();
    clusters
        .iter()
        .map(|cluster| {
            let config = tls::cluster_config(cluster)?.unwrap_or_else(|| plain.clone());
            Ok((cluster.name.clone(), config))
        })
        .collect()
}

/// The TLS settings loaded at start-up, shared by the workers.
struct WorkerTls {
    /// One per listener, in order; `None` for plain listeners.
    acceptors: Vec<Option<TlsAcceptor>>,
    clusters: Arc<HashMap<String, ClusterTls>>,
    /// Process-wide, with the clusters' names.
    names: Arc<ClusterNames>,
}

#[allow(clippy::too_many_arguments)]
fn run_worker(
    runtime: Arc<Runtime>,
    spec: GatewaySpec,
    tls: WorkerTls,
    sockets: Vec<std::net::TcpListener>,
    stats: Arc<GatewayStats>,
    ready: std::sync::mpsc::Sender<Result<(), StartError>>,
    shutdown: watch::Receiver<bool>,
    connection_ids: Arc<AtomicU64>,
    commands: tokio::sync::mpsc::UnboundedReceiver<WorkerCommand>,
) {
    let tokio = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(tokio) => tokio,
        Err(error) => {
            let _ = ready.send(Err(StartError::Worker(error.to_string())));
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&tokio, async move {
        let upstreams = Rc::new(UpstreamsCell::new(Upstreams::new(
            &spec.clusters,
            &tls.clusters,
        )));
        let tcp_clusters = Rc::new(TcpClusters::new(&spec.clusters));
        let worker = Rc::new(WorkerContext {
            runtime,
            clusters: tls.names.clone(),
            upstreams: upstreams.clone(),
            tcp_clusters: tcp_clusters.clone(),
            stats: stats.clone(),
            shutdown: shutdown.clone(),
        });
        let tracker = Rc::new(ConnectionTracker::default());
        let mut states = Vec::new();
        let mut listener_states = Vec::new();
        for ((listener, socket), acceptor) in spec.listeners.iter().zip(sockets).zip(tls.acceptors)
        {
            let socket = match tokio::net::TcpListener::from_std(socket) {
                Ok(socket) => socket,
                Err(error) => {
                    let _ = ready.send(Err(StartError::Worker(error.to_string())));
                    return;
                }
            };
            let plugin_error = |(plugin, error): (String, VmError)| StartError::Plugin {
                listener: listener.name.clone(),
                plugin,
                error: Box::new(error),
            };
            if let Some(proxy) = &listener.tcp_proxy {
                let plugins = match worker.start_network_plugins(&listener.network_filters, &[]) {
                    Ok(plugins) => plugins,
                    Err(error) => {
                        let _ = ready.send(Err(plugin_error(error)));
                        return;
                    }
                };
                let state = Rc::new(TcpListenerState {
                    spec: listener.clone(),
                    proxy: RefCell::new(Rc::new(proxy.clone())),
                    chain: RefCell::new(Rc::new(NetworkChain {
                        plugins,
                        missing_plugins: listener.missing_plugins.clone(),
                    })),
                    clusters: tcp_clusters.clone(),
                    stats: stats.clone(),
                });
                listener_states.push(Listener::Tcp(state.clone()));
                states.push(Serving::Tcp(state, socket));
                continue;
            }
            let network = match worker.start_network_plugins(&listener.network_filters, &[]) {
                Ok(plugins) => plugins,
                Err(error) => {
                    let _ = ready.send(Err(plugin_error(error)));
                    return;
                }
            };
            let plugins = match worker.start_plugins(&listener.filters, &[]) {
                Ok(plugins) => plugins,
                Err(error) => {
                    let _ = ready.send(Err(plugin_error(error)));
                    return;
                }
            };
            let state = Rc::new(ListenerState {
                spec: listener.clone(),
                chain: RefCell::new(Rc::new(ActiveChain {
                    plugins,
                    missing_plugins: listener.missing_plugins.clone(),
                })),
                network: RefCell::new(Rc::new(NetworkChain {
                    plugins: network,
                    // A missing network plugin denies through the HTTP chain's list.
                    missing_plugins: Vec::new(),
                })),
                routes: RefCell::new(Rc::from(listener.routes.clone())),
                upstreams: upstreams.clone(),
                stats: stats.clone(),
            });
            listener_states.push(Listener::Http(state.clone()));
            states.push(Serving::Http(state, socket, acceptor));
        }
        let _ = ready.send(Ok(()));
        let graceful = Rc::new(GracefulShutdown::new());
        let mut loops = Vec::new();
        tokio::task::spawn_local(apply_commands(worker.clone(), listener_states, commands));
        for serving in states {
            match serving {
                Serving::Http(state, socket, acceptor) => {
                    for plugin in &state.chain.borrow().plugins {
                        worker.spawn_timers(plugin);
                    }
                    for plugin in &state.network.borrow().plugins {
                        worker.spawn_timers(plugin);
                    }
                    loops.push(tokio::task::spawn_local(accept_loop(
                        state,
                        socket,
                        acceptor,
                        Rc::downgrade(&graceful),
                        shutdown.clone(),
                        connection_ids.clone(),
                    )));
                }
                Serving::Tcp(state, socket) => {
                    for plugin in &state.chain.borrow().plugins {
                        worker.spawn_timers(plugin);
                    }
                    loops.push(tokio::task::spawn_local(tcp::accept_loop(
                        state,
                        socket,
                        shutdown.clone(),
                        connection_ids.clone(),
                        tracker.clone(),
                    )));
                }
            }
        }
        for accept in loops {
            let _ = accept.await;
        }
        if let Ok(graceful) = Rc::try_unwrap(graceful)
            && tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
                .await
                .is_err()
        {
            tracing::warn!(
                "requests still in flight after {DRAIN_TIMEOUT:?}; closing their connections"
            );
        }
        // TCP proxy connections close on shutdown; let their close callbacks run.
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, tracker.drained()).await;
    });
}

/// Accepts connections and gives each its own task, where the TLS handshake (if any) and the
/// HTTP connection run; a failed handshake ends only its connection.
async fn accept_loop(
    state: Rc<ListenerState>,
    socket: tokio::net::TcpListener,
    tls: Option<TlsAcceptor>,
    graceful: Weak<GracefulShutdown>,
    mut shutdown: watch::Receiver<bool>,
    connection_ids: Arc<AtomicU64>,
) {
    let limits = &state.spec.limits;
    let mut builder = auto::Builder::new(LocalExec);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_request_headers_bytes.max(8192))
        .max_headers(limits.max_headers_count);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_request_headers_bytes as u32);
    let builder = Rc::new(builder);
    loop {
        let accepted = tokio::select! {
            accepted = socket.accept() => accepted,
            _ = shutdown.changed() => break,
        };
        let (stream, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(listener = %state.spec.name, "accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = ConnInfo {
            remote,
            local: stream.local_addr().unwrap_or(state.spec.address),
            id: connection_ids.fetch_add(1, Ordering::Relaxed) + 1,
            scheme: "http",
            tls_version: None,
            requested_server_name: None,
        };
        tokio::task::spawn_local(connection(
            state.clone(),
            builder.clone(),
            graceful.clone(),
            tls.clone(),
            stream,
            conn,
        ));
    }
}

/// Counts a connection as active for as long as its task lives (also when the task is dropped
/// at shutdown in the middle of a handshake).
struct ActiveConnection(Arc<GatewayStats>);

impl ActiveConnection {
    fn new(stats: Arc<GatewayStats>) -> Self {
        stats.active_connections.fetch_add(1, Ordering::Relaxed);
        Self(stats)
    }
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.0.active_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One accepted connection: the TLS handshake, bounded by the listener's header-read timeout,
/// then HTTP/1.1 or HTTP/2 (by the connection preface; over TLS ALPN leads the client to it).
async fn connection(
    state: Rc<ListenerState>,
    builder: Rc<auto::Builder<LocalExec>>,
    graceful: Weak<GracefulShutdown>,
    tls: Option<TlsAcceptor>,
    stream: TcpStream,
    mut conn: ConnInfo,
) {
    let _active = ActiveConnection::new(state.stats.clone());
    let Some(acceptor) = tls else {
        return serve_filtered(state, &builder, &graceful, stream, conn).await;
    };
    let limit = state.spec.limits.header_read_timeout;
    let stream = match tokio::time::timeout(limit, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            tracing::debug!(
                listener = %state.spec.name, remote = %conn.remote,
                "TLS handshake failed: {error}"
            );
            return;
        }
        Err(_) => {
            tracing::debug!(
                listener = %state.spec.name, remote = %conn.remote,
                "TLS handshake timed out after {limit:?}"
            );
            return;
        }
    };
    let (_, session) = stream.get_ref();
    conn.scheme = "https";
    conn.tls_version = session.protocol_version().map(tls::version_name);
    conn.requested_server_name = session.server_name().map(str::to_owned);
    serve_filtered(state, &builder, &graceful, stream, conn).await;
}

/// Serves HTTP on `stream`, through the listener's network plugins when it has any.
async fn serve_filtered<I>(
    state: Rc<ListenerState>,
    builder: &auto::Builder<LocalExec>,
    graceful: &Weak<GracefulShutdown>,
    stream: I,
    conn: ConnInfo,
) where
    I: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let network = state.network.borrow().clone();
    if network.plugins.is_empty() {
        return serve(state, builder, graceful, TokioIo::new(stream), conn).await;
    }
    let info = StreamInfo {
        source: Some(conn.remote),
        destination: Some(conn.local),
        connection_id: Some(conn.id),
        tls_version: conn.tls_version.clone(),
        requested_server_name: conn.requested_server_name.clone(),
        start_time: Some(std::time::SystemTime::now()),
        listener_name: Some(state.spec.name.clone()),
        ..Default::default()
    };
    let Some(pipe) = tcp::filter_before_http(&network, stream, info, &state.spec) else {
        return;
    };
    serve(state, builder, graceful, TokioIo::new(pipe), conn).await;
}

async fn serve<I>(
    state: Rc<ListenerState>,
    builder: &auto::Builder<LocalExec>,
    graceful: &Weak<GracefulShutdown>,
    io: TokioIo<I>,
    conn: ConnInfo,
) where
    I: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let conn = Rc::new(conn);
    let activity = Activity::new();
    let io = TokioIo::new(IdleIo::new(
        io.into_inner(),
        activity.clone(),
        state.spec.limits.idle_timeout,
    ));
    let service = service_fn(move |request| {
        let guard = activity.request();
        let response = handle(state.clone(), conn.clone(), request);
        async move {
            let response = response.await;
            drop(guard);
            response
        }
    });
    let connection = builder.serve_connection(io, service).into_owned();
    // Gone once the worker drains: a connection that finished its handshake too late closes.
    let Some(graceful) = graceful.upgrade() else {
        return;
    };
    let connection = graceful.watch(connection);
    drop(graceful);
    if let Err(error) = connection.await {
        tracing::debug!("connection ended with an error: {error}");
    }
}

/// A listener being started on a worker.
enum Serving {
    Http(
        Rc<ListenerState>,
        tokio::net::TcpListener,
        Option<TlsAcceptor>,
    ),
    Tcp(Rc<TcpListenerState>, tokio::net::TcpListener),
}

/// A worker's listener, as chain updates find it.
enum Listener {
    Http(Rc<ListenerState>),
    Tcp(Rc<TcpListenerState>),
}

/// What a worker needs to start plugins after start-up.
struct WorkerContext {
    runtime: Arc<Runtime>,
    clusters: Arc<ClusterNames>,
    upstreams: Rc<UpstreamsCell>,
    tcp_clusters: Rc<TcpClusters>,
    stats: Arc<GatewayStats>,
    shutdown: watch::Receiver<bool>,
}

impl WorkerContext {
    /// A plugin per filter, reusing those of `current` that did not change. On failure, the name
    /// of the plugin that did not start.
    fn start_plugins(
        &self,
        filters: &[FilterSpec],
        current: &[Rc<Plugin>],
    ) -> Result<Vec<Rc<Plugin>>, (String, VmError)> {
        filters
            .iter()
            .map(|filter| {
                if let Some(kept) = current.iter().find(|p| p.spec.same_plugin(filter)) {
                    return Ok(kept.clone());
                }
                Plugin::start(
                    filter.clone(),
                    self.runtime.clone(),
                    self.clusters.clone(),
                    self.upstreams.clone(),
                    self.stats.clone(),
                )
                .map_err(|error| (filter.name.clone(), error))
            })
            .collect()
    }

    /// A network plugin per filter, reusing those of `current` that did not change.
    fn start_network_plugins(
        &self,
        filters: &[FilterSpec],
        current: &[Rc<NetworkPlugin>],
    ) -> Result<Vec<Rc<NetworkPlugin>>, (String, VmError)> {
        filters
            .iter()
            .map(|filter| {
                if let Some(kept) = current.iter().find(|p| p.spec.same_plugin(filter)) {
                    return Ok(kept.clone());
                }
                NetworkPlugin::start(
                    filter.clone(),
                    self.runtime.clone(),
                    self.clusters.clone(),
                    self.upstreams.clone(),
                    self.stats.clone(),
                )
                .map_err(|error| (filter.name.clone(), error))
            })
            .collect()
    }

    fn spawn_timers<P: Timed>(&self, plugin: &Rc<P>) {
        tokio::task::spawn_local(plugin_timers(Rc::downgrade(plugin), self.shutdown.clone()));
    }
}

/// Applies the control side's chain updates on this worker.
async fn apply_commands(
    worker: Rc<WorkerContext>,
    listeners: Vec<Listener>,
    mut commands: tokio::sync::mpsc::UnboundedReceiver<WorkerCommand>,
) {
    while let Some(command) = commands.recv().await {
        match command {
            WorkerCommand::Chain {
                listener,
                filters,
                missing_plugins,
                done,
            } => {
                let Some(Listener::Http(state)) = listeners.get(listener) else {
                    let _ = done.send(Err(StartError::UnknownListener(listener.to_string())));
                    continue;
                };
                let current = state.chain.borrow().clone();
                let outcome = match worker.start_plugins(&filters, &current.plugins) {
                    Ok(plugins) => {
                        for plugin in &plugins {
                            if !current.plugins.iter().any(|p| Rc::ptr_eq(p, plugin)) {
                                worker.spawn_timers(plugin);
                            }
                        }
                        *state.chain.borrow_mut() = Rc::new(ActiveChain {
                            plugins,
                            missing_plugins,
                        });
                        Ok(())
                    }
                    Err((plugin, error)) => Err(StartError::Plugin {
                        listener: state.spec.name.clone(),
                        plugin,
                        error: Box::new(error),
                    }),
                };
                let _ = done.send(outcome);
            }
            WorkerCommand::NetworkChain {
                listener,
                filters,
                missing_plugins,
                done,
            } => {
                let (name, slot) = match listeners.get(listener) {
                    Some(Listener::Tcp(state)) => (&state.spec.name, &state.chain),
                    Some(Listener::Http(state)) => (&state.spec.name, &state.network),
                    None => {
                        let _ = done.send(Err(StartError::UnknownListener(listener.to_string())));
                        continue;
                    }
                };
                let current = slot.borrow().clone();
                let outcome = match worker.start_network_plugins(&filters, &current.plugins) {
                    Ok(plugins) => {
                        for plugin in &plugins {
                            if !current.plugins.iter().any(|p| Rc::ptr_eq(p, plugin)) {
                                worker.spawn_timers(plugin);
                            }
                        }
                        *slot.borrow_mut() = Rc::new(NetworkChain {
                            plugins,
                            missing_plugins,
                        });
                        Ok(())
                    }
                    Err((plugin, error)) => Err(StartError::Plugin {
                        listener: name.clone(),
                        plugin,
                        error: Box::new(error),
                    }),
                };
                let _ = done.send(outcome);
            }
            WorkerCommand::Routing {
                routes,
                clusters,
                tls,
                done,
            } => {
                worker.upstreams.replace(Upstreams::new(&clusters, &tls));
                worker.tcp_clusters.replace(&clusters);
                for (listener, routing) in listeners.iter().zip(routes) {
                    match (listener, routing) {
                        (Listener::Http(state), Some(ListenerRouting::Http(table))) => {
                            *state.routes.borrow_mut() = Rc::from(table);
                        }
                        (Listener::Tcp(state), Some(ListenerRouting::Tcp(proxy))) => {
                            *state.proxy.borrow_mut() = Rc::new(proxy);
                        }
                        _ => {}
                    }
                }
                let _ = done.send(Ok(()));
            }
        }
    }
}

/// A plugin with timers and queues, HTTP or network.
trait Timed: 'static {
    fn tick_period(&self) -> Option<Duration>;
    fn set_queue_waker(&self, waker: Arc<dyn Fn() + Send + Sync>);
    fn tick(self: &Rc<Self>);
    fn deliver_queue_ready(self: &Rc<Self>);
}

impl Timed for Plugin {
    fn tick_period(&self) -> Option<Duration> {
        Plugin::tick_period(self)
    }
    fn set_queue_waker(&self, waker: Arc<dyn Fn() + Send + Sync>) {
        Plugin::set_queue_waker(self, waker)
    }
    fn tick(self: &Rc<Self>) {
        Plugin::tick(self)
    }
    fn deliver_queue_ready(self: &Rc<Self>) {
        Plugin::deliver_queue_ready(self)
    }
}

impl Timed for NetworkPlugin {
    fn tick_period(&self) -> Option<Duration> {
        NetworkPlugin::tick_period(self)
    }
    fn set_queue_waker(&self, waker: Arc<dyn Fn() + Send + Sync>) {
        NetworkPlugin::set_queue_waker(self, waker)
    }
    fn tick(self: &Rc<Self>) {
        NetworkPlugin::tick(self)
    }
    fn deliver_queue_ready(self: &Rc<Self>) {
        NetworkPlugin::deliver_queue_ready(self)
    }
}

/// Ticks and queue deliveries for one plugin on this worker, for as long as the plugin is in use
/// (a chain update that drops it ends this once its last stream is done).
async fn plugin_timers<P: Timed>(plugin: Weak<P>, mut shutdown: watch::Receiver<bool>) {
    let queue_ready = Arc::new(Notify::new());
    let waker = queue_ready.clone();
    match plugin.upgrade() {
        Some(plugin) => plugin.set_queue_waker(Arc::new(move || waker.notify_one())),
        None => return,
    }
    loop {
        let Some(period) = plugin.upgrade().map(|p| p.tick_period()) else {
            return;
        };
        let wait = period.unwrap_or(Duration::from_millis(250));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {
                let Some(plugin) = plugin.upgrade() else { return };
                if period.is_some() {
                    plugin.tick();
                }
            }
            _ = queue_ready.notified() => {
                let Some(plugin) = plugin.upgrade() else { return };
                plugin.deliver_queue_ready();
            }
            _ = shutdown.changed() => return,
        }
    }
}
