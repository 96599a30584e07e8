//! The Proxy-Wasm filter chain of one stream on one worker.
//!
//! Request callbacks run in chain order, response callbacks in reverse, as Envoy's decoder and
//! encoder chains do. Pause from a headers callback holds the stream until the plugin calls
//! `proxy_continue_stream` (after an `http_call` answers, say); Pause from a body callback buffers,
//! and the next call sees the accumulated body. A local reply ends the chain.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use wasmgate_abi::{Action, HeaderMap, LocalResponse, StreamInfo, StreamType};
use wasmgate_runtime::{Runtime, SharedHeaders, StreamData, Vm, VmError};

use crate::host::ClusterNames;
use crate::plugin_vm::{PluginVm, WorkerPlugin, spawn_unary_calls};
use crate::spec::{FailurePolicy, FilterSpec};
use crate::stats::GatewayStats;
use crate::upstream::UpstreamsCell;

/// How long a paused stream waits for its plugin to continue before the gateway gives up.
const PAUSE_DEADLINE: Duration = Duration::from_secs(60);

/// One HTTP filter plugin on one worker (see [`PluginVm`]), with its open gRPC streams.
pub(crate) struct Plugin {
    core: PluginVm,
    touches_request_body: bool,
    touches_response_body: bool,
    /// Open gRPC streams: where the plugin's messages go, and the task to cancel.
    grpc_streams: RefCell<std::collections::HashMap<u32, GrpcStream>>,
}

impl std::ops::Deref for Plugin {
    type Target = PluginVm;

    fn deref(&self) -> &PluginVm {
        &self.core
    }
}

impl WorkerPlugin for Plugin {
    fn core(&self) -> &PluginVm {
        &self.core
    }

    fn dispatch_calls(self: &Rc<Self>) {
        if !self.effects.any_queued() {
            return;
        }
        self.dispatch_grpc_streams();
        let (grpc_calls, http_calls) = {
            let mut effects = self.effects.lock();
            (
                std::mem::take(&mut effects.grpc_calls),
                std::mem::take(&mut effects.http_calls),
            )
        };
        spawn_unary_calls(self, grpc_calls, http_calls);
    }
}

struct GrpcStream {
    sender: Option<
        tokio::sync::mpsc::Sender<Result<hyper::body::Frame<bytes::Bytes>, crate::body::BoxError>>,
    >,
    task: tokio::task::AbortHandle,
}

impl Plugin {
    pub fn start(
        spec: FilterSpec,
        runtime: Arc<Runtime>,
        clusters: Arc<ClusterNames>,
        upstreams: Rc<UpstreamsCell>,
        stats: Arc<GatewayStats>,
    ) -> Result<Rc<Self>, VmError> {
        let callbacks = &spec.module.info().callbacks;
        let touches_request_body = callbacks.iter().any(|c| c == "proxy_on_request_body");
        let touches_response_body = callbacks.iter().any(|c| c == "proxy_on_response_body");
        let core = PluginVm::start(spec, runtime, clusters, upstreams, stats, "plugin")?;
        Ok(Rc::new(Self {
            core,
            touches_request_body,
            touches_response_body,
            grpc_streams: RefCell::new(std::collections::HashMap::new()),
        }))
    }
}

impl Plugin {
    /// Runs `deliver` on the VM, then whatever the plugin asked for meanwhile.
    fn deliver(self: &Rc<Self>, what: &str, deliver: impl FnOnce(&mut Vm) -> Result<(), VmError>) {
        let result = deliver(&mut self.vm.borrow_mut());
        if let Err(error) = result {
            tracing::warn!(plugin = %self.spec.name, "delivering {what}: {error}");
        }
        self.dispatch_calls();
        self.notify.notify_waiters();
    }

    /// Opens the gRPC streams the plugin asked for and passes on its sends, half-closes and cancels,
    /// in the order it made them.
    fn dispatch_grpc_streams(self: &Rc<Self>) {
        use crate::host::GrpcStreamOp;
        let (opened, ops) = {
            let mut effects = self.effects.lock();
            (
                std::mem::take(&mut effects.grpc_streams),
                std::mem::take(&mut effects.grpc_stream_ops),
            )
        };
        for (token, call) in opened {
            let (sender, body) = crate::body::GatewayBody::channel();
            let plugin = self.clone();
            let task =
                tokio::task::spawn_local(
                    async move { plugin.run_grpc_stream(token, call, body).await },
                );
            self.grpc_streams.borrow_mut().insert(
                token,
                GrpcStream {
                    sender: Some(sender),
                    task: task.abort_handle(),
                },
            );
        }
        for op in ops {
            let mut streams = self.grpc_streams.borrow_mut();
            match op {
                GrpcStreamOp::Send {
                    token,
                    message,
                    end_of_stream,
                } => {
                    let Some(stream) = streams.get_mut(&token) else {
                        continue;
                    };
                    let framed = bytes::Bytes::from(crate::upstream::grpc_frame(&message));
                    if let Some(sender) = &stream.sender {
                        let sender = sender.clone();
                        // The channel holds a few frames; a full one is drained by its own task.
                        if let Err(tokio::sync::mpsc::error::TrySendError::Full(frame)) =
                            sender.try_send(Ok(hyper::body::Frame::data(framed)))
                        {
                            tokio::task::spawn_local(async move {
                                let _ = sender.send(frame).await;
                            });
                        }
                    }
                    if end_of_stream {
                        stream.sender = None;
                    }
                }
                GrpcStreamOp::Close(token) => {
                    if let Some(stream) = streams.get_mut(&token) {
                        stream.sender = None;
                    }
                }
                GrpcStreamOp::Cancel(token) => {
                    // As in Envoy, a cancelled stream gets no more callbacks.
                    if let Some(stream) = streams.remove(&token) {
                        stream.task.abort();
                    }
                    self.vm.borrow_mut().end_grpc_call(token);
                }
            }
        }
    }

    async fn run_grpc_stream(
        self: Rc<Self>,
        token: u32,
        call: wasmgate_abi::GrpcStreamRequest,
        body: crate::body::GatewayBody,
    ) {
        use http_body_util::BodyExt;
        let close = |plugin: &Rc<Self>, status: u32, message: String| {
            plugin.grpc_streams.borrow_mut().remove(&token);
            plugin.deliver("a gRPC close", |vm| {
                vm.on_grpc_close(token, status, &message)
            });
        };
        let response = match self.upstreams.current().grpc_stream(&call, body).await {
            Ok(response) => response,
            Err((status, message)) => return close(&self, status, message),
        };
        let (parts, mut body) = response.into_parts();
        let field = |headers: &http::HeaderMap, name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let initial = crate::convert::plain_map(&parts.headers);
        self.deliver("gRPC initial metadata", |vm| {
            vm.on_grpc_receive_initial_metadata(token, initial)
        });
        let mut buffer = Vec::new();
        loop {
            match body.frame().await {
                None => {
                    // A trailers-only answer carries the status in its headers.
                    let status = field(&parts.headers, "grpc-status")
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(2);
                    return close(
                        &self,
                        status,
                        field(&parts.headers, "grpc-message").unwrap_or_default(),
                    );
                }
                Some(Err(error)) => return close(&self, 14, error.to_string()),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        buffer.extend_from_slice(&data);
                        while let Some(message) = crate::upstream::take_grpc_message(&mut buffer) {
                            self.deliver("a gRPC message", |vm| vm.on_grpc_receive(token, message));
                        }
                    }
                    Err(frame) => {
                        let Ok(trailers) = frame.into_trailers() else {
                            continue;
                        };
                        let status = field(&trailers, "grpc-status")
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(2);
                        let message = field(&trailers, "grpc-message").unwrap_or_default();
                        let map = crate::convert::plain_map(&trailers);
                        self.deliver("gRPC trailing metadata", |vm| {
                            vm.on_grpc_receive_trailing_metadata(token, map)
                        });
                        return close(&self, status, message);
                    }
                },
            }
        }
    }
}

/// Why a stream stops going through the chain.
#[derive(Debug)]
pub(crate) enum Halt {
    /// A plugin sent a local reply; `from` is its place in the chain.
    Reply {
        response: LocalResponse,
        from: usize,
    },
    /// The gateway answers itself (503 for a failed plugin, 413/500 over the buffer limit...).
    Status { code: u16, details: &'static str },
    /// A plugin closed the stream (`proxy_close_stream`): it is reset, as Envoy resets it, with
    /// no response (HTTP/1.1 closes the connection, HTTP/2 resets the stream).
    Reset,
}

pub(crate) type Flow<T> = Result<T, Halt>;

/// Whether the plugin closed the stream (either direction: Envoy resets the whole stream).
fn take_close(effects: &mut crate::host::Effects, context: u32) -> bool {
    let request = effects.closed.remove(&(context, StreamType::HttpRequest));
    let response = effects.closed.remove(&(context, StreamType::HttpResponse));
    request || response
}

struct Stage {
    plugin: Rc<Plugin>,
    /// `None` when the plugin is skipped (failed with FAIL_OPEN).
    context: Option<u32>,
    /// The body this stage holds back while it pauses from a body callback.
    held: Option<Vec<u8>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Request,
    Response,
}

impl Direction {
    fn stream(self) -> StreamType {
        match self {
            Direction::Request => StreamType::HttpRequest,
            Direction::Response => StreamType::HttpResponse,
        }
    }
}

/// Which of a direction's maps a callback gets.
#[derive(Clone, Copy)]
enum MapPart {
    Headers,
    Trailers,
}

impl MapPart {
    fn slot(self, stream: &mut StreamData, direction: Direction) -> &mut Option<SharedHeaders> {
        match (self, direction) {
            (Self::Headers, Direction::Request) => &mut stream.request_headers,
            (Self::Headers, Direction::Response) => &mut stream.response_headers,
            (Self::Trailers, Direction::Request) => &mut stream.request_trailers,
            (Self::Trailers, Direction::Response) => &mut stream.response_trailers,
        }
    }
}

pub(crate) struct Chain {
    stages: Vec<Stage>,
    buffer_limit: usize,
}

impl Chain {
    /// Creates a stream context in every plugin of the chain; each gets its own copy of `info`
    /// (the last one the original).
    pub fn new(plugins: &[Rc<Plugin>], info: StreamInfo, buffer_limit: usize) -> Flow<Self> {
        let mut stages = Vec::with_capacity(plugins.len());
        let mut info = Some(info);
        for (position, plugin) in plugins.iter().enumerate() {
            let info = if position + 1 == plugins.len() {
                info.take().unwrap_or_default()
            } else {
                info.clone().unwrap_or_default()
            };
            let context = Self::open(plugin, info)?;
            stages.push(Stage {
                plugin: plugin.clone(),
                context,
                held: None,
            });
        }
        Ok(Self {
            stages,
            buffer_limit,
        })
    }

    /// A chain with no plugins, left behind when a stream's chain moves to the task that streams
    /// its response body.
    pub fn empty() -> Self {
        Self {
            stages: Vec::new(),
            buffer_limit: 0,
        }
    }

    fn open(plugin: &Rc<Plugin>, info: StreamInfo) -> Flow<Option<u32>> {
        if plugin.failure().is_some() {
            match plugin.spec.failure_policy {
                FailurePolicy::FailOpen => return Ok(None),
                FailurePolicy::FailClosed => {
                    return Err(Halt::Status {
                        code: 503,
                        details: "wasm_fail_stream",
                    });
                }
                FailurePolicy::FailReload => {
                    if !plugin.try_reload() {
                        return Err(Halt::Status {
                            code: 503,
                            details: "wasm_fail_stream",
                        });
                    }
                }
            }
        }
        let mut vm = plugin.vm.borrow_mut();
        match vm.create_stream_with(plugin.root.get(), info) {
            Ok(context) => Ok(Some(context)),
            Err(error) => {
                drop(vm);
                Self::on_error(plugin, &error).map(|()| None)
            }
        }
    }

    fn on_error(plugin: &Plugin, error: &VmError) -> Flow<()> {
        tracing::warn!(plugin = %plugin.spec.name, "{error}");
        match plugin.spec.failure_policy {
            FailurePolicy::FailOpen => Ok(()),
            _ => Err(Halt::Status {
                code: 503,
                details: "wasm_fail_stream",
            }),
        }
    }

    pub fn len(&self) -> usize {
        self.stages.len()
    }

    pub fn touches_body(&self, direction: Direction) -> bool {
        self.stages.iter().any(|s| match direction {
            Direction::Request => s.plugin.touches_request_body,
            Direction::Response => s.plugin.touches_response_body,
        })
    }

    /// Stage indexes in the order `direction` visits them: the request path all of them in chain
    /// order, the response path in reverse through stage `through` (inclusive), or all.
    fn order(&self, direction: Direction, through: Option<usize>) -> Vec<usize> {
        self.visits(direction, through).collect()
    }

    /// [`Chain::order`] without allocating.
    fn visits(
        &self,
        direction: Direction,
        through: Option<usize>,
    ) -> impl Iterator<Item = usize> + use<> {
        let count = self.stages.len();
        // An empty chain visits nothing.
        let end = match direction {
            Direction::Request => count,
            Direction::Response => through.map_or(count, |t| (t + 1).min(count)),
        };
        let reverse = direction == Direction::Response;
        (0..end).map(move |i| if reverse { end - 1 - i } else { i })
    }

    /// Runs one callback, then applies what the plugin asked for meanwhile.
    fn call(
        &mut self,
        index: usize,
        direction: Direction,
        callback: impl FnOnce(&mut Vm, u32) -> Result<Action, VmError>,
    ) -> Flow<Action> {
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
        if !plugin.effects.any_queued() {
            return Ok(action);
        }
        let mut effects = plugin.effects.lock();
        if !effects.local_replies.is_empty()
            && let Some(response) = effects.local_replies.remove(&context)
        {
            return Err(Halt::Reply {
                response,
                from: index,
            });
        }
        if !effects.closed.is_empty() && take_close(&mut effects, context) {
            return Err(Halt::Reset);
        }
        if action.is_continue() && !effects.continued.is_empty() {
            // A continue given while the stream was not paused means nothing later.
            effects.continued.remove(&(context, direction.stream()));
        }
        Ok(action)
    }

    /// Waits until the plugin at `index` continues the paused stream, replies, or fails.
    async fn wait(&mut self, index: usize, direction: Direction) -> Flow<()> {
        let stage = &self.stages[index];
        let Some(context) = stage.context else {
            return Ok(());
        };
        let plugin = stage.plugin.clone();
        let deadline = tokio::time::Instant::now() + PAUSE_DEADLINE;
        loop {
            let notified = plugin.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut effects = plugin.effects.lock();
                if let Some(response) = effects.local_replies.remove(&context) {
                    return Err(Halt::Reply {
                        response,
                        from: index,
                    });
                }
                if take_close(&mut effects, context) {
                    return Err(Halt::Reset);
                }
                if effects.continued.remove(&(context, direction.stream())) {
                    return Ok(());
                }
            }
            if let Some(reason) = plugin.failure() {
                tracing::warn!(plugin = %plugin.spec.name, "plugin failed while the stream was paused: {reason}");
                self.stages[index].context = None;
                return match plugin.spec.failure_policy {
                    FailurePolicy::FailOpen => Ok(()),
                    _ => Err(Halt::Status {
                        code: 503,
                        details: "wasm_fail_stream",
                    }),
                };
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::warn!(plugin = %plugin.spec.name, "the plugin paused the stream and never continued it");
                return Err(Halt::Status {
                    code: 504,
                    details: "wasm_pause_timeout",
                });
            }
        }
    }

    fn vm_stream<R>(
        &self,
        index: usize,
        f: impl FnOnce(&mut wasmgate_runtime::StreamData) -> R,
    ) -> Option<R> {
        let stage = &self.stages[index];
        let context = stage.context?;
        let mut vm = stage.plugin.vm.borrow_mut();
        vm.stream_mut(context).map(f)
    }

    /// Request or response headers through the chain. Every plugin's stream gets the same map,
    /// as Envoy's filters share one: no copy in or out.
    pub async fn headers(
        &mut self,
        direction: Direction,
        headers: &SharedHeaders,
        end_of_stream: bool,
        through: Option<usize>,
    ) -> Flow<()> {
        for index in self.visits(direction, through) {
            let callback = |vm: &mut Vm, context| match direction {
                Direction::Request => vm.on_request_headers(context, end_of_stream),
                Direction::Response => vm.on_response_headers(context, end_of_stream),
            };
            self.map_callback(index, direction, headers, MapPart::Headers, callback)
                .await?;
        }
        Ok(())
    }

    /// Runs the headers or trailers callback of the plugin at `index` on the stream's shared
    /// `map` (put in the plugin's stream first), and waits while the plugin pauses. A FAIL_OPEN
    /// plugin that fails in it is skipped, and the map goes on as it was before: the one case
    /// that needs a copy. False when the plugin has no context (it failed earlier).
    async fn map_callback(
        &mut self,
        index: usize,
        direction: Direction,
        map: &SharedHeaders,
        part: MapPart,
        callback: impl FnOnce(&mut Vm, u32) -> Result<Action, VmError>,
    ) -> Flow<bool> {
        let stage = &self.stages[index];
        if stage.context.is_none() {
            return Ok(false);
        }
        let before =
            (stage.plugin.spec.failure_policy == FailurePolicy::FailOpen).then(|| map.snapshot());
        let installed = self.vm_stream(index, |stream| {
            let slot = part.slot(stream, direction);
            if !slot.as_ref().is_some_and(|shared| shared.same(map)) {
                *slot = Some(map.clone());
            }
        });
        if installed.is_none() {
            return Ok(false);
        }
        let waited = match self.call(index, direction, callback) {
            Ok(action) if !action.is_continue() => self.wait(index, direction).await,
            other => other.map(drop),
        };
        if let Some(before) = before
            && self.stages[index].context.is_none()
        {
            *map.lock() = before;
        }
        waited.map(|()| true)
    }

    /// A body chunk through the chain. Returns what passes every plugin now; paused plugins hold
    /// the rest.
    pub async fn data(
        &mut self,
        direction: Direction,
        chunk: Vec<u8>,
        end_of_stream: bool,
        through: Option<usize>,
    ) -> Flow<Vec<u8>> {
        let order = self.visits(direction, through);
        self.data_from(direction, order, chunk, end_of_stream).await
    }

    async fn data_from(
        &mut self,
        direction: Direction,
        order: impl Iterator<Item = usize>,
        mut chunk: Vec<u8>,
        eos: bool,
    ) -> Flow<Vec<u8>> {
        for index in order {
            if self.stages[index].context.is_none() {
                continue;
            }
            let held = self.stages[index].held.take();
            if chunk.is_empty() && !eos && held.is_none() {
                return Ok(chunk);
            }
            let buffering = held.is_some();
            // A chunk nobody held moves on as it is, without a copy.
            let body = match held {
                Some(mut held) => {
                    held.extend_from_slice(&chunk);
                    held
                }
                None => std::mem::take(&mut chunk),
            };
            // The limit bounds what plugins hold back; a body that streams through is not held.
            if buffering && body.len() > self.buffer_limit {
                return Err(Self::over_limit(direction));
            }
            let put = |s: &mut wasmgate_runtime::StreamData| match direction {
                Direction::Request => s.request_body = Some(body),
                Direction::Response => s.response_body = Some(body),
            };
            self.vm_stream(index, put);
            let action = self.call(index, direction, |vm, ctx| match direction {
                Direction::Request => vm.on_request_body(ctx, eos),
                Direction::Response => vm.on_response_body(ctx, eos),
            })?;
            if !action.is_continue() && eos {
                self.wait(index, direction).await?;
            }
            let taken = self
                .vm_stream(index, |s| match direction {
                    Direction::Request => s.request_body.take(),
                    Direction::Response => s.response_body.take(),
                })
                .flatten()
                .unwrap_or_default();
            if !action.is_continue() && !eos {
                if taken.len() > self.buffer_limit {
                    return Err(Self::over_limit(direction));
                }
                self.stages[index].held = Some(taken);
                return Ok(Vec::new());
            }
            chunk = taken;
        }
        Ok(chunk)
    }

    fn over_limit(direction: Direction) -> Halt {
        let code = if direction == Direction::Request {
            413
        } else {
            500
        };
        Halt::Status {
            code,
            details: "buffer_limit_exceeded",
        }
    }

    /// Trailers through the chain. Bodies held by plugins are released first, then the trailers;
    /// returns the body bytes released on the way.
    pub async fn trailers(
        &mut self,
        direction: Direction,
        trailers: &mut HeaderMap,
        through: Option<usize>,
    ) -> Flow<Vec<u8>> {
        let order = self.order(direction, through);
        let mut released = Vec::new();
        // Shared by the plugins as the headers are (see `headers`); the gateway gets a copy back.
        let shared = SharedHeaders::new(std::mem::take(trailers));
        for (position, &index) in order.iter().enumerate() {
            let callback = |vm: &mut Vm, context| match direction {
                Direction::Request => vm.on_request_trailers(context),
                Direction::Response => vm.on_response_trailers(context),
            };
            if !self
                .map_callback(index, direction, &shared, MapPart::Trailers, callback)
                .await?
            {
                continue;
            }
            // A body this plugin held goes on to the plugins after it, before the trailers.
            if let Some(held) = self.stages[index].held.take() {
                let rest = order[position + 1..].iter().copied();
                let passed = self.data_from(direction, rest, held, false).await?;
                released.extend(passed);
            }
        }
        *trailers = shared.snapshot();
        Ok(released)
    }

    /// Ends the stream in every plugin: `on_log`, `on_done`, `on_delete`.
    pub fn finish(&mut self) {
        for stage in &mut self.stages {
            if let Some(context) = stage.context.take() {
                let result = stage.plugin.vm.borrow_mut().finish_http_stream(context);
                if let Err(error) = result {
                    tracing::debug!(plugin = %stage.plugin.spec.name, "finishing a stream: {error}");
                }
                // What the plugin asked for too late to act on (a continue, a reply or a close
                // from `on_log`, say) goes with the stream.
                let mut effects = stage.plugin.effects.lock();
                effects.continued.retain(|(c, _)| *c != context);
                effects.closed.retain(|(c, _)| *c != context);
                effects.local_replies.remove(&context);
            }
        }
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        self.finish();
    }
}
