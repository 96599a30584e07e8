//! One request through a listener: the filter chain, the route, the upstream, and back.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use tokio::sync::mpsc;
use wasmgate_abi::{HeaderMap, LocalResponse, StreamInfo};
use wasmgate_runtime::SharedHeaders;

use crate::body::{BoxError, GatewayBody};
use crate::chain::{Chain, Direction, Flow, Halt, Plugin};
use crate::convert;
use crate::spec::{ListenerSpec, RouteAction, RouteSpec};
use crate::stats::GatewayStats;
use crate::upstream::{UpstreamError, UpstreamsCell};

pub(crate) struct ListenerState {
    pub spec: ListenerSpec,
    /// Swapped whole by a chain update; a request holds the one it started with.
    pub chain: RefCell<Rc<ActiveChain>>,
    /// Network plugins that see the connection's bytes before the HTTP codec.
    pub network: RefCell<Rc<crate::tcp::NetworkChain>>,
    /// The routes, swapped whole by a reload; a request routes on the table it started with.
    pub routes: RefCell<Rc<[RouteSpec]>>,
    pub upstreams: Rc<UpstreamsCell>,
    pub stats: Arc<GatewayStats>,
}

/// A listener's chain on one worker.
pub(crate) struct ActiveChain {
    pub plugins: Vec<Rc<Plugin>>,
    /// See [`ListenerSpec::missing_plugins`].
    pub missing_plugins: Vec<String>,
}

pub(crate) struct ConnInfo {
    pub remote: std::net::SocketAddr,
    pub local: std::net::SocketAddr,
    pub id: u64,
    /// `https` on a TLS listener.
    pub scheme: &'static str,
    /// `TLSv1.2` or `TLSv1.3` on a TLS listener (`connection.tls_version`).
    pub tls_version: Option<String>,
    /// The SNI the client sent (`connection.requested_server_name`).
    pub requested_server_name: Option<String>,
}

pub(crate) async fn handle(
    listener: Rc<ListenerState>,
    conn: Rc<ConnInfo>,
    request: Request<Incoming>,
) -> Result<Response<GatewayBody>, StreamReset> {
    let started = Instant::now();
    let response = proxy(&listener, &conn, request).await;
    if response.extensions().get::<ResetMarker>().is_some() {
        return Err(StreamReset);
    }
    listener
        .stats
        .record_response(response.status().as_u16(), started.elapsed());
    Ok(response)
}

/// Marks the response that stands for a reset stream; [`handle`] turns it into [`StreamReset`].
#[derive(Clone, Copy)]
struct ResetMarker;

/// A stream a plugin closed (`proxy_close_stream`): hyper closes the HTTP/1.1 connection or
/// resets the HTTP/2 stream, with no response, as Envoy resets it.
#[derive(Debug)]
pub(crate) struct StreamReset;

impl std::fmt::Display for StreamReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a plugin closed the stream")
    }
}

impl std::error::Error for StreamReset {}

fn reset() -> Response<GatewayBody> {
    let mut response = Response::new(GatewayBody::full(Vec::new()));
    response.extensions_mut().insert(ResetMarker);
    response
}

/// A random version-4 UUID, as Envoy's `x-request-id`. From a per-thread generator seeded once from
/// the OS (through `RandomState`), written with no intermediate allocation: this runs on every
/// request, and the earlier version (two `RandomState`s and 16 `format!`s) showed in profiles.
fn request_id() -> String {
    use std::cell::Cell;
    use std::hash::{BuildHasher, Hasher};
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u64(std::process::id().into());
            hasher.finish() | 1
        });
    }
    // SplitMix64: statistically sound, and unpredictable enough for an id that is not a secret
    // (Envoy's is not either).
    let next = || {
        STATE.with(|state| {
            let value = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
            state.set(value);
            let mut z = value;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        })
    };
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&next().to_be_bytes());
    bytes[8..].copy_from_slice(&next().to_be_bytes());
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(36);
    for (index, byte) in bytes.iter().enumerate() {
        if matches!(index, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push(HEX[usize::from(byte >> 4)] as char);
        out.push(HEX[usize::from(byte & 0x0f)] as char);
    }
    out
}

#[cfg(test)]
mod request_id_tests {
    #[test]
    fn request_ids_are_distinct_version_4_uuids() {
        let ids: std::collections::HashSet<String> =
            (0..1000).map(|_| super::request_id()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            let parts: Vec<&str> = id.split('-').collect();
            assert_eq!(
                parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
                [8, 4, 4, 4, 12],
                "{id}"
            );
            assert!(parts[2].starts_with('4'), "version 4: {id}");
            assert!(
                matches!(&parts[3][..1], "8" | "9" | "a" | "b"),
                "variant: {id}"
            );
            assert!(
                id.bytes()
                    .all(|b| b == b'-' || b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            );
        }
    }
}

fn route<'a>(routes: &'a [RouteSpec], headers: &HeaderMap) -> Option<&'a RouteSpec> {
    let host = headers.get_str(":authority").unwrap_or("");
    let path = headers.get_str(":path").unwrap_or("/");
    routes.iter().find(|r| r.matches(host, path))
}

async fn proxy(
    listener: &ListenerState,
    conn: &ConnInfo,
    request: Request<Incoming>,
) -> Response<GatewayBody> {
    let (parts, mut body) = request.into_parts();
    let mut headers = convert::request_map(&parts, conn.scheme);
    // As Envoy, before the filter chain, so plugins see them too.
    if headers.get("x-forwarded-proto").is_none() {
        headers.add("x-forwarded-proto", conn.scheme);
    }
    if headers.get("x-request-id").is_none() {
        headers.add("x-request-id", request_id());
    }
    let routes = listener.routes.borrow().clone();
    let initial_route = route(&routes, &headers);
    let info = StreamInfo {
        source: Some(conn.remote),
        destination: Some(conn.local),
        connection_id: Some(conn.id),
        tls_version: conn.tls_version.clone(),
        requested_server_name: conn.requested_server_name.clone(),
        protocol: Some(
            match parts.version {
                http::Version::HTTP_2 => "HTTP/2",
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            }
            .into(),
        ),
        start_time: Some(SystemTime::now()),
        listener_name: Some(listener.spec.name.clone()),
        route_name: initial_route.map(|r| r.name.clone()),
        cluster_name: initial_route.and_then(|r| match &r.action {
            RouteAction::Cluster(name) => Some(name.clone()),
            RouteAction::DirectResponse { .. } => None,
        }),
        ..Default::default()
    };
    let grpc = is_grpc(&headers);
    let active = listener.chain.borrow().clone();
    if !active.missing_plugins.is_empty() {
        if grpc {
            return grpc_status(403, "RBAC: access denied");
        }
        return denied(&active.missing_plugins);
    }
    let mut chain = match Chain::new(
        &active.plugins,
        info,
        listener.spec.limits.per_stream_buffer_limit,
    ) {
        Ok(chain) => chain,
        Err(Halt::Status { code, details }) if grpc => return grpc_status(code, details),
        Err(halt) => return gateway_status(halt),
    };
    let headers = SharedHeaders::new(headers);
    match forward(listener, &routes, &mut chain, &headers, &mut body).await {
        Ok(Forwarded::Upstream(response)) => respond(&mut chain, response).await,
        Ok(Forwarded::Direct(map, bytes)) => finish_direct(chain, map, bytes).await,
        Err(Halt::Status { code, details }) if grpc && details == "wasm_fail_stream" => {
            grpc_status(code, details)
        }
        Err(halt) => reply(&mut chain, halt).await,
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get("content-type")
        .is_some_and(|value| value.starts_with(b"application/grpc"))
}

/// The gateway's own answer to a gRPC request, as Envoy gives it: a trailers-only response (HTTP
/// 200) whose `grpc-status` maps the HTTP status (503 is UNAVAILABLE).
fn grpc_status(http_status: u16, message: &str) -> Response<GatewayBody> {
    let code = match http_status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    };
    let mut map = HeaderMap::new();
    map.add(":status", "200");
    map.add("content-type", "application/grpc");
    map.add("grpc-status", code.to_string());
    map.add("grpc-message", message);
    convert::response_from_map(&map, GatewayBody::full(Vec::new()))
}

enum Forwarded {
    Upstream(Response<Incoming>),
    /// A response made here (direct-response route, 404, upstream failure) that still passes the
    /// plugins' response callbacks.
    Direct(HeaderMap, Vec<u8>),
}

/// The request path: headers, body and trailers through the chain, then to the route's cluster.
async fn forward(
    listener: &ListenerState,
    routes: &[RouteSpec],
    chain: &mut Chain,
    headers: &SharedHeaders,
    body: &mut Incoming,
) -> Flow<Forwarded> {
    let end_after_headers = body.is_end_stream();
    chain
        .headers(Direction::Request, headers, end_after_headers, None)
        .await?;
    // Routes are chosen on the headers as the plugins left them.
    let Some(route) = route(routes, &headers.lock()) else {
        return Ok(Forwarded::Direct(status_map(404, false), Vec::new()));
    };
    let cluster = match &route.action {
        RouteAction::DirectResponse { status, body } => {
            return Ok(Forwarded::Direct(
                status_map(*status, !body.is_empty()),
                body.clone().into_bytes(),
            ));
        }
        RouteAction::Cluster(cluster) => cluster.clone(),
    };
    let timeout = route
        .timeout
        .or_else(|| listener.upstreams.current().timeout(&cluster));
    let mut upstream = Upstream::default();
    let keep_length = !chain.touches_body(Direction::Request);
    if end_after_headers {
        upstream.start(
            listener,
            &cluster,
            headers,
            timeout,
            Some(0),
            keep_length,
            true,
        );
    } else {
        loop {
            let Some(frame) = body.frame().await else {
                let out = chain
                    .data(Direction::Request, Vec::new(), true, None)
                    .await?;
                upstream.start(
                    listener,
                    &cluster,
                    headers,
                    timeout,
                    Some(out.len()),
                    keep_length,
                    false,
                );
                upstream.send(Frame::data(Bytes::from(out))).await;
                break;
            };
            let frame = match frame {
                Ok(frame) => frame,
                Err(error) => {
                    tracing::debug!("reading the request body: {error}");
                    return Err(Halt::Status {
                        code: 400,
                        details: "downstream_body_error",
                    });
                }
            };
            match frame.into_data() {
                Ok(data) => {
                    let eos = body.is_end_stream();
                    let out = chain
                        .data(Direction::Request, data.to_vec(), eos, None)
                        .await?;
                    if !out.is_empty() || eos {
                        let known = eos.then_some(out.len());
                        upstream.start(
                            listener,
                            &cluster,
                            headers,
                            timeout,
                            known,
                            keep_length,
                            false,
                        );
                        if !out.is_empty() {
                            upstream.send(Frame::data(Bytes::from(out))).await;
                        }
                    }
                    if eos {
                        break;
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let mut map = convert::plain_map(&trailers);
                        let released = chain.trailers(Direction::Request, &mut map, None).await?;
                        upstream.start(
                            listener,
                            &cluster,
                            headers,
                            timeout,
                            None,
                            keep_length,
                            false,
                        );
                        if !released.is_empty() {
                            upstream.send(Frame::data(Bytes::from(released))).await;
                        }
                        let mut out = http::HeaderMap::new();
                        convert::fill_headers(&map, &mut out);
                        upstream.send(Frame::trailers(out)).await;
                        break;
                    }
                }
            }
        }
    }
    match upstream.finish().await {
        Ok(response) => Ok(Forwarded::Upstream(response)),
        Err(error) => {
            tracing::debug!(cluster, "{error}");
            let text = match &error {
                UpstreamError::Timeout => "upstream request timeout".to_owned(),
                UpstreamError::Connect(_) => {
                    "upstream connect error or disconnect/reset before headers. reset reason: connection failure".to_owned()
                }
                other => other.to_string(),
            };
            let mut map = status_map(error.status(), true);
            map.replace("content-length", text.len().to_string());
            Ok(Forwarded::Direct(map, text.into_bytes()))
        }
    }
}

type UpstreamTask = tokio::task::JoinHandle<Result<Response<Incoming>, UpstreamError>>;

/// The upstream request, started once the head and the first body bytes have passed the chain.
#[derive(Default)]
struct Upstream {
    sender: Option<mpsc::Sender<Result<Frame<Bytes>, BoxError>>>,
    task: Option<UpstreamTask>,
    error: Option<UpstreamError>,
}

impl Upstream {
    #[allow(clippy::too_many_arguments)]
    fn start(
        &mut self,
        listener: &ListenerState,
        cluster: &str,
        headers: &SharedHeaders,
        timeout: Option<std::time::Duration>,
        known_length: Option<usize>,
        keep_length: bool,
        no_body: bool,
    ) {
        if self.task.is_some() || self.error.is_some() {
            return;
        }
        // Copied only when the length fields change: the plugins' view stays as they left it.
        let headers = headers.lock();
        let mut map = std::borrow::Cow::Borrowed(&*headers);
        match known_length {
            // The whole body is known: its real length, whatever the plugins did to it.
            Some(0) if no_body => {}
            Some(length) => map.to_mut().replace("content-length", length.to_string()),
            None if !keep_length => map.to_mut().remove("content-length"),
            None => {}
        }
        let body = if no_body || known_length == Some(0) {
            GatewayBody::empty()
        } else {
            let (sender, body) = GatewayBody::channel();
            self.sender = Some(sender);
            body
        };
        let request = match convert::request_from_map(&map, body) {
            Ok(request) => request,
            Err(error) => {
                self.error = Some(UpstreamError::BadRequest(error));
                return;
            }
        };
        let upstreams = listener.upstreams.current();
        let cluster = cluster.to_owned();
        self.task = Some(tokio::task::spawn_local(async move {
            upstreams.send(&cluster, request, timeout).await
        }));
    }

    async fn send(&mut self, frame: Frame<Bytes>) {
        if let Some(sender) = &self.sender
            && sender.send(Ok(frame)).await.is_err()
        {
            // The upstream stopped reading (failed or answered early); its result says why.
            self.sender = None;
        }
    }

    async fn finish(mut self) -> Result<Response<Incoming>, UpstreamError> {
        self.sender = None;
        if let Some(error) = self.error {
            return Err(error);
        }
        match self.task.take() {
            Some(task) => task
                .await
                .unwrap_or_else(|e| Err(UpstreamError::Other(e.to_string()))),
            None => Err(UpstreamError::Other(
                "the request never reached the upstream".into(),
            )),
        }
    }
}

fn status_map(status: u16, text_body: bool) -> HeaderMap {
    let mut map = HeaderMap::new();
    map.add(":status", status.to_string());
    if text_body {
        map.add("content-type", "text/plain");
    }
    map
}

/// The response path for an upstream response: headers through the chain, then the body streamed
/// through it. The head goes out once the first body bytes pass (or the body ends), so a body the
/// plugins rewrote as a whole gets its true content-length.
async fn respond(chain: &mut Chain, response: Response<Incoming>) -> Response<GatewayBody> {
    let (parts, mut body) = response.into_parts();
    let shared = SharedHeaders::new(convert::response_map(&parts));
    let eos = body.is_end_stream();
    if let Err(halt) = chain.headers(Direction::Response, &shared, eos, None).await {
        return response_halt(halt);
    }
    if eos {
        return convert::response_from_map(&shared.lock(), GatewayBody::empty());
    }
    let touches = chain.touches_body(Direction::Response);
    let mut pump = Pump {
        first: Vec::new(),
        trailers: None,
        finished: false,
    };
    if let Err(halt) = pump.step(chain, &mut body).await {
        return response_halt(halt);
    }
    // Not held across an await: the plugins' host calls would find the map locked.
    let mut map = shared.lock();
    if pump.finished && pump.trailers.is_none() {
        map.replace("content-length", pump.first.len().to_string());
        return convert::response_from_map(
            &map,
            GatewayBody::full(std::mem::take(&mut pump.first)),
        );
    }
    if touches {
        map.remove("content-length");
    }
    let (sender, out) = GatewayBody::channel();
    let first = std::mem::take(&mut pump.first);
    let trailers = pump.trailers.take();
    let finished = pump.finished;
    let moved = std::mem::replace(chain, Chain::empty());
    tokio::task::spawn_local(stream_rest(moved, body, sender, first, trailers, finished));
    convert::response_from_map(&map, out)
}

struct Pump {
    first: Vec<u8>,
    trailers: Option<HeaderMap>,
    finished: bool,
}

impl Pump {
    /// Pulls upstream frames through the chain until some bytes pass or the body ends.
    async fn step(&mut self, chain: &mut Chain, body: &mut Incoming) -> Flow<()> {
        loop {
            match body.frame().await {
                None => {
                    self.first = chain
                        .data(Direction::Response, Vec::new(), true, None)
                        .await?;
                    self.finished = true;
                    return Ok(());
                }
                Some(Err(error)) => {
                    tracing::debug!("reading the upstream body: {error}");
                    return Err(Halt::Status {
                        code: 503,
                        details: "upstream_reset_after_response_started",
                    });
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let eos = body.is_end_stream();
                        let out = chain
                            .data(Direction::Response, data.to_vec(), eos, None)
                            .await?;
                        if eos || !out.is_empty() {
                            self.first = out;
                            self.finished = eos;
                            return Ok(());
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            let mut map = convert::plain_map(&trailers);
                            self.first =
                                chain.trailers(Direction::Response, &mut map, None).await?;
                            self.trailers = Some(map);
                            self.finished = true;
                            return Ok(());
                        }
                    }
                },
            }
        }
    }
}

type Sender = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

async fn stream_rest(
    mut chain: Chain,
    mut body: Incoming,
    sender: Sender,
    first: Vec<u8>,
    trailers: Option<HeaderMap>,
    mut finished: bool,
) {
    let mut pending = (first, trailers);
    loop {
        let (data, trailers) = std::mem::take(&mut pending);
        if !data.is_empty()
            && sender
                .send(Ok(Frame::data(Bytes::from(data))))
                .await
                .is_err()
        {
            return; // The client went away; dropping the chain ends the stream in the plugins.
        }
        if let Some(map) = trailers {
            let mut out = http::HeaderMap::new();
            convert::fill_headers(&map, &mut out);
            let _ = sender.send(Ok(Frame::trailers(out))).await;
        }
        if finished {
            return;
        }
        let mut pump = Pump {
            first: Vec::new(),
            trailers: None,
            finished: false,
        };
        match pump.step(&mut chain, &mut body).await {
            Ok(()) => {
                pending = (pump.first, pump.trailers);
                finished = pump.finished;
            }
            Err(halt) => {
                // The head is already out: all that is left is to abort the body.
                let _ = sender
                    .send(Err(format!("stream aborted: {halt:?}").into()))
                    .await;
                return;
            }
        }
    }
}

/// A reply made by the gateway or a plugin during the request path. A plugin's local reply passes
/// the response callbacks of the plugins up to the one that sent it, as in Envoy.
async fn reply(chain: &mut Chain, halt: Halt) -> Response<GatewayBody> {
    match halt {
        Halt::Reply { response, from } => {
            let (map, body) = local_reply_parts(&response);
            run_through(chain, map, body, Some(from)).await
        }
        // Envoy's own 413 passes the response callbacks too.
        Halt::Status { code: 413, .. } => {
            let body = b"Payload Too Large".to_vec();
            let through = chain.len().checked_sub(1);
            run_through(chain, status_map(413, true), body, through).await
        }
        other => gateway_status(other),
    }
}

async fn finish_direct(mut chain: Chain, map: HeaderMap, body: Vec<u8>) -> Response<GatewayBody> {
    let through = chain.len().checked_sub(1);
    run_through(&mut chain, map, body, through).await
}

/// A whole response (headers and body known) through the response callbacks of `through` and the
/// plugins before it. A second local reply from there is sent as it is.
async fn run_through(
    chain: &mut Chain,
    mut map: HeaderMap,
    body: Vec<u8>,
    through: Option<usize>,
) -> Response<GatewayBody> {
    if through.is_none() {
        map.replace("content-length", body.len().to_string());
        return convert::response_from_map(&map, GatewayBody::full(body));
    }
    let eos = body.is_empty();
    let shared = SharedHeaders::new(map);
    if let Err(halt) = chain
        .headers(Direction::Response, &shared, eos, through)
        .await
    {
        return response_halt(halt);
    }
    let out = if eos {
        body
    } else {
        match chain.data(Direction::Response, body, true, through).await {
            Ok(out) => out,
            Err(halt) => return response_halt(halt),
        }
    };
    let mut map = shared.lock();
    map.replace("content-length", out.len().to_string());
    convert::response_from_map(&map, GatewayBody::full(out))
}

/// A halt on the response path: a plugin's reply replaces the response as it is.
fn response_halt(halt: Halt) -> Response<GatewayBody> {
    match halt {
        Halt::Reply { response, .. } => {
            let (mut map, body) = local_reply_parts(&response);
            map.replace("content-length", body.len().to_string());
            convert::response_from_map(&map, GatewayBody::full(body))
        }
        other => gateway_status(other),
    }
}

fn local_reply_parts(response: &LocalResponse) -> (HeaderMap, Vec<u8>) {
    let mut map = HeaderMap::new();
    map.add(":status", response.status_code.to_string());
    for (name, value) in response.headers.iter() {
        map.add(name, value);
    }
    if !response.body.is_empty() && map.get("content-type").is_none() {
        map.add("content-type", "text/plain");
    }
    (map, response.body.clone())
}

/// Istio's deny-all RBAC answer, given in place of FAIL_CLOSE plugins whose module is missing.
fn denied(missing: &[String]) -> Response<GatewayBody> {
    tracing::debug!(plugins = ?missing, "denying a request: a FAIL_CLOSE plugin's module is missing");
    let body = "RBAC: access denied";
    let mut map = status_map(403, true);
    map.replace("content-length", body.len().to_string());
    convert::response_from_map(&map, GatewayBody::full(body))
}

fn gateway_status(halt: Halt) -> Response<GatewayBody> {
    let (code, details) = match halt {
        Halt::Status { code, details } => (code, details),
        Halt::Reply { response, .. } => return response_halt(Halt::Reply { response, from: 0 }),
        Halt::Reset => return reset(),
    };
    let body = match code {
        413 => "Payload Too Large".to_owned(),
        400 => "Bad Request".to_owned(),
        503 if details == "wasm_fail_stream" => String::new(),
        _ => details.replace('_', " "),
    };
    let mut map = status_map(code, !body.is_empty());
    map.replace("content-length", body.len().to_string());
    convert::response_from_map(&map, GatewayBody::full(body))
}
