//! What an embedder provides: the host calls that need a proxy (outbound calls, stream control,
//! local replies, request-time facts), routed through [`Host`].

use std::net::SocketAddr;
use std::time::SystemTime;

use crate::{HeaderMap, LogLevel, PropertyValue, Status, StreamType};

/// A reply the plugin asked the proxy to send instead of (or in place of) the upstream's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    pub status_code: u32,
    /// Envoy's response code details; spaces become `_` as Envoy does.
    pub details: String,
    pub body: Vec<u8>,
    pub headers: HeaderMap,
    /// The gRPC status to answer with, when the guest gave one (0..=16).
    pub grpc_status: Option<u32>,
}

/// An outbound HTTP call (`proxy_http_call`). `:method`, `:path` and `:authority` are checked by the
/// runtime before the host sees the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCallRequest {
    /// The cluster name, as in Envoy.
    pub upstream: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub trailers: HeaderMap,
    /// 0 means no timeout, as in Envoy.
    pub timeout_ms: u32,
}

/// A unary gRPC call (`proxy_grpc_call`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcCallRequest {
    /// A cluster name, or a serialized `GrpcService` as Envoy accepts.
    pub upstream: Vec<u8>,
    pub service: String,
    pub method: String,
    pub initial_metadata: HeaderMap,
    pub message: Vec<u8>,
    pub timeout_ms: u32,
}

/// A streaming gRPC call (`proxy_grpc_stream`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcStreamRequest {
    pub upstream: Vec<u8>,
    pub service: String,
    pub method: String,
    pub initial_metadata: HeaderMap,
}

/// A log line from a plugin (`proxy_log`, or WASI stdout/stderr).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub level: LogLevel,
    pub plugin: String,
    pub context_id: u32,
    pub message: String,
}

/// Facts about a stream that only the proxy knows, from which the runtime answers Envoy's
/// `source.*`, `destination.*`, `connection.*`, `upstream.*`, `xds.*` and parts of `request.*` and
/// `response.*`. The embedder fills in what it knows; unknown facts answer NOT_FOUND.
#[derive(Debug, Clone, Default)]
pub struct StreamInfo {
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    pub connection_id: Option<u64>,
    pub mtls: bool,
    pub requested_server_name: Option<String>,
    pub tls_version: Option<String>,
    /// `HTTP/1.0`, `HTTP/1.1`, `HTTP/2`.
    pub protocol: Option<String>,
    pub start_time: Option<SystemTime>,
    pub request_size: Option<u64>,
    pub request_total_size: Option<u64>,
    pub response_size: Option<u64>,
    pub response_total_size: Option<u64>,
    pub response_code_details: Option<String>,
    pub response_flags: Option<u64>,
    pub upstream_address: Option<SocketAddr>,
    pub upstream_local_address: Option<SocketAddr>,
    pub upstream_tls_version: Option<String>,
    pub upstream_request_attempt_count: Option<u64>,
    pub listener_name: Option<String>,
    /// Envoy's `listener_direction`: 0 unspecified, 1 inbound, 2 outbound.
    pub listener_direction: Option<i64>,
    pub route_name: Option<String>,
    pub virtual_host_name: Option<String>,
    pub cluster_name: Option<String>,
    pub filter_chain_name: Option<String>,
    /// `xds.node` id, as the gateway identifies itself.
    pub node_id: Option<String>,
}

/// The part of the host that needs a proxy. One value serves one VM; `context_id` is the effective
/// context the guest acted in. Every method must answer: a host that cannot do something says so
/// with a status, never silently.
pub trait Host: Send + 'static {
    /// A guest's log line, after the runtime has written it to `tracing`. Hosts that keep logs
    /// (the test harness) override this.
    fn log(&mut self, _record: &LogRecord) {}

    /// `proxy_http_call`: start the call and later deliver the answer with the same `token`.
    fn http_call(
        &mut self,
        context_id: u32,
        token: u32,
        call: HttpCallRequest,
    ) -> Result<(), Status>;

    /// `proxy_grpc_call`.
    fn grpc_call(
        &mut self,
        context_id: u32,
        token: u32,
        call: GrpcCallRequest,
    ) -> Result<(), Status>;

    /// `proxy_grpc_stream`.
    fn grpc_stream(
        &mut self,
        context_id: u32,
        token: u32,
        call: GrpcStreamRequest,
    ) -> Result<(), Status>;

    /// `proxy_grpc_send`.
    fn grpc_send(&mut self, token: u32, message: Vec<u8>, end_of_stream: bool) -> Status;

    /// `proxy_grpc_cancel`.
    fn grpc_cancel(&mut self, token: u32) -> Status;

    /// `proxy_grpc_close`.
    fn grpc_close(&mut self, token: u32) -> Status;

    /// `proxy_continue_stream` (and ABI 0.1.0's `proxy_continue_request/response`).
    fn continue_stream(&mut self, context_id: u32, stream: StreamType) -> Status;

    /// `proxy_close_stream`.
    fn close_stream(&mut self, context_id: u32, stream: StreamType) -> Status;

    /// `proxy_send_local_response`.
    fn send_local_response(&mut self, context_id: u32, response: LocalResponse) -> Status;

    /// ABI 0.1.0's `proxy_clear_route_cache`.
    fn clear_route_cache(&mut self, context_id: u32) -> Status;

    /// Properties the embedder answers itself, before the runtime's built-in table. `None` means
    /// "not mine"; the runtime then answers from [`StreamInfo`] and the stream's maps.
    fn get_property(&mut self, _context_id: u32, _path: &[&[u8]]) -> Option<PropertyValue> {
        None
    }

    /// `proxy_call_foreign_function` for names the runtime does not provide itself.
    fn call_foreign_function(&mut self, _name: &str, _arguments: &[u8]) -> Result<Vec<u8>, Status> {
        Err(Status::NotFound)
    }
}
