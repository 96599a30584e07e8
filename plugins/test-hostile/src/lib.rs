//! A plugin that misbehaves on purpose, for the host's isolation tests.
//!
//! Its configuration (JSON) names a misdeed and the callback it happens in (or is a list of
//! such objects, for several misdeeds in one plugin):
//!
//! ```json
//! {"action": "panic", "in": "on_request_headers", "only_if_header": "x-hostile"}
//! ```
//!
//! README.md in this crate lists the actions, the callbacks and the headers the plugin writes;
//! the host's tests rely on them, so treat that list as a contract.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use log::{error, info, warn};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_context_id| -> Box<dyn RootContext> {
        Box::new(HostileRoot::default())
    });
}}

/// Shared-data key (scoped by vm_id, so it outlives a VM that FAIL_RELOAD replaces) that arms
/// misdeeds in `on_vm_start` / `on_configure` when `only_if_header` is set.
const ARMED_KEY: &str = "hostile.armed";
/// The shared queue a hostile stream writes to, so that the root's `on_queue_ready` runs.
const QUEUE_NAME: &str = "hostile";

/// The raw host functions, called directly because the SDK wrappers panic on any status but OK:
/// the point is to see what the host answers at odd times, not to trap.
mod raw {
    #[link(wasm_import_module = "env")]
    unsafe extern "C" {
        pub fn proxy_done() -> u32;
        pub fn proxy_continue_stream(stream_type: u32) -> u32;
        pub fn proxy_close_stream(stream_type: u32) -> u32;
        #[allow(clippy::too_many_arguments)]
        pub fn proxy_send_local_response(
            status_code: u32,
            details: *const u8,
            details_size: usize,
            body: *const u8,
            body_size: usize,
            headers: *const u8,
            headers_size: usize,
            grpc_status: i32,
        ) -> u32;
    }

    /// Proxy-Wasm stream types.
    pub const HTTP_REQUEST: u32 = 0;
    pub const HTTP_RESPONSE: u32 = 1;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Misdeed {
    /// `panic!`: the SDK build aborts, which is a wasm `unreachable` trap.
    Panic,
    /// Spins forever; only the host's callback time limit ends it.
    Loop,
    /// Allocates 1 MiB chunks (written, so the pages are real) and keeps them until allocation
    /// fails, which aborts.
    MemoryBomb,
    /// Non-tail recursion without end: a stack overflow.
    Recurse,
    /// `lines` log lines of `line_bytes` bytes each, at info level.
    LogFlood,
    /// `proxy_done` although no `proxy_on_done` answered false.
    DoneEarly,
    /// `proxy_continue_stream` for the request and the response, whether paused or not.
    ContinueEarly,
    /// `proxy_continue_stream` for the request only.
    ContinueRequest,
    /// `proxy_continue_stream` for the response only.
    ContinueResponse,
    /// `proxy_close_stream` for the request and the response.
    CloseEarly,
    /// `proxy_send_local_response(418)`, whatever the callback.
    LocalReply,
}

// The variants are the callbacks' names as the configuration spells them, `on_` included.
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Callback {
    OnVmStart,
    OnConfigure,
    OnTick,
    OnQueueReady,
    /// The root's own `http_call`, dispatched from `on_tick`.
    OnRootHttpCallResponse,
    /// A stream's `http_call`, dispatched from `on_request_headers` with the request paused.
    OnHttpCallResponse,
    OnRequestHeaders,
    OnRequestBody,
    OnRequestTrailers,
    OnResponseHeaders,
    OnResponseBody,
    OnResponseTrailers,
    OnLog,
    OnDone,
}

impl Callback {
    fn name(self) -> &'static str {
        match self {
            Callback::OnVmStart => "on_vm_start",
            Callback::OnConfigure => "on_configure",
            Callback::OnTick => "on_tick",
            Callback::OnQueueReady => "on_queue_ready",
            Callback::OnRootHttpCallResponse => "on_root_http_call_response",
            Callback::OnHttpCallResponse => "on_http_call_response",
            Callback::OnRequestHeaders => "on_request_headers",
            Callback::OnRequestBody => "on_request_body",
            Callback::OnRequestTrailers => "on_request_trailers",
            Callback::OnResponseHeaders => "on_response_headers",
            Callback::OnResponseBody => "on_response_body",
            Callback::OnResponseTrailers => "on_response_trailers",
            Callback::OnLog => "on_log",
            Callback::OnDone => "on_done",
        }
    }

    /// Start-up callbacks run before any request exists, so `only_if_header` arms them through
    /// shared data instead of a per-VM flag.
    fn is_start(self) -> bool {
        matches!(self, Callback::OnVmStart | Callback::OnConfigure)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    action: Misdeed,
    #[serde(rename = "in")]
    at: Callback,
    /// Misbehave only for requests carrying this header (root callbacks: only after such a
    /// request armed them).
    #[serde(default)]
    only_if_header: Option<String>,
    /// The cluster `http_call`s go to.
    #[serde(default = "default_cluster")]
    cluster: String,
    #[serde(default = "default_tick_ms")]
    tick_ms: u64,
    #[serde(default = "default_lines")]
    lines: usize,
    #[serde(default = "default_line_bytes")]
    line_bytes: usize,
}

fn default_cluster() -> String {
    "upstream".to_owned()
}
fn default_tick_ms() -> u64 {
    50
}
fn default_lines() -> usize {
    1000
}
fn default_line_bytes() -> usize {
    100
}

/// The configuration: one misdeed, or a list of them (each with its own callback and header).
#[derive(Deserialize)]
#[serde(untagged)]
enum Specs {
    One(Spec),
    Many(Vec<Spec>),
}

fn parse_specs(raw: &[u8]) -> Option<Rc<[Spec]>> {
    match serde_json::from_slice(raw) {
        Ok(Specs::One(spec)) => Some(Rc::from(vec![spec])),
        Ok(Specs::Many(specs)) => Some(Rc::from(specs)),
        Err(err) => {
            error!("invalid hostile configuration: {err}");
            None
        }
    }
}

impl Spec {
    /// Does the misdeed happen in `at` now? `gate` says whether this request (or the request that
    /// armed a root callback) asked for it.
    fn fires(&self, at: Callback, gate: bool) -> bool {
        self.at == at && (self.only_if_header.is_none() || gate)
    }
}

/// Does the misdeed; returns what the host answered to the raw calls (for `x-hostile-statuses`),
/// if the misdeed returns at all.
fn misbehave(spec: &Spec, at: Callback) -> Vec<String> {
    let at = at.name();
    warn!("hostile: {:?} in {at}", spec.action);
    match spec.action {
        Misdeed::Panic => panic!("hostile: panic in {at}"),
        Misdeed::Loop => endless_loop(),
        Misdeed::MemoryBomb => memory_bomb(),
        Misdeed::Recurse => {
            let depth = descend(0);
            // Unreachable in practice: the stack runs out first.
            vec![format!("recursed {depth}")]
        }
        Misdeed::LogFlood => {
            let padding = "x".repeat(spec.line_bytes);
            for line in 0..spec.lines {
                info!("hostile flood {at} {line} {padding}");
            }
            vec![format!("{at}:flooded={}", spec.lines)]
        }
        Misdeed::DoneEarly => {
            // SAFETY: a host call without arguments.
            let status = unsafe { raw::proxy_done() };
            vec![format!("{at}:done={status}")]
        }
        Misdeed::ContinueEarly => {
            // SAFETY: host calls with plain integer arguments.
            let (request, response) = unsafe {
                (
                    raw::proxy_continue_stream(raw::HTTP_REQUEST),
                    raw::proxy_continue_stream(raw::HTTP_RESPONSE),
                )
            };
            vec![format!(
                "{at}:continue_request={request},continue_response={response}"
            )]
        }
        Misdeed::ContinueRequest => {
            // SAFETY: a host call with a plain integer argument.
            let status = unsafe { raw::proxy_continue_stream(raw::HTTP_REQUEST) };
            vec![format!("{at}:continue_request={status}")]
        }
        Misdeed::ContinueResponse => {
            // SAFETY: a host call with a plain integer argument.
            let status = unsafe { raw::proxy_continue_stream(raw::HTTP_RESPONSE) };
            vec![format!("{at}:continue_response={status}")]
        }
        Misdeed::CloseEarly => {
            // SAFETY: host calls with plain integer arguments.
            let (request, response) = unsafe {
                (
                    raw::proxy_close_stream(raw::HTTP_REQUEST),
                    raw::proxy_close_stream(raw::HTTP_RESPONSE),
                )
            };
            vec![format!(
                "{at}:close_request={request},close_response={response}"
            )]
        }
        Misdeed::LocalReply => {
            let body = format!("hostile reply from {at}");
            let headers = serialize_pairs(&[("x-hostile-reply", at)]);
            let details = b"hostile";
            // SAFETY: every pointer/length pair describes a live buffer for the whole call.
            let status = unsafe {
                raw::proxy_send_local_response(
                    418,
                    details.as_ptr(),
                    details.len(),
                    body.as_ptr(),
                    body.len(),
                    headers.as_ptr(),
                    headers.len(),
                    -1,
                )
            };
            vec![format!("{at}:local_reply={status}")]
        }
    }
}

fn endless_loop() -> ! {
    let mut spins: u64 = 0;
    loop {
        // black_box: the optimiser may not drop a loop whose state it cannot see.
        spins = std::hint::black_box(spins.wrapping_add(1));
    }
}

fn memory_bomb() -> ! {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        // Non-zero bytes, so every page is really written rather than left to the zero page.
        hoard.push(vec![0xA5; 1 << 20]);
        std::hint::black_box(&hoard);
    }
}

/// Recursion the optimiser can neither prove finite nor turn into a loop: the depth goes through
/// black_box, and so does each call's result before the addition after it.
#[inline(never)]
fn descend(depth: u64) -> u64 {
    if std::hint::black_box(depth) == u64::MAX {
        return 0;
    }
    let below = std::hint::black_box(descend(depth + 1));
    below.wrapping_add(depth)
}

/// The Proxy-Wasm header-pairs encoding: count, then each key and value size, then each key and
/// value NUL-terminated.
fn serialize_pairs(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (key, value) in pairs {
        out.extend_from_slice(&(key.len() as u32).to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    }
    for (key, value) in pairs {
        out.extend_from_slice(key.as_bytes());
        out.push(0);
        out.extend_from_slice(value.as_bytes());
        out.push(0);
    }
    out
}

#[derive(Default)]
struct HostileRoot {
    specs: Option<Rc<[Spec]>>,
    /// Set by a stream that carried an `only_if_header`; the root callbacks (tick, queue,
    /// http_call) misbehave once per arming. Per VM, so a VM built by FAIL_RELOAD starts unarmed.
    armed: Rc<Cell<bool>>,
    queue: Option<u32>,
}

impl HostileRoot {
    fn specs(&self) -> Rc<[Spec]> {
        self.specs.clone().unwrap_or_else(|| Rc::from(Vec::new()))
    }

    /// Start-up misdeeds with `only_if_header` wait for the process-wide arming in shared data.
    fn start_gate(&self) -> bool {
        self.get_shared_data(ARMED_KEY).0.is_some()
    }

    /// Root misdeeds run at most once per arming; without `only_if_header` every time.
    fn root_fires(&self, spec: &Spec, at: Callback) -> bool {
        spec.at == at && (spec.only_if_header.is_none() || self.armed.replace(false))
    }
}

impl Context for HostileRoot {
    fn on_http_call_response(
        &mut self,
        _token: u32,
        _headers: usize,
        _body: usize,
        _trailers: usize,
    ) {
        // The root only dispatches calls for an on_root_http_call_response misdeed.
        for spec in self.specs().iter() {
            if spec.at == Callback::OnRootHttpCallResponse {
                misbehave(spec, Callback::OnRootHttpCallResponse);
            }
        }
    }
}

impl RootContext for HostileRoot {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        // on_vm_start runs before the plugin configuration is delivered, so a misdeed here is
        // configured through the VM configuration.
        let raw = self.get_vm_configuration().unwrap_or_default();
        if raw.is_empty() {
            return true;
        }
        let Some(specs) = parse_specs(&raw) else {
            return false;
        };
        let gate = self.start_gate();
        for spec in specs.iter() {
            if spec.fires(Callback::OnVmStart, gate) {
                misbehave(spec, Callback::OnVmStart);
            }
        }
        self.specs = Some(specs);
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        if !raw.is_empty() {
            let Some(specs) = parse_specs(&raw) else {
                return false;
            };
            self.specs = Some(specs);
        }
        let gate = self.start_gate();
        for spec in self.specs().iter() {
            if spec.fires(Callback::OnConfigure, gate) {
                misbehave(spec, Callback::OnConfigure);
            }
            match spec.at {
                Callback::OnTick | Callback::OnRootHttpCallResponse => {
                    self.set_tick_period(Duration::from_millis(spec.tick_ms));
                }
                Callback::OnQueueReady => {
                    self.queue = Some(self.register_shared_queue(QUEUE_NAME));
                }
                _ => {}
            }
        }
        true
    }

    fn on_tick(&mut self) {
        for spec in self.specs().iter() {
            if self.root_fires(spec, Callback::OnRootHttpCallResponse) {
                let dispatched = self.dispatch_http_call(
                    &spec.cluster,
                    vec![
                        (":method", "GET"),
                        (":path", "/hostile-root-callout"),
                        (":authority", "hostile"),
                    ],
                    None,
                    vec![],
                    Duration::from_secs(5),
                );
                if let Err(status) = dispatched {
                    error!("hostile: root dispatch_http_call failed: {status:?}");
                }
            } else if self.root_fires(spec, Callback::OnTick) {
                misbehave(spec, Callback::OnTick);
            }
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        // Drain first: the message only exists to get this callback called.
        while let Ok(Some(_)) = self.dequeue_shared_queue(queue_id) {}
        for spec in self.specs().iter() {
            if spec.at == Callback::OnQueueReady {
                misbehave(spec, Callback::OnQueueReady);
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let specs = self.specs();
        Some(Box::new(HostileStream {
            active: vec![false; specs.len()],
            acted: vec![false; specs.len()],
            specs,
            armed: self.armed.clone(),
            queue: self.queue,
            statuses: Vec::new(),
            id_seen: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct HostileStream {
    specs: Rc<[Spec]>,
    /// Per misdeed: this request asked for it (or it has no `only_if_header`).
    active: Vec<bool>,
    /// Per misdeed: done already. Body callbacks run once per chunk; a misdeed happens once per
    /// stream.
    acted: Vec<bool>,
    armed: Rc<Cell<bool>>,
    queue: Option<u32>,
    /// What the host answered to raw calls, for `x-hostile-statuses`.
    statuses: Vec<String>,
    /// The request's `x-hostile-id`, echoed as `x-hostile-id-seen`: a stream whose response
    /// callbacks ran in another request's context would show the other request's id.
    id_seen: Option<String>,
}

impl HostileStream {
    /// Does the misdeeds configured for `at` that this request asked for; returns the action of
    /// the last one done, if any.
    fn act(&mut self, at: Callback) -> Option<Misdeed> {
        let mut done = None;
        for (index, spec) in self.specs.clone().iter().enumerate() {
            if spec.at != at || !self.active[index] || self.acted[index] {
                continue;
            }
            self.acted[index] = true;
            let statuses = misbehave(spec, at);
            self.statuses.extend(statuses);
            done = Some(spec.action);
        }
        done
    }

    /// What a callback returns after its misdeed: after a local reply the callback pauses, as an
    /// SDK user writes it.
    fn after(done: Option<Misdeed>) -> Action {
        match done {
            Some(Misdeed::LocalReply) => Action::Pause,
            _ => Action::Continue,
        }
    }
}

impl Context for HostileStream {
    fn on_http_call_response(
        &mut self,
        _token: u32,
        _headers: usize,
        _body: usize,
        _trailers: usize,
    ) {
        // A local reply or a continue of the request already decided how the stream goes on.
        let done = self.act(Callback::OnHttpCallResponse);
        if !matches!(
            done,
            Some(Misdeed::LocalReply | Misdeed::ContinueEarly | Misdeed::ContinueRequest)
        ) {
            self.resume_http_request();
        }
    }

    fn on_done(&mut self) -> bool {
        self.act(Callback::OnDone);
        true
    }
}

impl HttpContext for HostileStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.id_seen = self.get_http_request_header("x-hostile-id");
        let mut pause = false;
        for (index, spec) in self.specs.clone().iter().enumerate() {
            let active = match &spec.only_if_header {
                Some(name) => self.get_http_request_header(name).is_some(),
                None => true,
            };
            self.active[index] = active;
            if !active {
                continue;
            }
            match spec.at {
                // The root callbacks misbehave after this request armed them.
                Callback::OnTick | Callback::OnRootHttpCallResponse => self.armed.set(true),
                Callback::OnQueueReady => match self.queue {
                    Some(queue) => {
                        if let Err(status) = self.enqueue_shared_queue(queue, Some(b"hostile")) {
                            error!("hostile: enqueue failed: {status:?}");
                        }
                    }
                    None => error!("hostile: no queue registered"),
                },
                // Arms the next start-up of this vm_id, then fails this VM so that FAIL_RELOAD
                // builds one.
                at if at.is_start() && spec.only_if_header.is_some() => {
                    if let Err(status) = self.set_shared_data(ARMED_KEY, Some(b"1"), None) {
                        error!("hostile: arming failed: {status:?}");
                    }
                    panic!("hostile: armed {}, failing this VM", at.name());
                }
                Callback::OnHttpCallResponse => {
                    let dispatched = self.dispatch_http_call(
                        &spec.cluster,
                        vec![
                            (":method", "GET"),
                            (":path", "/hostile-callout"),
                            (":authority", "hostile"),
                        ],
                        None,
                        vec![],
                        Duration::from_secs(5),
                    );
                    match dispatched {
                        // Resumed from on_http_call_response.
                        Ok(_) => pause = true,
                        Err(status) => error!("hostile: dispatch_http_call failed: {status:?}"),
                    }
                }
                _ => {}
            }
        }
        let done = self.act(Callback::OnRequestHeaders);
        if pause && done.is_none() {
            return Action::Pause;
        }
        Self::after(done)
    }

    fn on_http_request_body(&mut self, _body_size: usize, _end_of_stream: bool) -> Action {
        Self::after(self.act(Callback::OnRequestBody))
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        Self::after(self.act(Callback::OnRequestTrailers))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // What earlier callbacks learnt goes out now, the last chance to add response headers.
        if let Some(id) = self.id_seen.clone() {
            self.add_http_response_header("x-hostile-id-seen", &id);
        }
        let done = self.act(Callback::OnResponseHeaders);
        if !self.statuses.is_empty() {
            let statuses = self.statuses.join(";");
            self.add_http_response_header("x-hostile-statuses", &statuses);
        }
        Self::after(done)
    }

    fn on_http_response_body(&mut self, _body_size: usize, _end_of_stream: bool) -> Action {
        Self::after(self.act(Callback::OnResponseBody))
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        Self::after(self.act(Callback::OnResponseTrailers))
    }

    fn on_log(&mut self) {
        self.act(Callback::OnLog);
    }
}
