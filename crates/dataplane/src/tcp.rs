//! TCP proxy listeners with a chain of network (TCP) Proxy-Wasm plugins, as Envoy's `tcp_proxy`
//! with network Wasm filters before it.
//!
//! Per connection: a stream context in every plugin, `proxy_on_new_connection` in chain order (a
//! Pause holds the connection, before the upstream is dialled, until the plugin continues the
//! DOWNSTREAM stream), then the upstream connection (round robin over the cluster's endpoints),
//! then bytes both ways: downstream data through `proxy_on_downstream_data` in chain order,
//! upstream data through `proxy_on_upstream_data` in reverse. A Pause from a data callback holds
//! the bytes at that plugin: more bytes are appended and the next call reports the accumulated
//! size; `proxy_continue_stream` sends what it holds on to the plugins after it. End of stream is
//! a half-close, passed on as a half-close of the other side. The connection ends with
//! `proxy_on_upstream_connection_close`, `proxy_on_downstream_connection_close` and
//! `proxy_on_done`/`proxy_on_log`/`proxy_on_delete`.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use wasmgate_abi::{Action, PeerType, StreamInfo, StreamType};
use wasmgate_runtime::{Runtime, Vm, VmError};

use crate::host::ClusterNames;
use crate::plugin_vm::{PluginVm, WorkerPlugin, spawn_unary_calls};
use crate::spec::{ClusterSpec, FailurePolicy, FilterSpec, ListenerSpec, TcpProxySpec};
use crate::stats::GatewayStats;
use crate::upstream::UpstreamsCell;

/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 64 * 1024;
/// Most bytes read while looking for a TLS ClientHello's SNI.
const MAX_CLIENT_HELLO: usize = 64 * 1024;
/// How long a closing connection may spend writing what plugins already passed (Envoy's
/// FlushWrite close).
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

// === network plugins ===

/// One network plugin on one worker (see [`PluginVm`]).
pub(crate) struct NetworkPlugin {
    core: PluginVm,
}

impl std::ops::Deref for NetworkPlugin {
    type Target = PluginVm;

    fn deref(&self) -> &PluginVm {
        &self.core
    }
}

impl NetworkPlugin {
    pub fn start(
        spec: FilterSpec,
        runtime: Arc<Runtime>,
        clusters: Arc<ClusterNames>,
        upstreams: Rc<UpstreamsCell>,
        stats: Arc<GatewayStats>,
    ) -> Result<Rc<Self>, VmError> {
        let core = PluginVm::start(spec, runtime, clusters, upstreams, stats, "network plugin")?;
        Ok(Rc::new(Self { core }))
    }
}

impl WorkerPlugin for NetworkPlugin {
    fn core(&self) -> &PluginVm {
        &self.core
    }

    fn dispatch_calls(self: &Rc<Self>) {
        let (http_calls, grpc_calls, grpc_streams) = {
            let mut effects = self.effects.lock();
            effects.grpc_stream_ops.clear();
            (
                std::mem::take(&mut effects.http_calls),
                std::mem::take(&mut effects.grpc_calls),
                std::mem::take(&mut effects.grpc_streams),
            )
        };
        for (token, _) in grpc_streams {
            // Streaming gRPC from network plugins is not wired yet: the stream closes at once.
            let result = self.vm.borrow_mut().on_grpc_close(
                token,
                12,
                "gRPC streams from network plugins are not supported",
            );
            if let Err(error) = result {
                tracing::warn!(plugin = %self.spec.name, "closing a gRPC stream: {error}");
            }
        }
        spawn_unary_calls(self, grpc_calls, http_calls);
    }
}

// === listener state ===

/// A TCP proxy listener on one worker.
pub(crate) struct TcpListenerState {
    pub spec: ListenerSpec,
    /// Where connections go, swapped whole by a reload; a connection keeps its upstream.
    pub proxy: RefCell<Rc<TcpProxySpec>>,
    /// Swapped whole by a chain update; a connection keeps the chain it started with.
    pub chain: RefCell<Rc<NetworkChain>>,
    pub clusters: Rc<TcpClusters>,
    pub stats: Arc<GatewayStats>,
}

/// A listener's network plugins on one worker.
pub(crate) struct NetworkChain {
    pub plugins: Vec<Rc<NetworkPlugin>>,
    /// FAIL_CLOSE plugins whose module could not be had: every connection is closed at once.
    pub missing_plugins: Vec<String>,
}

/// The clusters as TCP destinations: endpoints round robin, per worker.
pub(crate) struct TcpClusters {
    /// Replaced whole by a reload that changes the clusters.
    clusters: RefCell<HashMap<String, (ClusterSpec, Cell<usize>)>>,
}

impl TcpClusters {
    pub fn new(specs: &[ClusterSpec]) -> Self {
        Self {
            clusters: RefCell::new(Self::table(specs)),
        }
    }

    fn table(specs: &[ClusterSpec]) -> HashMap<String, (ClusterSpec, Cell<usize>)> {
        specs
            .iter()
            .map(|c| (c.name.clone(), (c.clone(), Cell::new(0))))
            .collect()
    }

    /// Connections already open keep their upstream; new ones use `specs`.
    pub fn replace(&self, specs: &[ClusterSpec]) {
        *self.clusters.borrow_mut() = Self::table(specs);
    }

    /// The next endpoint of `cluster` and its connect timeout.
    fn next_endpoint(&self, cluster: &str) -> Result<(String, Duration), (PeerType, String)> {
        let clusters = self.clusters.borrow();
        let Some((spec, next)) = clusters.get(cluster) else {
            return Err((PeerType::Local, format!("unknown cluster {cluster}")));
        };
        if spec.endpoints.is_empty() {
            return Err((
                PeerType::Local,
                format!("cluster {cluster} has no endpoints"),
            ));
        }
        let index = next.get();
        next.set(index.wrapping_add(1));
        let endpoint = spec.endpoints[index % spec.endpoints.len()].clone();
        Ok((endpoint, spec.connect_timeout))
    }

    /// Connects to the next endpoint of `cluster` within its connect timeout.
    async fn connect(&self, cluster: &str) -> Result<TcpStream, (PeerType, String)> {
        // The table is not borrowed across the connect: a reload may replace it meanwhile.
        let (endpoint, connect_timeout) = self.next_endpoint(cluster)?;
        match tokio::time::timeout(connect_timeout, TcpStream::connect(endpoint.as_str())).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                Ok(stream)
            }
            // Refused or reset: the upstream's doing.
            Ok(Err(error)) => Err((PeerType::Remote, format!("{cluster} ({endpoint}): {error}"))),
            Err(_) => Err((
                PeerType::Local,
                format!("{cluster} ({endpoint}): connect timeout"),
            )),
        }
    }
}

// === the chain of one connection ===

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Downstream,
    Upstream,
}

impl Side {
    fn stream(self) -> StreamType {
        match self {
            Side::Downstream => StreamType::Downstream,
            Side::Upstream => StreamType::Upstream,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Why a connection is being torn down by the gateway.
/// A plugin called `proxy_close_stream`, failed (fail-closed), the buffer limit was hit...: the
/// reason, as Envoy's termination details name it.
#[derive(Debug)]
struct Close(&'static str);

struct Stage {
    plugin: Rc<NetworkPlugin>,
    /// `None` when the plugin is skipped (failed with FAIL_OPEN) or finished.
    context: Option<u32>,
    /// Per side: bytes held while the plugin pauses, and whether end of stream came with them.
    held: [Option<(Vec<u8>, bool)>; 2],
}

struct TcpChain {
    stages: Vec<Stage>,
    buffer_limit: usize,
    finished: bool,
}

impl TcpChain {
    fn new(
        plugins: &[Rc<NetworkPlugin>],
        info: &StreamInfo,
        buffer_limit: usize,
    ) -> Result<Self, Close> {
        let mut chain = Self {
            stages: Vec::with_capacity(plugins.len()),
            buffer_limit,
            finished: false,
        };
        for plugin in plugins {
            let context = Self::open(plugin, info)?;
            chain.stages.push(Stage {
                plugin: plugin.clone(),
                context,
                held: [None, None],
            });
        }
        Ok(chain)
    }

    fn open(plugin: &Rc<NetworkPlugin>, info: &StreamInfo) -> Result<Option<u32>, Close> {
        if plugin.failure().is_some() {
            match plugin.spec.failure_policy {
                FailurePolicy::FailOpen => return Ok(None),
                FailurePolicy::FailClosed => return Err(Close("wasm_fail_stream")),
                FailurePolicy::FailReload => {
                    if !plugin.try_reload() {
                        return Err(Close("wasm_fail_stream"));
                    }
                }
            }
        }
        let mut vm = plugin.vm.borrow_mut();
        match vm.create_stream_with(plugin.root.get(), info.clone()) {
            Ok(context) => Ok(Some(context)),
            Err(error) => {
                drop(vm);
                Self::on_error(plugin, &error).map(|()| None)
            }
        }
    }

    fn on_error(plugin: &NetworkPlugin, error: &VmError) -> Result<(), Close> {
        tracing::warn!(plugin = %plugin.spec.name, "{error}");
        match plugin.spec.failure_policy {
            FailurePolicy::FailOpen => Ok(()),
            _ => Err(Close("wasm_fail_stream")),
        }
    }

    fn plugins(&self) -> Vec<Rc<NetworkPlugin>> {
        self.stages.iter().map(|s| s.plugin.clone()).collect()
    }

    /// Stage indexes in the order `side`'s data visits them.
    fn order(&self, side: Side) -> Vec<usize> {
        let count = self.stages.len();
        match side {
            Side::Downstream => (0..count).collect(),
            Side::Upstream => (0..count).rev().collect(),
        }
    }

    /// Runs one callback, then applies what the plugin asked for meanwhile.
    fn call(
        &mut self,
        index: usize,
        side: Side,
        callback: impl FnOnce(&mut Vm, u32) -> Result<Action, VmError>,
    ) -> Result<Action, Close> {
        let stage = &mut self.stages[index];
        let Some(context) = stage.context else {
            return Ok(Action::Continue);
        };
        let plugin = stage.plugin.clone();
        let result = callback(&mut plugin.vm.borrow_mut(), context);
        plugin.dispatch_calls();
        let action = match result {
            Ok(action) => action,
            Err(error) => {
                Self::on_error(&plugin, &error)?;
                stage.context = None;
                return Ok(Action::Continue);
            }
        };
        let mut effects = plugin.effects.lock();
        if !effects.closed.is_empty() && Self::take_closed(&mut effects.closed, context) {
            return Err(Close("wasm_close_stream"));
        }
        if action.is_continue() && !effects.continued.is_empty() {
            // A continue given while the stream was not paused means nothing later.
            effects.continued.remove(&(context, side.stream()));
        }
        Ok(action)
    }

    fn take_closed(closed: &mut HashSet<(u32, StreamType)>, context: u32) -> bool {
        let before = closed.len();
        closed.retain(|(c, _)| *c != context);
        closed.len() != before
    }

    /// A callback that returns nothing (the close callbacks); failures are only logged, the
    /// connection is going anyway.
    fn notify_all(
        &mut self,
        side: Side,
        what: &str,
        callback: impl Fn(&mut Vm, u32) -> Result<(), VmError>,
    ) {
        for index in self.order(side) {
            let stage = &mut self.stages[index];
            let Some(context) = stage.context else {
                continue;
            };
            let result = callback(&mut stage.plugin.vm.borrow_mut(), context);
            stage.plugin.dispatch_calls();
            if let Err(error) = result {
                tracing::warn!(plugin = %stage.plugin.spec.name, "{what}: {error}");
                stage.context = None;
            }
        }
    }

    /// `proxy_on_new_connection` through the chain; a Pause waits for the plugin to continue the
    /// DOWNSTREAM stream (or close it, or fail) before the next plugin sees the connection.
    async fn new_connection(&mut self, limit: Duration) -> Result<(), Close> {
        for index in 0..self.stages.len() {
            let action = self.call(index, Side::Downstream, |vm, ctx| vm.on_new_connection(ctx))?;
            if action.is_continue() {
                continue;
            }
            let deadline = tokio::time::Instant::now() + limit;
            loop {
                let plugin = self.stages[index].plugin.clone();
                let notified = plugin.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let Some(context) = self.stages[index].context else {
                    break;
                };
                {
                    let mut effects = plugin.effects.lock();
                    if Self::take_closed(&mut effects.closed, context) {
                        return Err(Close("wasm_close_stream"));
                    }
                    if effects.continued.remove(&(context, StreamType::Downstream)) {
                        break;
                    }
                }
                if let Some(reason) = plugin.failure() {
                    tracing::warn!(plugin = %plugin.spec.name, "plugin failed while the connection was paused: {reason}");
                    self.stages[index].context = None;
                    if plugin.spec.failure_policy == FailurePolicy::FailOpen {
                        break;
                    }
                    return Err(Close("wasm_fail_stream"));
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    tracing::warn!(plugin = %plugin.spec.name, "the plugin paused the connection and never continued it");
                    return Err(Close("wasm_pause_timeout"));
                }
            }
        }
        Ok(())
    }

    /// Bytes (and end of stream) from `side` through the chain, from the stage at `order[0]`.
    /// Returns what passes every plugin now, and whether end of stream passed with it.
    fn data_from(
        &mut self,
        side: Side,
        order: &[usize],
        mut chunk: Vec<u8>,
        mut eos: bool,
    ) -> Result<(Vec<u8>, bool), Close> {
        for &index in order {
            if self.stages[index].context.is_none() {
                continue;
            }
            let held = self.stages[index].held[side.index()].take();
            let buffering = held.is_some();
            let mut data = match held {
                Some((mut held, held_eos)) => {
                    held.extend_from_slice(&chunk);
                    eos |= held_eos;
                    held
                }
                None => chunk,
            };
            if !buffering && data.is_empty() && !eos {
                return Ok((data, false));
            }
            if buffering && data.len() > self.buffer_limit {
                return Err(Close("buffer_limit_exceeded"));
            }
            let fail_open =
                self.stages[index].plugin.spec.failure_policy == FailurePolicy::FailOpen;
            let backup = fail_open.then(|| data.clone());
            self.put(index, side, data);
            let action = self.call(index, side, |vm, ctx| match side {
                Side::Downstream => vm.on_downstream_data(ctx, eos),
                Side::Upstream => vm.on_upstream_data(ctx, eos),
            })?;
            data = match (self.take(index, side), backup) {
                (Some(data), _) if self.stages[index].context.is_some() => data,
                // The plugin failed (FAIL_OPEN): the bytes go on as they came.
                (_, Some(backup)) => backup,
                (taken, None) => taken.unwrap_or_default(),
            };
            if !action.is_continue() {
                if data.len() > self.buffer_limit {
                    return Err(Close("buffer_limit_exceeded"));
                }
                self.stages[index].held[side.index()] = Some((data, eos));
                return Ok((Vec::new(), false));
            }
            chunk = data;
        }
        Ok((chunk, eos))
    }

    fn put(&self, index: usize, side: Side, data: Vec<u8>) {
        let stage = &self.stages[index];
        let Some(context) = stage.context else {
            return;
        };
        if let Some(stream) = stage.plugin.vm.borrow_mut().stream_mut(context) {
            match side {
                Side::Downstream => stream.downstream_data = Some(data),
                Side::Upstream => stream.upstream_data = Some(data),
            }
        }
    }

    fn take(&self, index: usize, side: Side) -> Option<Vec<u8>> {
        let stage = &self.stages[index];
        let context = stage.context?;
        let mut vm = stage.plugin.vm.borrow_mut();
        let stream = vm.stream_mut(context)?;
        match side {
            Side::Downstream => stream.downstream_data.take(),
            Side::Upstream => stream.upstream_data.take(),
        }
    }

    fn data(&mut self, side: Side, chunk: Vec<u8>, eos: bool) -> Result<(Vec<u8>, bool), Close> {
        let order = self.order(side);
        self.data_from(side, &order, chunk, eos)
    }

    /// Applies what plugins asked for outside their data callbacks (after an `http_call`
    /// answered, on a tick): closes, continues of paused sides, failures of paused plugins.
    /// Returns the bytes released per side, with their end of stream.
    fn poll_effects(&mut self) -> Result<[(Vec<u8>, bool); 2], Close> {
        let mut released = [(Vec::new(), false), (Vec::new(), false)];
        for index in 0..self.stages.len() {
            let Some(context) = self.stages[index].context else {
                continue;
            };
            let plugin = self.stages[index].plugin.clone();
            if Self::take_closed(&mut plugin.effects.lock().closed, context) {
                return Err(Close("wasm_close_stream"));
            }
        }
        for side in [Side::Downstream, Side::Upstream] {
            let order = self.order(side);
            for (position, &index) in order.iter().enumerate() {
                if self.stages[index].held[side.index()].is_none() {
                    continue;
                }
                let plugin = self.stages[index].plugin.clone();
                let resumed = match self.stages[index].context {
                    Some(context) => plugin
                        .effects
                        .lock()
                        .continued
                        .remove(&(context, side.stream())),
                    None => true,
                };
                let failed = !resumed && plugin.failure().is_some();
                if failed {
                    tracing::warn!(plugin = %plugin.spec.name, "plugin failed while the connection was paused");
                    self.stages[index].context = None;
                    if plugin.spec.failure_policy != FailurePolicy::FailOpen {
                        return Err(Close("wasm_fail_stream"));
                    }
                }
                if !resumed && !failed {
                    continue;
                }
                let Some((held, eos)) = self.stages[index].held[side.index()].take() else {
                    continue;
                };
                let (passed, passed_eos) =
                    self.data_from(side, &order[position + 1..], held, eos)?;
                let out = &mut released[side.index()];
                out.0.extend_from_slice(&passed);
                out.1 |= passed_eos;
            }
        }
        Ok(released)
    }

    /// Ends the connection in every plugin: `on_done`, `on_log`, `on_delete`.
    fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        for stage in &mut self.stages {
            if let Some(context) = stage.context.take() {
                let result = stage.plugin.vm.borrow_mut().finish_tcp_stream(context);
                if let Err(error) = result {
                    tracing::debug!(plugin = %stage.plugin.spec.name, "finishing a connection: {error}");
                }
                let mut effects = stage.plugin.effects.lock();
                effects.continued.retain(|(c, _)| *c != context);
                effects.closed.retain(|(c, _)| *c != context);
            }
        }
    }
}

impl Drop for TcpChain {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Waits until any of `plugins` is woken (a callout answered, a tick ran...).
async fn any_notified(plugins: &[Rc<NetworkPlugin>]) {
    if plugins.is_empty() {
        return std::future::pending().await;
    }
    let mut waits: Vec<_> = plugins
        .iter()
        .map(|p| Box::pin(p.notify.notified()))
        .collect();
    poll_fn(|cx| {
        for wait in &mut waits {
            if wait.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    })
    .await
}

async fn read_some<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    poll_fn(|cx| {
        let mut buf = ReadBuf::new(buf);
        match Pin::new(&mut *reader).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(buf.filled().len())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

async fn write_some<W: AsyncWrite + Unpin>(writer: &mut W, buf: &[u8]) -> io::Result<usize> {
    poll_fn(|cx| Pin::new(&mut *writer).poll_write(cx, buf)).await
}

async fn shutdown_write<W: AsyncWrite + Unpin>(writer: &mut W) -> io::Result<()> {
    poll_fn(|cx| Pin::new(&mut *writer).poll_shutdown(cx)).await
}

async fn write_all<W: AsyncWrite + Unpin>(writer: &mut W, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let n = write_some(writer, buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    Ok(())
}

// === TLS ClientHello ===

enum Hello {
    NeedMore,
    /// Not TLS, or not a ClientHello we can read: no SNI.
    NotTls,
    Parsed(Option<String>),
}

/// Reads the SNI of a TLS ClientHello at the start of `data`, as Envoy's tls_inspector does. The
/// handshake message may span several records.
fn client_hello_sni(data: &[u8]) -> Hello {
    let mut handshake = Vec::new();
    let mut rest = data;
    loop {
        if rest.is_empty() {
            return Hello::NeedMore;
        }
        if rest[0] != 0x16 {
            return Hello::NotTls;
        }
        if rest.len() < 5 {
            return Hello::NeedMore;
        }
        if rest[1] != 3 {
            return Hello::NotTls;
        }
        let length = u16::from_be_bytes([rest[3], rest[4]]) as usize;
        if rest.len() < 5 + length {
            return Hello::NeedMore;
        }
        handshake.extend_from_slice(&rest[5..5 + length]);
        rest = &rest[5 + length..];
        if handshake.len() >= 4 {
            if handshake[0] != 1 {
                return Hello::NotTls;
            }
            let size = u32::from_be_bytes([0, handshake[1], handshake[2], handshake[3]]) as usize;
            if handshake.len() >= 4 + size {
                return parse_client_hello(&handshake[4..4 + size])
                    .map_or(Hello::NotTls, Hello::Parsed);
            }
        }
    }
}

/// The server name of a ClientHello body, `Some(None)` when it sends none.
fn parse_client_hello(body: &[u8]) -> Option<Option<String>> {
    struct Reader<'a>(&'a [u8]);
    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            if self.0.len() < n {
                return None;
            }
            let (head, tail) = self.0.split_at(n);
            self.0 = tail;
            Some(head)
        }
        fn u8(&mut self) -> Option<usize> {
            self.take(1).map(|b| b[0] as usize)
        }
        fn u16(&mut self) -> Option<usize> {
            self.take(2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
        }
    }
    let mut r = Reader(body);
    r.take(2 + 32)?; // version, random
    let session = r.u8()?;
    r.take(session)?;
    let suites = r.u16()?;
    r.take(suites)?;
    let compression = r.u8()?;
    r.take(compression)?;
    if r.0.is_empty() {
        return Some(None);
    }
    let extensions = r.u16()?;
    let mut extensions = Reader(r.take(extensions)?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let length = extensions.u16()?;
        let data = extensions.take(length)?;
        if kind != 0 {
            continue;
        }
        let mut list = Reader(data);
        let list_length = list.u16()?;
        let mut names = Reader(list.take(list_length)?);
        while !names.0.is_empty() {
            let name_type = names.u8()?;
            let length = names.u16()?;
            let name = names.take(length)?;
            if name_type == 0 {
                return Some(std::str::from_utf8(name).ok().map(str::to_ascii_lowercase));
            }
        }
    }
    Some(None)
}

// === a connection ===

/// One accepted TCP connection, to the end.
pub(crate) async fn connection(
    state: Rc<TcpListenerState>,
    mut downstream: TcpStream,
    remote: SocketAddr,
    id: u64,
    mut shutdown: watch::Receiver<bool>,
) {
    let local = downstream.local_addr().unwrap_or(state.spec.address);
    let limits = &state.spec.limits;
    let active = state.chain.borrow().clone();
    if !active.missing_plugins.is_empty() {
        tracing::debug!(listener = %state.spec.name, missing = ?active.missing_plugins, "closing a connection: plugins missing");
        return;
    }
    let proxy = state.proxy.borrow().clone();
    // TLS passthrough: the ClientHello's SNI picks the cluster; the bytes read go on as the
    // connection's first data.
    let mut initial = Vec::new();
    let mut sni = None;
    if !proxy.sni_routes.is_empty() {
        let inspect = async {
            let mut buf = vec![0u8; READ_CHUNK];
            loop {
                match client_hello_sni(&initial) {
                    Hello::NeedMore if initial.len() < MAX_CLIENT_HELLO => {}
                    Hello::Parsed(name) => return Ok::<_, io::Error>(name),
                    _ => return Ok(None),
                }
                let n = read_some(&mut downstream, &mut buf).await?;
                if n == 0 {
                    return Ok(None);
                }
                initial.extend_from_slice(&buf[..n]);
            }
        };
        match tokio::time::timeout(limits.header_read_timeout, inspect).await {
            Ok(Ok(name)) => sni = name,
            Ok(Err(error)) => {
                tracing::debug!(listener = %state.spec.name, %remote, "reading the ClientHello: {error}");
                return;
            }
            Err(_) => {
                tracing::debug!(listener = %state.spec.name, %remote, "no ClientHello within {:?}", limits.header_read_timeout);
                return;
            }
        }
    }
    let cluster = proxy.cluster_for(sni.as_deref()).to_owned();
    let info = StreamInfo {
        source: Some(remote),
        destination: Some(local),
        connection_id: Some(id),
        mtls: false,
        requested_server_name: sni,
        start_time: Some(SystemTime::now()),
        listener_name: Some(state.spec.name.clone()),
        cluster_name: Some(cluster.clone()),
        ..Default::default()
    };
    let mut chain = match TcpChain::new(&active.plugins, &info, limits.per_stream_buffer_limit) {
        Ok(chain) => chain,
        Err(close) => {
            tracing::debug!(listener = %state.spec.name, %remote, "closing a connection: {}", close.0);
            return;
        }
    };
    let mut proxy = Proxy {
        downstream_peer: PeerType::Local,
        upstream_closed: None,
    };
    let opened = tokio::select! {
        opened = chain.new_connection(limits.idle_timeout) => opened,
        _ = shutdown.changed() => Err(Close("shutdown")),
    };
    if let Err(close) = opened {
        tracing::debug!(listener = %state.spec.name, %remote, "closing a connection: {}", close.0);
        return proxy.finish(&mut chain);
    }
    let upstream = match state.clusters.connect(&cluster).await {
        Ok(upstream) => upstream,
        Err((peer, reason)) => {
            tracing::debug!(listener = %state.spec.name, %remote, "upstream connect failed: {reason}");
            proxy.upstream_closed = Some(peer);
            chain.notify_all(
                Side::Downstream,
                "on_upstream_connection_close",
                |vm, ctx| vm.on_upstream_connection_close(ctx, peer),
            );
            return proxy.finish(&mut chain);
        }
    };
    proxy
        .pump(
            &mut chain,
            split_tcp(downstream),
            split_tcp(upstream),
            initial,
            limits.idle_timeout,
            shutdown,
        )
        .await;
    proxy.finish(&mut chain);
}

/// A connection's read and write halves: a socket's, or an in-memory pipe's.
type Split = (Box<dyn AsyncRead + Unpin>, Box<dyn AsyncWrite + Unpin>);

fn split_tcp(stream: TcpStream) -> Split {
    let (read, write) = stream.into_split();
    (Box::new(read), Box::new(write))
}

fn split_io<S: AsyncRead + AsyncWrite + Unpin + 'static>(stream: S) -> Split {
    let (read, write) = tokio::io::split(stream);
    (Box::new(read), Box::new(write))
}

/// Network plugins on an HTTP listener, before the HTTP codec as Istio places them: the
/// connection's bytes (after TLS, as Envoy's transport socket decrypts first) pass the network
/// chain, and the HTTP server reads the other end of an in-memory pipe, which plays the upstream.
/// `None` when the chain refuses the connection (a failed FAIL_CLOSED plugin).
pub(crate) fn filter_before_http<S>(
    chain: &NetworkChain,
    downstream: S,
    info: StreamInfo,
    spec: &ListenerSpec,
) -> Option<tokio::io::DuplexStream>
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let limits = &spec.limits;
    let mut chain = match TcpChain::new(&chain.plugins, &info, limits.per_stream_buffer_limit) {
        Ok(chain) => chain,
        Err(close) => {
            tracing::debug!(listener = %spec.name, "closing a connection: {}", close.0);
            return None;
        }
    };
    let (http_side, chain_side) = tokio::io::duplex(READ_CHUNK * 4);
    let idle_timeout = limits.idle_timeout;
    tokio::task::spawn_local(async move {
        // The HTTP server drains its requests on shutdown and then closes the pipe, which ends
        // this task; a shutdown signal here would cut those requests short.
        let (_keep_open, no_shutdown) = watch::channel(false);
        let mut proxy = Proxy {
            downstream_peer: PeerType::Local,
            upstream_closed: None,
        };
        if let Err(close) = chain.new_connection(idle_timeout).await {
            tracing::debug!("closing a connection: {}", close.0);
            return proxy.finish(&mut chain);
        }
        proxy
            .pump(
                &mut chain,
                split_io(downstream),
                split_io(chain_side),
                Vec::new(),
                idle_timeout,
                no_shutdown,
            )
            .await;
        proxy.finish(&mut chain);
    });
    Some(http_side)
}

struct Proxy {
    /// Who ended the downstream connection.
    downstream_peer: PeerType,
    /// Set once `on_upstream_connection_close` has been delivered.
    upstream_closed: Option<PeerType>,
}

/// One side's write half and what waits to be written to it.
struct Outbox {
    writer: Option<Box<dyn AsyncWrite + Unpin>>,
    pending: Vec<u8>,
    /// End of stream passed the chain: half-close once `pending` is written.
    eos: bool,
    /// The half-close is done (or the side failed).
    shut: bool,
}

impl Outbox {
    fn new(writer: Box<dyn AsyncWrite + Unpin>) -> Self {
        Self {
            writer: Some(writer),
            pending: Vec::new(),
            eos: false,
            shut: false,
        }
    }

    fn push(&mut self, (bytes, eos): (Vec<u8>, bool)) {
        if !self.shut {
            self.pending.extend_from_slice(&bytes);
            self.eos |= eos;
        }
    }

    fn wants_write(&self) -> bool {
        !self.shut && !self.pending.is_empty()
    }

    fn wants_shutdown(&self) -> bool {
        !self.shut && self.pending.is_empty() && self.eos
    }

    /// Writes some of what is pending, or half-closes once all is written and end of stream passed.
    async fn drive(&mut self) -> io::Result<Progress> {
        let Some(writer) = self.writer.as_mut() else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        if self.pending.is_empty() {
            shutdown_write(writer).await?;
            return Ok(Progress::Shut);
        }
        match write_some(writer, &self.pending).await? {
            0 => Err(io::ErrorKind::WriteZero.into()),
            n => Ok(Progress::Wrote(n)),
        }
    }
}

enum Progress {
    Wrote(usize),
    Shut,
}

/// What a select round of [`Proxy::pump`] saw.
enum Event {
    Read(Side, io::Result<usize>),
    Drove(Side, io::Result<Progress>),
    Woken,
    Idle,
    Shutdown,
    DrainEnded,
}

/// How long a TCP proxy connection may go on after shutdown begins: less than the worker's own
/// drain wait (30 s), so a connection closed at the deadline still gets its close callbacks.
const TCP_DRAIN_TIMEOUT: Duration = Duration::from_secs(25);

impl Proxy {
    #[allow(clippy::too_many_arguments)]
    async fn pump(
        &mut self,
        chain: &mut TcpChain,
        downstream: Split,
        upstream: Split,
        initial: Vec<u8>,
        idle_timeout: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let plugins = chain.plugins();
        let (mut down_read, down_write) = downstream;
        let (mut up_read, up_write) = upstream;
        // Indexed by the side the bytes go to.
        let mut to_down = Outbox::new(down_write);
        let mut to_up = Outbox::new(up_write);
        let mut reading = [true, true];
        let mut down_buf = vec![0u8; READ_CHUNK];
        let mut up_buf = vec![0u8; READ_CHUNK];
        let mut downstream_eof_last = false;
        let mut failure: Option<Close> = None;
        if !initial.is_empty() {
            match chain.data(Side::Downstream, initial, false) {
                Ok(out) => to_up.push(out),
                Err(close) => failure = Some(close),
            }
        }
        let idle = tokio::time::sleep(idle_timeout);
        tokio::pin!(idle);
        // On shutdown a connection drains: it goes on until either side ends it, or until the
        // drain deadline closes it (before the worker stops waiting, so close callbacks run).
        let drain = tokio::time::sleep(Duration::MAX / 4);
        tokio::pin!(drain);
        let mut draining = false;
        while failure.is_none() {
            match chain.poll_effects() {
                Ok([down, up]) => {
                    to_up.push(down);
                    to_down.push(up);
                }
                Err(close) => {
                    failure = Some(close);
                    break;
                }
            }
            let done = !reading[0] && !reading[1] && to_down.shut && to_up.shut;
            if done {
                break;
            }
            let event = tokio::select! {
                r = read_some(&mut down_read, &mut down_buf),
                    if reading[Side::Downstream.index()] && to_up.pending.is_empty() =>
                    Event::Read(Side::Downstream, r),
                r = read_some(&mut up_read, &mut up_buf),
                    if reading[Side::Upstream.index()] && to_down.pending.is_empty() =>
                    Event::Read(Side::Upstream, r),
                r = to_up.drive(), if to_up.wants_write() || to_up.wants_shutdown() =>
                    Event::Drove(Side::Upstream, r),
                r = to_down.drive(), if to_down.wants_write() || to_down.wants_shutdown() =>
                    Event::Drove(Side::Downstream, r),
                _ = any_notified(&plugins) => Event::Woken,
                _ = &mut idle => Event::Idle,
                _ = shutdown.changed(), if !draining => Event::Shutdown,
                _ = &mut drain, if draining => Event::DrainEnded,
            };
            if !matches!(event, Event::Woken) {
                idle.as_mut()
                    .reset(tokio::time::Instant::now() + idle_timeout);
            }
            match event {
                Event::Read(side, Ok(n)) => {
                    let eos = n == 0;
                    if eos && side == Side::Downstream {
                        downstream_eof_last = to_down.shut;
                    }
                    let (buf, out) = match side {
                        Side::Downstream => (&down_buf, &mut to_up),
                        Side::Upstream => (&up_buf, &mut to_down),
                    };
                    if eos {
                        reading[side.index()] = false;
                    }
                    match chain.data(side, buf[..n].to_vec(), eos) {
                        Ok(passed) => out.push(passed),
                        Err(close) => failure = Some(close),
                    }
                    if eos && side == Side::Upstream && failure.is_none() {
                        // As Envoy: the upstream's end of stream is its close, seen by the
                        // plugins after their last `on_upstream_data`.
                        self.upstream_closed = Some(PeerType::Remote);
                        chain.notify_all(
                            Side::Upstream,
                            "on_upstream_connection_close",
                            |vm, ctx| vm.on_upstream_connection_close(ctx, PeerType::Remote),
                        );
                    }
                }
                Event::Read(side, Err(error)) => {
                    tracing::debug!(?side, "read failed: {error}");
                    reading[side.index()] = false;
                    match side {
                        Side::Downstream => {
                            // Reset by the client: nothing more can go either way.
                            self.downstream_peer = PeerType::Remote;
                            return;
                        }
                        Side::Upstream => {
                            self.upstream_closed = Some(PeerType::Remote);
                            chain.notify_all(
                                Side::Upstream,
                                "on_upstream_connection_close",
                                |vm, ctx| vm.on_upstream_connection_close(ctx, PeerType::Remote),
                            );
                            break;
                        }
                    }
                }
                Event::Drove(side, result) => {
                    let out = match side {
                        Side::Downstream => &mut to_down,
                        Side::Upstream => &mut to_up,
                    };
                    match result {
                        Ok(Progress::Wrote(n)) => {
                            out.pending.drain(..n);
                        }
                        Ok(Progress::Shut) => out.shut = true,
                        Err(error) => {
                            tracing::debug!(?side, "write failed: {error}");
                            out.shut = true;
                            out.pending.clear();
                            if side == Side::Downstream {
                                self.downstream_peer = PeerType::Remote;
                                return;
                            }
                            self.upstream_closed = Some(PeerType::Remote);
                            chain.notify_all(
                                Side::Upstream,
                                "on_upstream_connection_close",
                                |vm, ctx| vm.on_upstream_connection_close(ctx, PeerType::Remote),
                            );
                            break;
                        }
                    }
                }
                Event::Woken => {}
                Event::Idle => {
                    failure = Some(Close("idle_timeout"));
                }
                Event::Shutdown => {
                    draining = true;
                    drain
                        .as_mut()
                        .reset(tokio::time::Instant::now() + TCP_DRAIN_TIMEOUT);
                }
                Event::DrainEnded => failure = Some(Close("shutdown")),
            }
        }
        if let Some(close) = &failure {
            tracing::debug!("closing a TCP connection: {}", close.0);
            self.downstream_peer = PeerType::Local;
        } else if downstream_eof_last && to_down.shut {
            // The client's close came last: its doing.
            self.downstream_peer = PeerType::Remote;
        } else if !reading[Side::Downstream.index()] && to_down.shut {
            self.downstream_peer = PeerType::Local;
        }
        // FlushWrite, as Envoy closes: what already passed the chain reaches the client.
        drop(up_read);
        drop(to_up);
        if let Some(mut writer) = to_down.writer.take()
            && !to_down.shut
        {
            let flush = async {
                write_all(&mut writer, &to_down.pending).await?;
                shutdown_write(&mut writer).await
            };
            let _ = tokio::time::timeout(FLUSH_TIMEOUT, flush).await;
        }
    }

    /// The close callbacks, then `on_done`, `on_log`, `on_delete` in every plugin.
    fn finish(&mut self, chain: &mut TcpChain) {
        if self.upstream_closed.is_none() {
            self.upstream_closed = Some(PeerType::Local);
            chain.notify_all(Side::Upstream, "on_upstream_connection_close", |vm, ctx| {
                vm.on_upstream_connection_close(ctx, PeerType::Local)
            });
        }
        let peer = self.downstream_peer;
        chain.notify_all(
            Side::Downstream,
            "on_downstream_connection_close",
            |vm, ctx| vm.on_downstream_connection_close(ctx, peer),
        );
        chain.finish();
    }
}

/// Accepts connections on a TCP proxy listener; each gets its own task.
pub(crate) async fn accept_loop(
    state: Rc<TcpListenerState>,
    socket: tokio::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
    connection_ids: Arc<std::sync::atomic::AtomicU64>,
    tracker: Rc<ConnectionTracker>,
) {
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
        let id = connection_ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let guard = tracker.enter(state.stats.clone());
        let (state, shutdown) = (state.clone(), shutdown.clone());
        tokio::task::spawn_local(async move {
            let _guard = guard;
            connection(state, stream, remote, id, shutdown).await;
        });
    }
}

/// Counts a worker's open TCP proxy connections, so that shutdown can wait for their close
/// callbacks.
#[derive(Default)]
pub(crate) struct ConnectionTracker {
    open: Cell<usize>,
    idle: Notify,
}

pub(crate) struct TrackerGuard {
    tracker: Rc<ConnectionTracker>,
    stats: Arc<GatewayStats>,
}

impl ConnectionTracker {
    pub fn enter(self: &Rc<Self>, stats: Arc<GatewayStats>) -> TrackerGuard {
        self.open.set(self.open.get() + 1);
        stats
            .active_connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        TrackerGuard {
            tracker: self.clone(),
            stats,
        }
    }

    /// Waits until no connection is open.
    pub async fn drained(&self) {
        while self.open.get() > 0 {
            self.idle.notified().await;
        }
    }
}

impl Drop for TrackerGuard {
    fn drop(&mut self) {
        self.stats
            .active_connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.tracker.open.set(self.tracker.open.get() - 1);
        if self.tracker.open.get() == 0 {
            self.tracker.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello with an SNI extension, as a TLS client sends it.
    fn client_hello(name: &str) -> Vec<u8> {
        let mut sni = Vec::new();
        let entry_len = 3 + name.len();
        sni.extend_from_slice(&(entry_len as u16).to_be_bytes());
        sni.push(0);
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name.as_bytes());
        let mut extensions = Vec::new();
        extensions.extend_from_slice(&[0, 0]);
        extensions.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        extensions.extend_from_slice(&sni);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0);
        body.extend_from_slice(&[0, 2, 0x13, 0x01]);
        body.extend_from_slice(&[1, 0]);
        body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
        body.extend_from_slice(&extensions);
        let mut handshake = vec![1];
        handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        handshake.extend_from_slice(&body);
        let mut record = vec![0x16, 3, 1];
        record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
        record.extend_from_slice(&handshake);
        record
    }

    #[test]
    fn reads_the_sni_of_a_client_hello() {
        let hello = client_hello("A.example.com");
        assert!(matches!(client_hello_sni(&hello), Hello::Parsed(Some(n)) if n == "a.example.com"));
        for cut in [0, 3, 10, hello.len() - 1] {
            assert!(
                matches!(client_hello_sni(&hello[..cut]), Hello::NeedMore),
                "{cut}"
            );
        }
        assert!(matches!(
            client_hello_sni(b"GET / HTTP/1.1\r\n"),
            Hello::NotTls
        ));
        // Split over two records.
        let handshake = &hello[5..];
        let mut split = vec![0x16, 3, 1, 0, 10];
        split.extend_from_slice(&handshake[..10]);
        split.extend_from_slice(&[0x16, 3, 1]);
        split.extend_from_slice(&((handshake.len() - 10) as u16).to_be_bytes());
        split.extend_from_slice(&handshake[10..]);
        assert!(matches!(client_hello_sni(&split), Hello::Parsed(Some(n)) if n == "a.example.com"));
    }
}
