//! Drive a plugin through a request and a response without a proxy, and see what it did.
//!
//! The harness plays Envoy's part for one plugin: it delivers headers, body chunks and trailers in
//! order, buffers bodies while the plugin pauses from a body callback, answers `proxy_http_call`
//! from a fixture, sends local replies through the plugin's response callbacks, and ends the
//! stream with `on_log`, `on_done`, `on_delete`.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use thiserror::Error;
use wasmgate_abi::{
    Action, GrpcCallRequest, GrpcStreamRequest, HeaderMap, Host, HttpCallRequest, LocalResponse,
    LogRecord, Status, StreamInfo, StreamType,
};
use wasmgate_runtime::{
    CallOutcome, CompiledModule, LoadError, PluginConfig, Runtime, SharedHeaders, Vm, VmConfig,
    VmError,
};

/// Everything the plugin asked of the proxy, in the order it asked.
#[derive(Debug, Default)]
pub struct Recorded {
    pub logs: Vec<LogRecord>,
    pub local_responses: Vec<(u32, LocalResponse)>,
    pub http_calls: Vec<(u32, u32, HttpCallRequest)>,
    pub grpc_calls: Vec<(u32, u32, GrpcCallRequest)>,
    pub grpc_streams: Vec<(u32, u32, GrpcStreamRequest)>,
    pub grpc_sent: Vec<(u32, Vec<u8>, bool)>,
    pub grpc_cancelled: Vec<u32>,
    pub grpc_closed: Vec<u32>,
    pub continued: Vec<(u32, StreamType)>,
    pub closed: Vec<(u32, StreamType)>,
    pub route_cache_cleared: Vec<u32>,
    pub foreign_calls: Vec<(String, Vec<u8>)>,
}

/// A foreign function the harness host offers (`proxy_call_foreign_function`).
pub type ForeignFunction = Arc<dyn Fn(&[u8]) -> Result<Vec<u8>, Status> + Send + Sync>;

/// A [`Host`] that records every request and answers as a well-behaved proxy would: calls to
/// known clusters succeed (BAD_ARGUMENT for others, as Envoy), gRPC to unknown upstreams is a
/// PARSE_FAILURE, and stream control is accepted.
#[derive(Clone, Default)]
pub struct RecordingHost {
    pub recorded: Arc<Mutex<Recorded>>,
    clusters: Arc<Vec<String>>,
    foreign: Arc<HashMap<String, ForeignFunction>>,
}

impl RecordingHost {
    pub fn new(clusters: Vec<String>) -> Self {
        Self {
            clusters: Arc::new(clusters),
            ..Default::default()
        }
    }

    pub fn with_foreign_function(mut self, name: &str, function: ForeignFunction) -> Self {
        let mut map = (*self.foreign).clone();
        map.insert(name.to_owned(), function);
        self.foreign = Arc::new(map);
        self
    }

    fn knows(&self, cluster: &[u8]) -> bool {
        self.clusters.iter().any(|c| c.as_bytes() == cluster)
    }
}

impl Host for RecordingHost {
    fn log(&mut self, record: &LogRecord) {
        self.recorded.lock().logs.push(record.clone());
    }

    fn http_call(
        &mut self,
        context_id: u32,
        token: u32,
        call: HttpCallRequest,
    ) -> Result<(), Status> {
        if !self.knows(call.upstream.as_bytes()) {
            return Err(Status::BadArgument);
        }
        self.recorded
            .lock()
            .http_calls
            .push((context_id, token, call));
        Ok(())
    }

    fn grpc_call(
        &mut self,
        context_id: u32,
        token: u32,
        call: GrpcCallRequest,
    ) -> Result<(), Status> {
        if !self.knows(&call.upstream) {
            return Err(Status::ParseFailure);
        }
        self.recorded
            .lock()
            .grpc_calls
            .push((context_id, token, call));
        Ok(())
    }

    fn grpc_stream(
        &mut self,
        context_id: u32,
        token: u32,
        call: GrpcStreamRequest,
    ) -> Result<(), Status> {
        if !self.knows(&call.upstream) {
            return Err(Status::ParseFailure);
        }
        self.recorded
            .lock()
            .grpc_streams
            .push((context_id, token, call));
        Ok(())
    }

    fn grpc_send(&mut self, token: u32, message: Vec<u8>, end_of_stream: bool) -> Status {
        self.recorded
            .lock()
            .grpc_sent
            .push((token, message, end_of_stream));
        Status::Ok
    }

    fn grpc_cancel(&mut self, token: u32) -> Status {
        self.recorded.lock().grpc_cancelled.push(token);
        Status::Ok
    }

    fn grpc_close(&mut self, token: u32) -> Status {
        self.recorded.lock().grpc_closed.push(token);
        Status::Ok
    }

    fn continue_stream(&mut self, context_id: u32, stream: StreamType) -> Status {
        self.recorded.lock().continued.push((context_id, stream));
        Status::Ok
    }

    fn close_stream(&mut self, context_id: u32, stream: StreamType) -> Status {
        self.recorded.lock().closed.push((context_id, stream));
        Status::Ok
    }

    fn send_local_response(&mut self, context_id: u32, response: LocalResponse) -> Status {
        self.recorded
            .lock()
            .local_responses
            .push((context_id, response));
        Status::Ok
    }

    fn clear_route_cache(&mut self, context_id: u32) -> Status {
        self.recorded.lock().route_cache_cleared.push(context_id);
        Status::Ok
    }

    fn call_foreign_function(&mut self, name: &str, arguments: &[u8]) -> Result<Vec<u8>, Status> {
        self.recorded
            .lock()
            .foreign_calls
            .push((name.to_owned(), arguments.to_vec()));
        match self.foreign.get(name) {
            Some(function) => function(arguments),
            None => Err(Status::NotFound),
        }
    }
}

/// One side of an HTTP exchange: headers (pseudo-headers included), body chunks, trailers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    pub headers: HeaderMap,
    /// Delivered to the plugin chunk by chunk, as a proxy would.
    pub body: Vec<Vec<u8>>,
    pub trailers: Option<HeaderMap>,
}

impl Message {
    pub fn request(method: &str, path: &str) -> Self {
        let headers = HeaderMap::from_pairs([
            (":method", method),
            (":path", path),
            (":authority", "example.com"),
            (":scheme", "http"),
        ]);
        Self {
            headers,
            ..Default::default()
        }
    }

    pub fn response(status: u16) -> Self {
        Self {
            headers: HeaderMap::from_pairs([(":status", status.to_string())]),
            ..Default::default()
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.add(name, value);
        self
    }

    pub fn body_chunk(mut self, chunk: impl Into<Vec<u8>>) -> Self {
        self.body.push(chunk.into());
        self
    }

    pub fn trailer(mut self, name: &str, value: &str) -> Self {
        self.trailers
            .get_or_insert_with(HeaderMap::new)
            .add(name, value);
        self
    }

    /// The body as one byte string.
    pub fn body_bytes(&self) -> Vec<u8> {
        self.body.concat()
    }

    fn has_body(&self) -> bool {
        self.body.iter().any(|chunk| !chunk.is_empty())
    }
}

/// What happened to one exchange.
#[derive(Debug, Clone, Default)]
pub struct Exchange {
    /// What reached the upstream; `None` when the plugin answered locally or held the request.
    pub upstream_request: Option<Message>,
    /// What the client received; `None` when the stream stalled (paused and never resumed).
    pub response: Option<Message>,
    /// The local reply the plugin sent, if any.
    pub local_response: Option<LocalResponse>,
    /// `(callback, action)` for every stream callback, in order.
    pub actions: Vec<(&'static str, Action)>,
    /// The callback the stream stalled in, if it did.
    pub stalled_in: Option<&'static str>,
}

#[derive(Debug, Error)]
pub enum HarnessError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// Answers a plugin's `proxy_http_call`.
pub type CallFixture = Box<dyn FnMut(&HttpCallRequest) -> CallOutcome>;
/// Plays the upstream: receives what the plugin let through, returns the response.
pub type Upstream<'a> = &'a mut dyn FnMut(&Message) -> Message;

/// One plugin in one VM, with a recording host.
pub struct Harness {
    pub vm: Vm,
    pub root: u32,
    pub host: RecordingHost,
    pub runtime: Arc<Runtime>,
    call_fixture: Option<CallFixture>,
    answered: Vec<u32>,
    /// Facts the embedder would know (addresses, protocol), given to every stream.
    pub stream_info: StreamInfo,
}

impl Harness {
    pub fn new(
        runtime: Arc<Runtime>,
        module: &Arc<CompiledModule>,
        vm_config: VmConfig,
        plugin: PluginConfig,
        host: RecordingHost,
    ) -> Result<Self, HarnessError> {
        let mut vm = Vm::new(&runtime, module, vm_config, Box::new(host.clone()))?;
        let root = vm.start_plugin(plugin)?;
        Ok(Self {
            vm,
            root,
            host,
            runtime,
            call_fixture: None,
            answered: Vec::new(),
            stream_info: StreamInfo::default(),
        })
    }

    /// Loads `wasm` into `runtime` and starts it with `plugin`.
    pub fn load(
        runtime: Arc<Runtime>,
        wasm: &[u8],
        vm_config: VmConfig,
        plugin: PluginConfig,
        host: RecordingHost,
    ) -> Result<Self, HarnessError> {
        let module = runtime.load(wasm)?;
        Self::new(runtime, &module, vm_config, plugin, host)
    }

    pub fn answer_calls_with(&mut self, fixture: CallFixture) {
        self.call_fixture = Some(fixture);
    }

    pub fn logs(&self) -> Vec<LogRecord> {
        self.host.recorded.lock().logs.clone()
    }

    /// Log messages containing `needle`.
    pub fn logs_containing(&self, needle: &str) -> Vec<String> {
        self.logs()
            .into_iter()
            .map(|r| r.message)
            .filter(|m| m.contains(needle))
            .collect()
    }

    /// Fires the plugin's timer once (`proxy_on_tick` on the root context), then answers the
    /// `http_call`s it dispatched from the fixture, as a proxy's event loop would.
    pub fn tick(&mut self) -> Result<(), HarnessError> {
        let marks = self.marks();
        self.vm.on_tick(self.root)?;
        while let Some((token, call)) = self.next_pending_call(marks) {
            let outcome = self.answer(&call);
            self.vm.on_http_call_response(token, outcome)?;
        }
        Ok(())
    }

    fn answer(&mut self, call: &HttpCallRequest) -> CallOutcome {
        match self.call_fixture.as_mut() {
            Some(fixture) => fixture(call),
            None => CallOutcome::Failure {
                message: "no fixture answers calls".into(),
            },
        }
    }

    /// Runs `request` through the plugin, then `upstream`'s response back through it.
    pub fn exchange(
        &mut self,
        request: Message,
        upstream: Upstream<'_>,
    ) -> Result<Exchange, HarnessError> {
        let context = self.vm.create_stream(self.root)?;
        if let Some(stream) = self.vm.stream_mut(context) {
            stream.info = self.stream_info.clone();
        }
        let result = self.drive(context, request, upstream);
        let finished = self.vm.finish_http_stream(context);
        let exchange = result?;
        finished?;
        Ok(exchange)
    }

    fn drive(
        &mut self,
        ctx: u32,
        request: Message,
        upstream: Upstream<'_>,
    ) -> Result<Exchange, HarnessError> {
        let mut exchange = Exchange::default();
        let marks = self.marks();

        // Request path.
        let end_after_headers = !request.has_body() && request.trailers.is_none();
        self.stream(ctx).request_headers = Some(request.headers.clone().into());
        let action = self.vm.on_request_headers(ctx, end_after_headers)?;
        exchange.actions.push(("on_request_headers", action));
        if let Some(done) = self.settle(
            ctx,
            action,
            StreamType::HttpRequest,
            "on_request_headers",
            &mut exchange,
            marks,
        )? {
            return Ok(done);
        }
        let forwarded_body = self.run_body(ctx, &request, true, &mut exchange, marks)?;
        if let Some(done) = forwarded_body.1 {
            return Ok(done);
        }
        let mut forwarded_trailers = None;
        if let Some(trailers) = &request.trailers {
            self.stream(ctx).request_trailers = Some(trailers.clone().into());
            let action = self.vm.on_request_trailers(ctx)?;
            exchange.actions.push(("on_request_trailers", action));
            if let Some(done) = self.settle(
                ctx,
                action,
                StreamType::HttpRequest,
                "on_request_trailers",
                &mut exchange,
                marks,
            )? {
                return Ok(done);
            }
            forwarded_trailers = self
                .stream(ctx)
                .request_trailers
                .as_ref()
                .map(SharedHeaders::snapshot);
        }
        let sent = Message {
            headers: self
                .stream(ctx)
                .request_headers
                .as_ref()
                .map(SharedHeaders::snapshot)
                .unwrap_or_default(),
            body: if forwarded_body.0.is_empty() {
                vec![]
            } else {
                vec![forwarded_body.0]
            },
            trailers: forwarded_trailers,
        };
        let response = upstream(&sent);
        exchange.upstream_request = Some(sent);
        self.respond(ctx, response, exchange, marks)
    }

    /// Runs the response path for `response` (the upstream's, or a local reply).
    fn respond(
        &mut self,
        ctx: u32,
        response: Message,
        mut exchange: Exchange,
        marks: Marks,
    ) -> Result<Exchange, HarnessError> {
        let end_after_headers = !response.has_body() && response.trailers.is_none();
        self.stream(ctx).response_headers = Some(response.headers.clone().into());
        let action = self.vm.on_response_headers(ctx, end_after_headers)?;
        exchange.actions.push(("on_response_headers", action));
        if let Some(done) = self.settle(
            ctx,
            action,
            StreamType::HttpResponse,
            "on_response_headers",
            &mut exchange,
            marks,
        )? {
            return Ok(done);
        }
        let (body, done) = self.run_body(ctx, &response, false, &mut exchange, marks)?;
        if let Some(done) = done {
            return Ok(done);
        }
        let mut trailers = None;
        if let Some(original) = &response.trailers {
            self.stream(ctx).response_trailers = Some(original.clone().into());
            let action = self.vm.on_response_trailers(ctx)?;
            exchange.actions.push(("on_response_trailers", action));
            if let Some(done) = self.settle(
                ctx,
                action,
                StreamType::HttpResponse,
                "on_response_trailers",
                &mut exchange,
                marks,
            )? {
                return Ok(done);
            }
            trailers = self
                .stream(ctx)
                .response_trailers
                .as_ref()
                .map(SharedHeaders::snapshot);
        }
        exchange.response = Some(Message {
            headers: self
                .stream(ctx)
                .response_headers
                .as_ref()
                .map(SharedHeaders::snapshot)
                .unwrap_or_default(),
            body: if body.is_empty() { vec![] } else { vec![body] },
            trailers,
        });
        Ok(exchange)
    }

    /// Delivers body chunks; a Pause buffers until a later Continue (Envoy's StopIterationAndBuffer).
    fn run_body(
        &mut self,
        ctx: u32,
        message: &Message,
        request: bool,
        exchange: &mut Exchange,
        marks: Marks,
    ) -> Result<(Vec<u8>, Option<Exchange>), HarnessError> {
        let chunks: Vec<&Vec<u8>> = message.body.iter().filter(|c| !c.is_empty()).collect();
        let mut forwarded = Vec::new();
        let mut buffered = Vec::new();
        for (index, chunk) in chunks.iter().enumerate() {
            let eos = index + 1 == chunks.len() && message.trailers.is_none();
            buffered.extend_from_slice(chunk);
            let name = if request {
                "on_request_body"
            } else {
                "on_response_body"
            };
            let stream = self.stream(ctx);
            if request {
                stream.request_body = Some(std::mem::take(&mut buffered));
            } else {
                stream.response_body = Some(std::mem::take(&mut buffered));
            }
            let action = if request {
                self.vm.on_request_body(ctx, eos)?
            } else {
                self.vm.on_response_body(ctx, eos)?
            };
            exchange.actions.push((name, action));
            let stream = self.stream(ctx);
            let body = if request {
                stream.request_body.take()
            } else {
                stream.response_body.take()
            };
            let kind = if request {
                StreamType::HttpRequest
            } else {
                StreamType::HttpResponse
            };
            if let Some(local) = self.local_reply_since(marks) {
                return Ok((
                    forwarded,
                    Some(self.local_reply(ctx, local, request, std::mem::take(exchange), marks)?),
                ));
            }
            match action {
                Action::Continue => forwarded.extend(body.unwrap_or_default()),
                _ if eos => {
                    // Paused at the end of the body: only a continue from a callout can release it.
                    if let Some(done) = self.settle(ctx, action, kind, name, exchange, marks)? {
                        return Ok((forwarded, Some(done)));
                    }
                    forwarded.extend(body.unwrap_or_default());
                }
                _ => buffered = body.unwrap_or_default(),
            }
        }
        Ok((forwarded, None))
    }

    /// After a callback: follow a local reply, answer callouts while paused, and decide whether the
    /// stream goes on (`None`) or is finished (`Some`).
    fn settle(
        &mut self,
        ctx: u32,
        action: Action,
        stream: StreamType,
        callback: &'static str,
        exchange: &mut Exchange,
        marks: Marks,
    ) -> Result<Option<Exchange>, HarnessError> {
        let request = stream == StreamType::HttpRequest;
        if let Some(local) = self.local_reply_since(marks) {
            return Ok(Some(self.local_reply(
                ctx,
                local,
                request,
                std::mem::take(exchange),
                marks,
            )?));
        }
        if action.is_continue() {
            return Ok(None);
        }
        // Paused: answer outstanding calls until the plugin continues, replies, or has nothing left.
        loop {
            let pending = self.next_pending_call(marks);
            let Some((token, call)) = pending else { break };
            let outcome = self.answer(&call);
            self.vm.on_http_call_response(token, outcome)?;
            if let Some(local) = self.local_reply_since(marks) {
                return Ok(Some(self.local_reply(
                    ctx,
                    local,
                    request,
                    std::mem::take(exchange),
                    marks,
                )?));
            }
            if self.continued_since(marks, ctx, stream) {
                return Ok(None);
            }
        }
        if self.continued_since(marks, ctx, stream) {
            return Ok(None);
        }
        exchange.stalled_in = Some(callback);
        Ok(Some(std::mem::take(exchange)))
    }

    /// A local reply from the request path runs through the plugin's response callbacks, as in
    /// Envoy; one from the response path replaces the response as it is.
    fn local_reply(
        &mut self,
        ctx: u32,
        local: LocalResponse,
        from_request_path: bool,
        mut exchange: Exchange,
        marks: Marks,
    ) -> Result<Exchange, HarnessError> {
        let mut reply = Message::response(local.status_code as u16);
        for (k, v) in local.headers.iter() {
            reply.headers.add(k, v);
        }
        if !local.body.is_empty() {
            if reply.headers.get("content-type").is_none() {
                reply.headers.add("content-type", "text/plain");
            }
            reply.body.push(local.body.clone());
        }
        reply
            .headers
            .replace("content-length", local.body.len().to_string());
        exchange.local_response = Some(local);
        if from_request_path {
            // Later local replies (from the response callbacks) would replace this one.
            let marks = Marks {
                local_responses: self.host.recorded.lock().local_responses.len(),
                ..marks
            };
            return self.respond(ctx, reply, exchange, marks);
        }
        exchange.response = Some(reply);
        Ok(exchange)
    }

    fn stream(&mut self, ctx: u32) -> &mut wasmgate_runtime::StreamData {
        self.vm
            .stream_mut(ctx)
            .expect("the harness's stream context exists")
    }

    fn marks(&self) -> Marks {
        let recorded = self.host.recorded.lock();
        Marks {
            local_responses: recorded.local_responses.len(),
            http_calls: recorded.http_calls.len(),
            continued: recorded.continued.len(),
        }
    }

    fn local_reply_since(&self, marks: Marks) -> Option<LocalResponse> {
        let recorded = self.host.recorded.lock();
        recorded
            .local_responses
            .get(marks.local_responses..)?
            .last()
            .map(|(_, r)| r.clone())
    }

    fn next_pending_call(&mut self, marks: Marks) -> Option<(u32, HttpCallRequest)> {
        let found = {
            let recorded = self.host.recorded.lock();
            recorded.http_calls[marks.http_calls..]
                .iter()
                .find(|(_, token, _)| !self.answered.contains(token))
                .map(|(_, token, call)| (*token, call.clone()))
        };
        if let Some((token, _)) = &found {
            self.answered.push(*token);
        }
        found
    }

    fn continued_since(&self, marks: Marks, ctx: u32, stream: StreamType) -> bool {
        let recorded = self.host.recorded.lock();
        recorded.continued[marks.continued..]
            .iter()
            .any(|(c, s)| *c == ctx && *s == stream)
    }
}

#[derive(Debug, Clone, Copy)]
struct Marks {
    local_responses: usize,
    http_calls: usize,
    continued: usize,
}
