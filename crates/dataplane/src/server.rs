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
use crate::plugin_vm::{self, WorkerPlugin};
use crate::proxy::{ActiveChain, ConnInfo, ListenerState, handle};
use crate::spec::{ClusterSpec, FilterSpec, GatewaySpec, ListenerSpec, RouteSpec, TcpProxySpec};
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
        listener: String,
        filters: Vec<FilterSpec>,
        missing_plugins: Vec<String>,
        done: std::sync::mpsc::Sender<Result<(), StartError>>,
    },
    /// The same for a TCP proxy listener's network plugins.
    NetworkChain {
        listener: String,
        filters: Vec<FilterSpec>,
        missing_plugins: Vec<String>,
        done: std::sync::mpsc::Sender<Result<(), StartError>>,
    },
    /// New routes (by listener index; `None` keeps a listener's) and clusters: new requests and
    /// calls take them, those in flight finish on what they started with.
    Routing {
        routes: Vec<(String, ListenerRouting)>,
        clusters: Vec<ClusterSpec>,
        tls: Arc<HashMap<String, ClusterTls>>,
        done: std::sync::mpsc::Sender<Result<(), StartError>>,
    },
    /// Start serving a listener on this worker's copy of its socket.
    AddListener {
        spec: Box<ListenerSpec>,
        socket: std::net::TcpListener,
        acceptor: Option<TlsAcceptor>,
        done: std::sync::mpsc::Sender<Result<(), StartError>>,
    },
    /// Stop accepting on a listener; its requests in flight finish.
    RemoveListener {
        listener: String,
        done: std::sync::mpsc::Sender<Result<(), StartError>>,
    },
}

/// A running gateway. Dropping it without [`GatewayHandle::shutdown`] leaves the workers running.
pub struct GatewayHandle {
    pub stats: Arc<GatewayStats>,
    shutdown: watch::Sender<bool>,
    workers: Vec<std::thread::JoinHandle<()>>,
    commands: Vec<tokio::sync::mpsc::UnboundedSender<WorkerCommand>>,
    cluster_names: Arc<ClusterNames>,
}

/// A listener's socket bound and its TLS loaded, ready for [`GatewayHandle::add_listener`]: a
/// reload binds every new listener before it changes anything.
pub struct BoundListener {
    spec: ListenerSpec,
    socket: std::net::TcpListener,
    acceptor: Option<TlsAcceptor>,
    pub address: SocketAddr,
}

impl BoundListener {
    pub fn name(&self) -> &str {
        &self.spec.name
    }
}

impl GatewayHandle {
    /// The bound address of a listener (useful with port 0).
    pub fn address(&self, listener: &str) -> Option<SocketAddr> {
        self.stats.listener_address(listener)
    }

    /// Every listener serving now, with its bound address, in the order they were added.
    pub fn addresses(&self) -> Vec<(String, SocketAddr)> {
        self.stats.listeners()
    }

    /// Binds `spec`'s address and loads its TLS files; `index` is its place in the configuration,
    /// for the error.
    pub fn bind(&self, index: usize, spec: ListenerSpec) -> Result<BoundListener, StartError> {
        bind_listener(index, spec)
    }

    /// Starts serving a bound listener on every worker. If a worker cannot start its plugins,
    /// the listener is removed from the others and the error returned.
    pub fn add_listener(&self, bound: BoundListener) -> Result<SocketAddr, StartError> {
        let BoundListener {
            spec,
            socket,
            acceptor,
            address,
        } = bound;
        let name = spec.name.clone();
        // Each worker accepts on its own copy of the socket, as at start-up.
        let mut copies = (0..self.commands.len())
            .map(|_| socket.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| StartError::Worker(format!("listener {name}: {error}")))?;
        drop(socket);
        let outcome = self.broadcast(|done| WorkerCommand::AddListener {
            spec: Box::new(spec.clone()),
            socket: copies.pop().expect("one copy per worker"),
            acceptor: acceptor.clone(),
            done,
        });
        if let Err(error) = outcome {
            let _ = self.broadcast(|done| WorkerCommand::RemoveListener {
                listener: name.clone(),
                done,
            });
            return Err(error);
        }
        self.stats.listener_added(name, address);
        Ok(address)
    }

    /// Stops accepting on a listener on every worker and closes its socket; requests in flight
    /// finish (up to 30 s) while idle connections close.
    pub fn remove_listener(&self, listener: &str) -> Result<(), StartError> {
        if self.address(listener).is_none() {
            return Err(StartError::UnknownListener(listener.to_owned()));
        }
        let outcome = self.broadcast(|done| WorkerCommand::RemoveListener {
            listener: listener.to_owned(),
            done,
        });
        self.stats.listener_removed(listener);
        outcome
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
        self.on_every_worker(listener, |listener, done| WorkerCommand::Chain {
            listener,
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
        self.on_every_worker(listener, |listener, done| WorkerCommand::NetworkChain {
            listener,
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
        for (listener, _) in &routes {
            if self.address(listener).is_none() {
                return Err(StartError::UnknownListener(listener.clone()));
            }
        }
        self.cluster_names
            .replace(clusters.iter().map(|c| c.name.clone()));
        self.broadcast(|done| WorkerCommand::Routing {
            routes: routes.clone(),
            clusters: clusters.clone(),
            tls: tls.clone(),
            done,
        })
    }

    /// Sends a listener's command to every worker and waits for their answers.
    fn on_every_worker(
        &self,
        listener: &str,
        command: impl Fn(String, std::sync::mpsc::Sender<Result<(), StartError>>) -> WorkerCommand,
    ) -> Result<(), StartError> {
        if self.address(listener).is_none() {
            return Err(StartError::UnknownListener(listener.to_owned()));
        }
        self.broadcast(|done| command(listener.to_owned(), done))
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
    // TLS and sockets first: a bad file or a busy address stops start-up before anything serves.
    let mut bound = Vec::new();
    for (index, listener) in spec.listeners.iter().enumerate() {
        bound.push(bind_listener(index, listener.clone())?);
    }
    let acceptors: Vec<Option<TlsAcceptor>> = bound.iter().map(|b| b.acceptor.clone()).collect();
    let cluster_tls = Arc::new(cluster_tls(&spec.clusters)?);
    let cluster_names = Arc::new(ClusterNames::new(
        spec.clusters.iter().map(|c| c.name.clone()),
    ));
    for b in &bound {
        stats.listener_added(b.spec.name.clone(), b.address);
    }
    let sockets: Vec<std::net::TcpListener> = bound.into_iter().map(|b| b.socket).collect();
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

fn bind_listener(index: usize, spec: ListenerSpec) -> Result<BoundListener, StartError> {
    let acceptor = tls::listener_config(&spec)?.map(TlsAcceptor::from);
    let bind_error = |source| StartError::Bind {
        index,
        name: spec.name.clone(),
        address: spec.address,
        source,
    };
    let socket = std::net::TcpListener::bind(spec.address).map_err(bind_error)?;
    socket.set_nonblocking(true).map_err(bind_error)?;
    let address = socket.local_addr().map_err(bind_error)?;
    Ok(BoundListener {
        spec,
        socket,
        acceptor,
        address,
    })
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
        let worker = Rc::new(WorkerContext {
            runtime,
            clusters: tls.names.clone(),
            upstreams: Rc::new(UpstreamsCell::new(Upstreams::new(
                &spec.clusters,
                &tls.clusters,
            ))),
            tcp_clusters: Rc::new(TcpClusters::new(&spec.clusters)),
            stats,
            shutdown: shutdown.clone(),
            connection_ids,
            tracker: Rc::new(ConnectionTracker::default()),
        });
        let mut listeners = Vec::new();
        for ((listener, socket), acceptor) in spec.listeners.iter().zip(sockets).zip(tls.acceptors)
        {
            match worker.start_listener(listener, socket, acceptor) {
                Ok(started) => listeners.push(started),
                Err(error) => {
                    let _ = ready.send(Err(error));
                    return;
                }
            }
        }
        let listeners = Rc::new(RefCell::new(listeners));
        let _ = ready.send(Ok(()));
        tokio::task::spawn_local(apply_commands(worker.clone(), listeners.clone(), commands));
        let mut shutdown = shutdown;
        while !*shutdown.borrow_and_update() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
        let stopping: Vec<_> = std::mem::take(&mut *listeners.borrow_mut())
            .into_iter()
            .map(|listener| tokio::task::spawn_local(listener.stop()))
            .collect();
        for stopped in stopping {
            let _ = stopped.await;
        }
        // TCP proxy connections close on shutdown; let their close callbacks run.
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, worker.tracker.drained()).await;
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

/// A worker's listener, as chain updates find it.
enum Listener {
    Http(Rc<ListenerState>),
    Tcp(Rc<TcpListenerState>),
}

/// A listener serving on a worker: its accept loop, and how to stop it.
struct WorkerListener {
    name: String,
    listener: Listener,
    /// Set (or dropped) to stop accepting; TCP proxy connections close on it too.
    stop: watch::Sender<bool>,
    accepting: tokio::task::JoinHandle<()>,
    /// The HTTP connections accepted, for draining them when the listener stops.
    graceful: Rc<GracefulShutdown>,
}

impl WorkerListener {
    /// Stops accepting, then lets requests in flight finish (up to [`DRAIN_TIMEOUT`]) while
    /// idle keep-alive connections close.
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.accepting.await;
        drain(&self.name, self.graceful).await;
    }
}

async fn drain(listener: &str, graceful: Rc<GracefulShutdown>) {
    if let Ok(graceful) = Rc::try_unwrap(graceful)
        && tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
            .await
            .is_err()
    {
        tracing::warn!(
            listener,
            "requests still in flight after {DRAIN_TIMEOUT:?}; closing their connections"
        );
    }
}

/// What a worker needs to start plugins after start-up.
struct WorkerContext {
    runtime: Arc<Runtime>,
    clusters: Arc<ClusterNames>,
    upstreams: Rc<UpstreamsCell>,
    tcp_clusters: Rc<TcpClusters>,
    stats: Arc<GatewayStats>,
    shutdown: watch::Receiver<bool>,
    connection_ids: Arc<AtomicU64>,
    tracker: Rc<ConnectionTracker>,
}

impl WorkerContext {
    /// Starts the listener's plugins and its accept loop on `socket` (non-blocking, bound).
    fn start_listener(
        &self,
        listener: &ListenerSpec,
        socket: std::net::TcpListener,
        acceptor: Option<TlsAcceptor>,
    ) -> Result<WorkerListener, StartError> {
        let socket = tokio::net::TcpListener::from_std(socket)
            .map_err(|error| StartError::Worker(error.to_string()))?;
        let plugin_error = |(plugin, error): (String, VmError)| StartError::Plugin {
            listener: listener.name.clone(),
            plugin,
            error: Box::new(error),
        };
        let (stop, stopped) = watch::channel(false);
        let graceful = Rc::new(GracefulShutdown::new());
        let network = self
            .start_network_plugins(&listener.network_filters, &[])
            .map_err(plugin_error)?;
        let (state, accepting) = if let Some(proxy) = &listener.tcp_proxy {
            let state = Rc::new(TcpListenerState {
                spec: listener.clone(),
                proxy: RefCell::new(Rc::new(proxy.clone())),
                chain: RefCell::new(Rc::new(NetworkChain {
                    plugins: network,
                    missing_plugins: listener.missing_plugins.clone(),
                })),
                clusters: self.tcp_clusters.clone(),
                stats: self.stats.clone(),
            });
            for plugin in &state.chain.borrow().plugins {
                self.spawn_timers(plugin);
            }
            let accepting = tokio::task::spawn_local(tcp::accept_loop(
                state.clone(),
                socket,
                stopped,
                self.connection_ids.clone(),
                self.tracker.clone(),
            ));
            (Listener::Tcp(state), accepting)
        } else {
            let plugins = self
                .start_plugins(&listener.filters, &[])
                .map_err(plugin_error)?;
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
                upstreams: self.upstreams.clone(),
                stats: self.stats.clone(),
            });
            for plugin in &state.chain.borrow().plugins {
                self.spawn_timers(plugin);
            }
            for plugin in &state.network.borrow().plugins {
                self.spawn_timers(plugin);
            }
            let accepting = tokio::task::spawn_local(accept_loop(
                state.clone(),
                socket,
                acceptor,
                Rc::downgrade(&graceful),
                stopped,
                self.connection_ids.clone(),
            ));
            (Listener::Http(state), accepting)
        };
        Ok(WorkerListener {
            name: listener.name.clone(),
            listener: state,
            stop,
            accepting,
            graceful,
        })
    }

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

    fn spawn_timers<P: WorkerPlugin>(&self, plugin: &Rc<P>) {
        tokio::task::spawn_local(plugin_timers(Rc::downgrade(plugin), self.shutdown.clone()));
    }
}

/// Applies the control side's updates on this worker.
async fn apply_commands(
    worker: Rc<WorkerContext>,
    listeners: Rc<RefCell<Vec<WorkerListener>>>,
    mut commands: tokio::sync::mpsc::UnboundedReceiver<WorkerCommand>,
) {
    let find =
        |listeners: &[WorkerListener], name: &str| listeners.iter().position(|l| l.name == name);
    while let Some(command) = commands.recv().await {
        match command {
            WorkerCommand::Chain {
                listener,
                filters,
                missing_plugins,
                done,
            } => {
                let state = {
                    let listeners = listeners.borrow();
                    match find(&listeners, &listener).map(|i| &listeners[i].listener) {
                        Some(Listener::Http(state)) => state.clone(),
                        _ => {
                            let _ = done.send(Err(StartError::UnknownListener(listener)));
                            continue;
                        }
                    }
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
                let (tcp, http) = {
                    let listeners = listeners.borrow();
                    match find(&listeners, &listener).map(|i| &listeners[i].listener) {
                        Some(Listener::Tcp(state)) => (Some(state.clone()), None),
                        Some(Listener::Http(state)) => (None, Some(state.clone())),
                        None => {
                            let _ = done.send(Err(StartError::UnknownListener(listener)));
                            continue;
                        }
                    }
                };
                let slot = match (&tcp, &http) {
                    (Some(state), _) => &state.chain,
                    (_, Some(state)) => &state.network,
                    _ => unreachable!("one of the two is set above"),
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
                        listener: listener.clone(),
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
                let listeners = listeners.borrow();
                for (name, routing) in routes {
                    let Some(index) = find(&listeners, &name) else {
                        continue;
                    };
                    match (&listeners[index].listener, routing) {
                        (Listener::Http(state), ListenerRouting::Http(table)) => {
                            *state.routes.borrow_mut() = Rc::from(table);
                        }
                        (Listener::Tcp(state), ListenerRouting::Tcp(proxy)) => {
                            *state.proxy.borrow_mut() = Rc::new(proxy);
                        }
                        _ => {}
                    }
                }
                let _ = done.send(Ok(()));
            }
            WorkerCommand::AddListener {
                spec,
                socket,
                acceptor,
                done,
            } => {
                let outcome = worker
                    .start_listener(&spec, socket, acceptor)
                    .map(|started| listeners.borrow_mut().push(started));
                let _ = done.send(outcome);
            }
            WorkerCommand::RemoveListener { listener, done } => {
                let removed = {
                    let mut listeners = listeners.borrow_mut();
                    find(&listeners, &listener).map(|index| listeners.remove(index))
                };
                match removed {
                    Some(removed) => {
                        let WorkerListener {
                            name,
                            stop,
                            accepting,
                            graceful,
                            ..
                        } = removed;
                        let _ = stop.send(true);
                        // Answer once this worker's socket is closed (the address may be bound
                        // again at once); requests in flight drain after.
                        let _ = accepting.await;
                        let _ = done.send(Ok(()));
                        tokio::task::spawn_local(async move {
                            drain(&name, graceful).await;
                            drop(stop);
                        });
                    }
                    None => {
                        let _ = done.send(Err(StartError::UnknownListener(listener)));
                    }
                }
            }
        }
    }
}

/// Ticks and queue deliveries for one plugin on this worker, for as long as the plugin is in use
/// (a chain update that drops it ends this once its last stream is done).
async fn plugin_timers<P: WorkerPlugin>(plugin: Weak<P>, mut shutdown: watch::Receiver<bool>) {
    let queue_ready = Arc::new(Notify::new());
    let waker = queue_ready.clone();
    match plugin.upgrade() {
        Some(plugin) => plugin
            .core()
            .set_queue_waker(Arc::new(move || waker.notify_one())),
        None => return,
    }
    loop {
        let Some(period) = plugin.upgrade().map(|p| p.core().tick_period()) else {
            return;
        };
        let wait = period.unwrap_or(Duration::from_millis(250));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {
                let Some(plugin) = plugin.upgrade() else { return };
                if period.is_some() {
                    plugin_vm::tick(&plugin);
                }
            }
            _ = queue_ready.notified() => {
                let Some(plugin) = plugin.upgrade() else { return };
                plugin_vm::deliver_queue_ready(&plugin);
            }
            _ = shutdown.changed() => return,
        }
    }
}
