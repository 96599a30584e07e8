//! A test plugin that exercises as much of the host as one module can.
//!
//! Host tests are written against the exact behaviour below, so treat it as a contract:
//! header names, log lines and return values must not change without updating those
//! tests. README.md in this crate lists the same behaviour from a test writer's side.
//!
//! Every header this plugin writes is named `{P}-<suffix>`, where `P` is the
//! `header_prefix` from the plugin configuration (default `x-kitchen`). What a request
//! does beyond the common edits is chosen by its `x-mode` request header.

use std::fmt::Write as _;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, error, info, trace, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType, Status};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_context_id| -> Box<dyn RootContext> {
        Box::new(KitchenRoot::default())
    });
}}

/// Shared-data key holding the request counter (decimal text), bumped with CAS.
const COUNTER_KEY: &str = "kitchen_counter";
/// Shared-data key that `on_queue_ready` writes each dequeued message to.
const LAST_QUEUE_MESSAGE_KEY: &str = "kitchen_last_queue_message";
/// 2020-09-13 in Unix seconds: any working wall clock is past it, a zeroed one is not.
const SANE_EPOCH_SECS: u64 = 1_600_000_000;

#[derive(Debug, Deserialize)]
#[serde(default)]
struct Config {
    tick_ms: Option<u64>,
    queue: Option<String>,
    header_prefix: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            tick_ms: None,
            queue: None,
            header_prefix: "x-kitchen".to_owned(),
        }
    }
}

impl Config {
    /// Parses the configuration, which must be a JSON object (not an array, even though
    /// serde would happily map one onto a struct).
    fn parse(raw: &[u8]) -> Result<Self, serde_json::Error> {
        let object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(raw)?;
        Config::deserialize(serde_json::Value::Object(object))
    }
}

/// Metric ids, defined by the root context in `on_configure`.
#[derive(Debug, Clone, Copy)]
struct Metrics {
    requests_total: u32,
    inflight: u32,
    body_bytes: u32,
    ticks_total: u32,
}

impl Metrics {
    fn define() -> Result<Self, Status> {
        // The SDK 0.2.5 has no `Context` methods for metrics; they are free functions.
        Ok(Metrics {
            requests_total: hostcalls::define_metric(
                MetricType::Counter,
                "kitchen_requests_total",
            )?,
            inflight: hostcalls::define_metric(MetricType::Gauge, "kitchen_inflight")?,
            body_bytes: hostcalls::define_metric(MetricType::Histogram, "kitchen_body_bytes")?,
            ticks_total: hostcalls::define_metric(MetricType::Counter, "kitchen_ticks_total")?,
        })
    }
}

/// Metric failures are logged at error level (never warn: tests count warn lines).
fn increment_metric(metric_id: u32, offset: i64) {
    if let Err(status) = hostcalls::increment_metric(metric_id, offset) {
        error!("increment_metric({metric_id}, {offset}) failed: {status:?}");
    }
}

fn record_metric(metric_id: u32, value: u64) {
    if let Err(status) = hostcalls::record_metric(metric_id, value) {
        error!("record_metric({metric_id}, {value}) failed: {status:?}");
    }
}

fn lossy_or_none(bytes: Option<&[u8]>) -> String {
    bytes.map_or_else(
        || "none".to_owned(),
        |b| String::from_utf8_lossy(b).into_owned(),
    )
}

fn ok_or_bad(ok: bool) -> &'static str {
    if ok { "ok" } else { "bad" }
}

fn is_sane_wall_clock(time: SystemTime) -> bool {
    time.duration_since(UNIX_EPOCH)
        .is_ok_and(|since| since.as_secs() > SANE_EPOCH_SECS)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}"); // writing to a String cannot fail
            hex
        })
}

#[derive(Default)]
struct KitchenRoot {
    config: Rc<Config>,
    metrics: Option<Metrics>,
    queue_id: Option<u32>,
}

impl Context for KitchenRoot {}

impl RootContext for KitchenRoot {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        let vm_config = self.get_vm_configuration().unwrap_or_default();
        if vm_config == b"fail" {
            return false;
        }
        info!("vm_start: {}", String::from_utf8_lossy(&vm_config));
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let mut raw = self.get_plugin_configuration().unwrap_or_default();
        if raw.is_empty() {
            raw = b"{}".to_vec();
        }
        if raw == b"fail" {
            return false;
        }
        let config = match Config::parse(&raw) {
            Ok(config) => config,
            Err(err) => {
                error!("invalid configuration: {err}");
                return false;
            }
        };

        if let Some(tick_ms) = config.tick_ms {
            self.set_tick_period(Duration::from_millis(tick_ms));
        }
        if let Some(queue) = &config.queue {
            self.queue_id = Some(self.register_shared_queue(queue));
        }
        match Metrics::define() {
            Ok(metrics) => self.metrics = Some(metrics),
            Err(status) => {
                error!("define_metric failed: {status:?}");
                return false;
            }
        }

        info!("configured: {}", String::from_utf8_lossy(&raw));
        self.config = Rc::new(config);
        true
    }

    fn on_tick(&mut self) {
        if let Some(metrics) = self.metrics {
            increment_metric(metrics.ticks_total, 1);
        }
        info!("tick");
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        loop {
            match self.dequeue_shared_queue(queue_id) {
                Ok(Some(message)) => {
                    info!("queue message: {}", String::from_utf8_lossy(&message));
                    if let Err(status) =
                        self.set_shared_data(LAST_QUEUE_MESSAGE_KEY, Some(&message), None)
                    {
                        error!("set_shared_data({LAST_QUEUE_MESSAGE_KEY}) failed: {status:?}");
                    }
                }
                // The SDK reports both "queue empty" and "empty message" as Ok(None).
                Ok(None) => break,
                Err(status) => {
                    error!("dequeue_shared_queue({queue_id}) failed: {status:?}");
                    break;
                }
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(KitchenHttp {
            context_id,
            config: Rc::clone(&self.config),
            metrics: self.metrics,
            mode: Mode::None,
        }))
    }

    // Without this the SDK does not know which kind of stream context to create.
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// What a request does beyond the common edits, from its `x-mode` request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// No `x-mode` header, or a value not listed here.
    None,
    LocalReply,
    Remove,
    Replace,
    Pairs,
    Pause,
    SetProperty,
    HttpCall,
    BufferBody,
    ResponseLocalReply,
    ResponseBody,
    Foreign,
    GetMetric,
    GrpcCall,
    GrpcStream,
    Property,
    Panic,
}

impl Mode {
    fn parse(value: Option<&str>) -> Mode {
        match value {
            Some("local-reply") => Mode::LocalReply,
            Some("remove") => Mode::Remove,
            Some("replace") => Mode::Replace,
            Some("pairs") => Mode::Pairs,
            Some("pause") => Mode::Pause,
            Some("set-property") => Mode::SetProperty,
            Some("http-call") => Mode::HttpCall,
            Some("buffer-body") => Mode::BufferBody,
            Some("response-local-reply") => Mode::ResponseLocalReply,
            Some("response-body") => Mode::ResponseBody,
            Some("foreign") => Mode::Foreign,
            Some("get-metric") => Mode::GetMetric,
            Some("grpc-call") => Mode::GrpcCall,
            Some("grpc-stream") => Mode::GrpcStream,
            Some("property") => Mode::Property,
            Some("panic") => Mode::Panic,
            _ => Mode::None,
        }
    }
}

struct KitchenHttp {
    context_id: u32,
    config: Rc<Config>,
    /// `None` only if the host created a stream before a successful `on_configure`.
    metrics: Option<Metrics>,
    mode: Mode,
}

impl KitchenHttp {
    /// `{P}-{suffix}`.
    fn name(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.config.header_prefix)
    }

    /// Sets (replaces) request header `{P}-{suffix}`.
    fn set_request(&self, suffix: &str, value: &str) {
        self.set_http_request_header(&self.name(suffix), Some(value));
    }

    fn set_response(&self, suffix: &str, value: &str) {
        self.set_http_response_header(&self.name(suffix), Some(value));
    }

    /// Increments the shared counter with compare-and-swap, retrying on a lost race,
    /// and returns the value this request wrote.
    fn bump_shared_counter(&self) -> u64 {
        loop {
            let (value, cas) = self.get_shared_data(COUNTER_KEY);
            let current = value
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .and_then(|text| text.parse::<u64>().ok())
                .unwrap_or(0);
            let next = current + 1;
            match self.set_shared_data(COUNTER_KEY, Some(next.to_string().as_bytes()), cas) {
                Ok(()) => return next,
                // Another context wrote in between: read again and retry.
                Err(Status::CasMismatch) => {}
                // The SDK maps every other status to a panic, so this is unreachable today.
                Err(status) => {
                    error!("set_shared_data({COUNTER_KEY}) failed: {status:?}");
                    return next;
                }
            }
        }
    }

    /// Enqueues `message` on the configured queue, resolved by name in this VM.
    fn enqueue(&self, queue: &str, vm_id: &str, message: &[u8]) {
        match self.resolve_shared_queue(vm_id, queue) {
            Some(queue_id) => {
                if let Err(status) = self.enqueue_shared_queue(queue_id, Some(message)) {
                    error!("enqueue_shared_queue({queue_id}) failed: {status:?}");
                }
            }
            None => error!("shared queue {queue:?} not found in vm {vm_id:?}"),
        }
    }

    /// Headers that check what the guest sees through WASI and the host clock.
    fn set_wasi_headers(&self) {
        let env = std::env::var("KITCHEN_ENV").unwrap_or_else(|_| "unset".to_owned());
        self.set_request("env", &env);
        let home = std::env::var("HOME").unwrap_or_else(|_| "unset".to_owned());
        self.set_request("home", &home);

        self.set_request("clock", ok_or_bad(is_sane_wall_clock(SystemTime::now())));
        self.set_request(
            "host-clock",
            ok_or_bad(is_sane_wall_clock(self.get_current_time())),
        );

        let first = Instant::now();
        let second = Instant::now();
        self.set_request("mono", ok_or_bad(second >= first));

        let mut random = [0u8; 16];
        let random = match getrandom::getrandom(&mut random) {
            Ok(()) => to_hex(&random),
            Err(err) => format!("err:{err}"),
        };
        self.set_request("random", &random);
    }

    /// The `x-mode` specific part of `on_http_request_headers`.
    fn run_request_mode(&mut self) -> Action {
        match self.mode {
            Mode::LocalReply => {
                self.send_http_response(
                    403,
                    vec![("x-reason", "denied"), ("content-type", "text/plain")],
                    Some(b"denied by kitchen"),
                );
                return Action::Pause;
            }
            Mode::Remove => self.remove_http_request_header("x-remove-me"),
            Mode::Replace => self.set_http_request_header("x-replace-me", Some("replaced")),
            Mode::Pairs => {
                let headers = self.get_http_request_headers();
                let count = headers.len().to_string();
                let mut pairs: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(name, value)| (name.as_str(), value.as_str()))
                    .collect();
                pairs.push(("x-pairs-count", &count));
                self.set_http_request_headers(pairs);
            }
            Mode::Pause => return Action::Pause,
            Mode::SetProperty => {
                self.set_property(vec!["kitchen", "prop"], Some(b"v1"));
                let readback = self.get_property(vec!["kitchen", "prop"]);
                self.set_request("prop-readback", &lossy_or_none(readback.as_deref()));
            }
            Mode::HttpCall => {
                let dispatched = self.dispatch_http_call(
                    "upstream_cluster",
                    vec![
                        (":method", "GET"),
                        (":path", "/auth"),
                        (":authority", "auth.local"),
                    ],
                    None,
                    vec![],
                    Duration::from_secs(1),
                );
                match dispatched {
                    // Resumed from on_http_call_response.
                    Ok(_token) => return Action::Pause,
                    Err(status) => self.set_request("call-error", &format!("{status:?}")),
                }
            }
            Mode::Foreign => {
                let value = match self.call_foreign_function("kitchen_echo", Some(b"ping")) {
                    Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
                    Ok(None) => "none".to_owned(),
                    Err(status) => format!("err:{status:?}"),
                };
                self.set_request("foreign", &value);
            }
            Mode::GetMetric => {
                let value = match self
                    .metrics
                    .map(|m| hostcalls::get_metric(m.requests_total))
                {
                    Some(Ok(value)) => value.to_string(),
                    Some(Err(status)) => format!("err:{status:?}"),
                    None => "none".to_owned(),
                };
                self.set_request("metric", &value);
            }
            Mode::GrpcCall => {
                let dispatched = self.dispatch_grpc_call(
                    "upstream_cluster",
                    "kitchen.Echo",
                    "Say",
                    vec![("x-grpc-meta", b"1")],
                    Some(b"grpc ping"),
                    Duration::from_secs(1),
                );
                match dispatched {
                    // Resumed from on_grpc_call_response.
                    Ok(_token) => return Action::Pause,
                    Err(status) => self.set_request("grpc-error", &format!("{status:?}")),
                }
            }
            Mode::GrpcStream => {
                match self.open_grpc_stream("upstream_cluster", "kitchen.Echo", "Chat", vec![]) {
                    Ok(token) => {
                        self.send_grpc_stream_message(token, Some(b"first"), false);
                        self.set_request("grpc-stream", &token.to_string());
                        return Action::Pause;
                    }
                    Err(status) => self.set_request("grpc-error", &format!("{status:?}")),
                }
            }
            Mode::Property => {
                // The path comes dot-separated in `x-property-path`; the raw value goes back hex-encoded.
                let path = self.get_http_request_header("x-property-path").unwrap_or_default();
                let value = self.get_property(path.split('.').collect());
                let shown = value.map(|v| to_hex(&v)).unwrap_or_else(|| "none".to_owned());
                self.set_request("property", &shown);
            }
            Mode::Panic => panic!("kitchen panic on purpose"),
            // These act in later callbacks.
            Mode::BufferBody | Mode::ResponseLocalReply | Mode::ResponseBody | Mode::None => {}
        }
        Action::Continue
    }
}

impl Context for KitchenHttp {
    fn on_http_call_response(
        &mut self,
        _token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        // A failed call has no headers: reading one is BAD_ARGUMENT in Envoy, a panic in the SDK.
        let status = if num_headers > 0 {
            self.get_http_call_response_header(":status")
        } else {
            None
        };
        self.set_request("call-status", status.as_deref().unwrap_or("none"));
        let body = self.get_http_call_response_body(0, body_size);
        self.set_request("call-body", &lossy_or_none(body.as_deref()));
        self.resume_http_request();
    }

    fn on_grpc_call_response(&mut self, _token_id: u32, status_code: u32, response_size: usize) {
        let message = self.get_grpc_call_response_body(0, response_size);
        self.set_request("grpc-status", &status_code.to_string());
        self.set_request("grpc-message", &lossy_or_none(message.as_deref()));
        self.resume_http_request();
    }

    fn on_grpc_stream_initial_metadata(&mut self, _token_id: u32, _num_elements: u32) {
        let value = self.get_grpc_stream_initial_metadata_value("x-stream-meta");
        self.set_request("grpc-stream-meta", &lossy_or_none(value.as_deref()));
    }

    fn on_grpc_stream_message(&mut self, token_id: u32, message_size: usize) {
        let message = self.get_grpc_stream_message(0, message_size);
        self.set_request("grpc-stream-message", &lossy_or_none(message.as_deref()));
        // Answer once, then half-close our side.
        self.send_grpc_stream_message(token_id, Some(b"second"), true);
    }

    fn on_grpc_stream_trailing_metadata(&mut self, _token_id: u32, _num_elements: u32) {
        let value = self.get_grpc_stream_trailing_metadata_value("x-stream-trailer");
        self.set_request("grpc-stream-trailer", &lossy_or_none(value.as_deref()));
    }

    fn on_grpc_stream_close(&mut self, _token_id: u32, status_code: u32) {
        let (_, message) = self.get_grpc_status();
        self.set_request("grpc-stream-close", &format!("{status_code}:{}", message.unwrap_or_default()));
        self.resume_http_request();
    }
}

impl HttpContext for KitchenHttp {
    fn on_http_request_headers(&mut self, num_headers: usize, end_of_stream: bool) -> Action {
        if let Some(metrics) = self.metrics {
            increment_metric(metrics.requests_total, 1);
            increment_metric(metrics.inflight, 1);
        }

        self.add_http_request_header(&self.name("seen"), "1");
        self.set_request("num-headers", &num_headers.to_string());
        self.set_request("eos", if end_of_stream { "true" } else { "false" });

        let path = lossy_or_none(self.get_property(vec!["request", "path"]).as_deref());
        self.set_request("path", &path);
        let plugin_name = self.get_property(vec!["plugin_name"]);
        self.set_request("plugin-name", &lossy_or_none(plugin_name.as_deref()));
        let root_id = self.get_property(vec!["plugin_root_id"]);
        self.set_request("root-id", &lossy_or_none(root_id.as_deref()));
        let vm_id = self.get_property(vec!["plugin_vm_id"]);
        self.set_request("vm-id", &lossy_or_none(vm_id.as_deref()));

        let counter = self.bump_shared_counter();
        self.set_request("counter", &counter.to_string());

        if let Some(queue) = &self.config.queue {
            let vm_id = vm_id
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            // The message is exactly what went into `{P}-path`.
            self.enqueue(queue, &vm_id, path.as_bytes());
        }

        self.set_wasi_headers();

        println!("stdout from kitchen");
        eprintln!("stderr from kitchen");

        info!("request headers: {num_headers}");
        debug!("debug line");
        trace!("trace line");
        if self.get_http_request_header("x-log-warn").is_some() {
            warn!("warn line");
        }

        self.mode = Mode::parse(self.get_http_request_header("x-mode").as_deref());
        self.run_request_mode()
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.mode != Mode::BufferBody {
            return Action::Continue;
        }
        // Pausing on each chunk makes the host buffer until the last one.
        if !end_of_stream {
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        self.set_http_request_body(0, body_size, &body.to_ascii_uppercase());
        if let Some(metrics) = self.metrics {
            record_metric(metrics.body_bytes, body_size as u64);
        }
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        self.add_http_request_trailer(&self.name("trailer"), "1");
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.mode == Mode::ResponseLocalReply {
            // Reply before touching the upstream headers: the local reply replaces them,
            // so the client sees exactly the headers given here.
            self.send_http_response(
                500,
                vec![("x-reason", "response")],
                Some(b"replaced response"),
            );
            return Action::Pause;
        }
        self.set_response("response", "1");
        self.remove_http_response_header("x-upstream-secret");
        let status = self.get_http_response_header(":status");
        self.set_response("status", status.as_deref().unwrap_or("none"));
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.mode != Mode::ResponseBody {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let mut body = self
            .get_http_response_body(0, body_size)
            .unwrap_or_default();
        body.extend_from_slice(b" [kitchen]");
        self.set_http_response_body(0, body_size, &body);
        Action::Continue
    }

    fn on_log(&mut self) {
        if let Some(metrics) = self.metrics {
            increment_metric(metrics.inflight, -1);
        }
        info!("on_log {}", self.context_id);
    }
}
