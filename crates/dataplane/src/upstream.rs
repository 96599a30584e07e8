//! Clusters on one worker: a keep-alive pool per cluster (hyper-util's client), endpoints taken
//! round robin, connect and request timeouts, plain HTTP or TLS (hyper-rustls).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use wasmgate_abi::{GrpcCallRequest, HeaderMap, HttpCallRequest};
use wasmgate_runtime::CallOutcome;

use crate::body::GatewayBody;
use crate::convert;
use crate::spec::ClusterSpec;
use crate::tls::ClusterTls;

#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    #[error("unknown cluster {0}")]
    UnknownCluster(String),
    #[error("cluster {0} has no endpoints")]
    NoEndpoints(String),
    #[error("invalid upstream request: {0}")]
    BadRequest(String),
    #[error("upstream connect error: {0}")]
    Connect(String),
    #[error("upstream request timeout")]
    Timeout,
    #[error("upstream error: {0}")]
    Other(String),
}

impl UpstreamError {
    /// The status the client gets, as Envoy answers.
    pub fn status(&self) -> u16 {
        match self {
            UpstreamError::Timeout => 504,
            UpstreamError::UnknownCluster(_) | UpstreamError::NoEndpoints(_) => 503,
            UpstreamError::BadRequest(_) => 500,
            UpstreamError::Connect(_) | UpstreamError::Other(_) => 503,
        }
    }
}

struct Cluster {
    spec: ClusterSpec,
    /// One client type for both kinds: the connector does TLS for `https://` URIs only, and a
    /// cluster's URIs are `https://` exactly when it has TLS.
    client: Client<HttpsConnector<HttpConnector>, GatewayBody>,
    scheme: &'static str,
    next: Cell<usize>,
}

pub(crate) struct Upstreams {
    clusters: HashMap<String, Cluster>,
}

/// A worker's clusters, replaced whole when a reload changes them: a request or a plugin's call
/// takes the table current when it starts, so its connection pool outlives the swap.
pub(crate) struct UpstreamsCell(RefCell<Rc<Upstreams>>);

impl UpstreamsCell {
    pub fn new(upstreams: Upstreams) -> Self {
        Self(RefCell::new(Rc::new(upstreams)))
    }

    pub fn current(&self) -> Rc<Upstreams> {
        self.0.borrow().clone()
    }

    pub fn replace(&self, upstreams: Upstreams) {
        *self.0.borrow_mut() = Rc::new(upstreams);
    }
}

impl Upstreams {
    /// `tls` holds every cluster's settings by name (see [`crate::tls::plain_cluster_config`]
    /// for plain clusters); a cluster missing from it is plain.
    pub fn new(specs: &[ClusterSpec], tls: &HashMap<String, ClusterTls>) -> Self {
        let clusters = specs
            .iter()
            .map(|spec| {
                let mut http = HttpConnector::new();
                http.set_connect_timeout(Some(spec.connect_timeout));
                http.set_nodelay(true);
                // The TLS layer takes `https://` URIs; the inner connector must let them through.
                http.enforce_http(false);
                let cluster_tls = tls
                    .get(&spec.name)
                    .cloned()
                    .unwrap_or_else(crate::tls::plain_cluster_config);
                let connector =
                    HttpsConnector::new(http, cluster_tls.config, false, cluster_tls.server_name);
                let mut builder = Client::builder(TokioExecutor::new());
                builder
                    .pool_timer(TokioTimer::new())
                    .pool_idle_timeout(Duration::from_secs(60))
                    .timer(TokioTimer::new());
                if spec.http2 {
                    builder.http2_only(true);
                }
                let client = builder.build(connector);
                (
                    spec.name.clone(),
                    Cluster {
                        spec: spec.clone(),
                        client,
                        scheme: if spec.tls.is_some() { "https" } else { "http" },
                        next: Cell::new(0),
                    },
                )
            })
            .collect();
        Self { clusters }
    }

    pub fn timeout(&self, cluster: &str) -> Option<Duration> {
        self.clusters
            .get(cluster)
            .and_then(|c| c.spec.request_timeout)
    }

    /// Sends `request` (path-only URI) to the next endpoint of `cluster`, waiting for the response head.
    pub async fn send(
        &self,
        cluster: &str,
        mut request: Request<GatewayBody>,
        timeout: Option<Duration>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let target = self
            .clusters
            .get(cluster)
            .ok_or_else(|| UpstreamError::UnknownCluster(cluster.to_owned()))?;
        if target.spec.endpoints.is_empty() {
            return Err(UpstreamError::NoEndpoints(cluster.to_owned()));
        }
        let index = target.next.get();
        target.next.set(index.wrapping_add(1));
        let endpoint = &target.spec.endpoints[index % target.spec.endpoints.len()];
        let path = request
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let scheme = target.scheme;
        let uri: Uri = format!("{scheme}://{endpoint}{path}")
            .parse()
            .map_err(|e| UpstreamError::BadRequest(format!("{e}")))?;
        *request.uri_mut() = uri;
        let send = target.client.request(request);
        let result = match timeout.or(target.spec.request_timeout) {
            Some(limit) => tokio::time::timeout(limit, send)
                .await
                .map_err(|_| UpstreamError::Timeout)?,
            None => send.await,
        };
        result.map_err(|error| {
            if error.is_connect() {
                UpstreamError::Connect(format!("{cluster} ({endpoint}): {}", root_cause(&error)))
            } else {
                UpstreamError::Other(format!("{cluster} ({endpoint}): {}", root_cause(&error)))
            }
        })
    }

    /// `proxy_http_call`: the whole answer, or a failure the plugin sees as zero headers.
    pub async fn http_call(&self, call: &HttpCallRequest) -> CallOutcome {
        let failure = |message: String| CallOutcome::Failure { message };
        let timeout = (call.timeout_ms > 0).then(|| Duration::from_millis(call.timeout_ms.into()));
        let request = match convert::request_from_map(
            &call.headers,
            GatewayBody::full(Bytes::from(call.body.clone())),
        ) {
            Ok(request) => request,
            Err(error) => return failure(error),
        };
        let work = async {
            let response = self
                .send(&call.upstream, request, timeout)
                .await
                .map_err(|e| e.to_string())?;
            let (parts, body) = response.into_parts();
            let collected = body
                .collect()
                .await
                .map_err(|e| format!("reading the response body: {e}"))?;
            let trailers = collected
                .trailers()
                .map(convert::plain_map)
                .unwrap_or_default();
            let headers = convert::response_map(&parts);
            Ok::<_, String>((headers, collected.to_bytes().to_vec(), trailers))
        };
        let result = match timeout {
            Some(limit) => tokio::time::timeout(limit, work)
                .await
                .unwrap_or(Err("timeout".into())),
            None => work.await,
        };
        match result {
            Ok((headers, body, trailers)) => CallOutcome::Response {
                headers,
                body,
                trailers,
            },
            Err(message) => failure(message),
        }
    }
}

/// One request to a cluster outside any gateway: `wasmgate plugin run --upstream` sends what a
/// plugin let through with the same client, TLS and header handling the gateway's clusters use.
/// A failed exchange is a [`CallOutcome::Failure`] with the reason.
pub async fn send_once(
    cluster: &ClusterSpec,
    request: &HttpCallRequest,
) -> Result<CallOutcome, crate::StartError> {
    let mut tls = HashMap::new();
    if let Some(config) = crate::tls::cluster_config(cluster)? {
        tls.insert(cluster.name.clone(), config);
    }
    let upstreams = Upstreams::new(std::slice::from_ref(cluster), &tls);
    let request = HttpCallRequest {
        upstream: cluster.name.clone(),
        ..request.clone()
    };
    Ok(upstreams.http_call(&request).await)
}

/// A gRPC message on the wire: a compressed flag (never set here), a big-endian length, the bytes.
pub(crate) fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    framed
}

/// Takes one whole message off the front of `buffer`, if one has arrived.
pub(crate) fn take_grpc_message(buffer: &mut Vec<u8>) -> Option<Vec<u8>> {
    let length = u32::from_be_bytes(buffer.get(1..5)?.try_into().ok()?) as usize;
    if buffer.len() < 5 + length {
        return None;
    }
    let message = buffer[5..5 + length].to_vec();
    buffer.drain(..5 + length);
    Some(message)
}

fn grpc_request(
    cluster: &str,
    service: &str,
    method: &str,
    metadata: &HeaderMap,
    body: GatewayBody,
) -> Result<Request<GatewayBody>, (u32, String)> {
    let mut map = HeaderMap::new();
    map.add(":method", "POST");
    map.add(":path", format!("/{service}/{method}"));
    map.add(":authority", cluster);
    map.add("content-type", "application/grpc");
    map.add("te", "trailers");
    for (name, value) in metadata.iter() {
        map.add(name, value);
    }
    convert::request_from_map(&map, body).map_err(|e| (GRPC_INTERNAL, e))
}

/// The answer to a unary gRPC call: the response message, or a gRPC status and message.
pub(crate) type GrpcOutcome = Result<Vec<u8>, (u32, String)>;

/// gRPC status codes used when the transport fails before the server answers.
const GRPC_INTERNAL: u32 = 13;
const GRPC_UNAVAILABLE: u32 = 14;
const GRPC_DEADLINE_EXCEEDED: u32 = 4;

impl Upstreams {
    /// `proxy_grpc_stream`: the request body is fed by the plugin's sends; returns the response head.
    pub async fn grpc_stream(
        &self,
        call: &wasmgate_abi::GrpcStreamRequest,
        body: GatewayBody,
    ) -> Result<Response<Incoming>, (u32, String)> {
        let cluster = String::from_utf8_lossy(&call.upstream).into_owned();
        let request = grpc_request(
            &cluster,
            &call.service,
            &call.method,
            &call.initial_metadata,
            body,
        )?;
        let response = self
            .send(&cluster, request, None)
            .await
            .map_err(|e| (GRPC_UNAVAILABLE, e.to_string()))?;
        if response.status() != http::StatusCode::OK {
            return Err((
                GRPC_UNAVAILABLE,
                format!("HTTP status {}", response.status().as_u16()),
            ));
        }
        Ok(response)
    }

    /// `proxy_grpc_call`: one request message over HTTP/2 to the cluster (configure it with
    /// `http2: true`, as Envoy requires for gRPC), one response message back.
    pub async fn grpc_call(&self, call: &GrpcCallRequest) -> GrpcOutcome {
        let cluster = String::from_utf8_lossy(&call.upstream).into_owned();
        let body = GatewayBody::full(Bytes::from(grpc_frame(&call.message)));
        let request = grpc_request(
            &cluster,
            &call.service,
            &call.method,
            &call.initial_metadata,
            body,
        )?;
        let timeout = (call.timeout_ms > 0).then(|| Duration::from_millis(call.timeout_ms.into()));
        let work = async {
            let response = self
                .send(&cluster, request, timeout)
                .await
                .map_err(|e| match e {
                    UpstreamError::Timeout => (GRPC_DEADLINE_EXCEEDED, e.to_string()),
                    other => (GRPC_UNAVAILABLE, other.to_string()),
                })?;
            let (parts, body) = response.into_parts();
            if parts.status != http::StatusCode::OK {
                return Err((
                    GRPC_UNAVAILABLE,
                    format!("HTTP status {}", parts.status.as_u16()),
                ));
            }
            let collected = body
                .collect()
                .await
                .map_err(|e| (GRPC_UNAVAILABLE, e.to_string()))?;
            // Trailers carry the status, or the headers do in a trailers-only answer.
            let trailers = collected.trailers().cloned().unwrap_or_default();
            let field = |name: &str| {
                trailers
                    .get(name)
                    .or_else(|| parts.headers.get(name))
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let status = field("grpc-status")
                .and_then(|s| s.parse().ok())
                .unwrap_or(2);
            if status != 0 {
                return Err((status, field("grpc-message").unwrap_or_default()));
            }
            let bytes = collected.to_bytes();
            let length = bytes
                .get(1..5)
                .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize);
            match length {
                Some(length) if bytes.len() >= 5 + length => Ok(bytes[5..5 + length].to_vec()),
                _ => Err((GRPC_INTERNAL, "malformed gRPC response message".into())),
            }
        };
        match timeout {
            Some(limit) => tokio::time::timeout(limit, work)
                .await
                .unwrap_or(Err((GRPC_DEADLINE_EXCEEDED, "timeout".into()))),
            None => work.await,
        }
    }
}

fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}
