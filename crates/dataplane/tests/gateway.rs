//! The gateway in-process on port 0, with real sockets: a recording upstream, real plugins, and a
//! hyper client speaking HTTP/1.1 or HTTP/2.

mod common;

use std::convert::Infallible;

use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wasmgate_dataplane::*;
use wasmgate_runtime::Runtime;

/// A gateway with one listener on port 0 whose chain is `filters`, routing `/` to the upstream.
fn gateway(
    upstream: SocketAddr,
    runtime: Arc<Runtime>,
    filters: Vec<FilterSpec>,
    limits: Limits,
    extra_routes: Vec<RouteSpec>,
) -> Gateway {
    let mut routes = extra_routes;
    routes.push(route("/", "upstream"));
    let spec = GatewaySpec {
        workers: 2,
        listeners: vec![listener(routes, filters, limits)],
        clusters: vec![
            cluster("upstream", upstream),
            cluster("upstream_cluster", upstream),
        ],
    };
    Gateway::start(runtime, spec)
}

fn client(http2: bool) -> Client<HttpConnector, Full<Bytes>> {
    let mut builder = Client::builder(TokioExecutor::new());
    if http2 {
        builder.http2_only(true);
    }
    builder.build_http()
}

async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> (http::response::Parts, Bytes) {
    let response = client.request(request).await.expect("the gateway answers");
    let (parts, body) = response.into_parts();
    (parts, body.collect().await.unwrap().to_bytes())
}

fn get(address: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().uri(format!("http://{address}{path}"));
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder.body(Full::new(Bytes::new())).unwrap()
}

fn post(
    address: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Request<Full<Bytes>> {
    let mut request = get(address, path, headers);
    *request.method_mut() = http::Method::POST;
    *request.body_mut() = Full::new(Bytes::from(body.to_owned()));
    request
}

/// A recording upstream and a gateway with the kitchen-sink plugin in front of it.
async fn kitchen_gateway(limits: Limits) -> (Upstream, Gateway) {
    let up = upstream().await;
    let runtime = runtime();
    let gw = gateway(
        up.address,
        runtime.clone(),
        vec![kitchen(&runtime)],
        limits,
        vec![],
    );
    (up, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_pass_the_plugin_both_ways_over_http1_and_http2() {
    let (up, gw) = kitchen_gateway(Limits::default()).await;
    for http2 in [false, true] {
        let (parts, body) = send(
            &client(http2),
            get(gw.address, "/hello?x=1", &[("x-remove-me", "1")]),
        )
        .await;
        assert_eq!(parts.status, 200);
        assert_eq!(parts.headers["x-kitchen-response"], "1");
        assert_eq!(parts.headers["x-kitchen-status"], "200");
        assert!(
            parts.headers.get("x-upstream-secret").is_none(),
            "removed by the plugin"
        );
        assert!(body.is_empty());
        let seen = up.seen.lock().last().cloned().unwrap();
        assert_eq!(seen.path, "/hello");
        assert_eq!(seen.headers["x-kitchen-seen"], "1");
        assert_eq!(seen.headers["x-kitchen-path"], "/hello?x=1");
        assert_eq!(seen.headers["x-kitchen-eos"], "true");
        assert_eq!(seen.headers["x-forwarded-proto"], "http");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_plugins_requests_pass_straight_through() {
    let up = upstream().await;
    let gw = gateway(up.address, runtime(), vec![], Limits::default(), vec![]);
    for http2 in [false, true] {
        let (parts, body) = tokio::time::timeout(
            Duration::from_secs(10),
            send(&client(http2), post(gw.address, "/plain", &[], "body")),
        )
        .await
        .expect("an empty chain answers");
        assert_eq!(parts.status, 200);
        assert_eq!(parts.headers["x-upstream-secret"], "s3cret");
        assert_eq!(body, "body");
    }
    assert_eq!(up.seen.lock().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_reply_short_circuits() {
    let (up, gw) = kitchen_gateway(Limits::default()).await;
    let (parts, body) = send(
        &client(false),
        get(gw.address, "/", &[("x-mode", "local-reply")]),
    )
    .await;
    assert_eq!(parts.status, 403);
    assert_eq!(parts.headers["x-reason"], "denied");
    assert_eq!(parts.headers["content-length"], "17");
    assert_eq!(body, "denied by kitchen");
    assert_eq!(
        parts.headers["x-kitchen-response"], "1",
        "the reply passed the plugin's response callbacks"
    );
    assert!(
        up.seen.lock().is_empty(),
        "the upstream never saw the request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_call_pauses_the_request_until_the_answer() {
    let (up, gw) = kitchen_gateway(Limits::default()).await;
    let (parts, _) = send(
        &client(false),
        get(gw.address, "/resource", &[("x-mode", "http-call")]),
    )
    .await;
    assert_eq!(parts.status, 200);
    let seen = up.seen.lock().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].path, "/auth", "the call went first");
    assert_eq!(seen[0].headers["host"], "auth.local");
    assert_eq!(seen[1].path, "/resource");
    assert_eq!(seen[1].headers["x-kitchen-call-status"], "200");
    assert_eq!(seen[1].headers["x-kitchen-call-body"], "allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_body_buffered_and_rewritten_with_a_true_length() {
    let (up, gw) = kitchen_gateway(Limits::default()).await;
    let (parts, body) = send(
        &client(false),
        post(
            gw.address,
            "/upload",
            &[("x-mode", "buffer-body")],
            "hello wasm",
        ),
    )
    .await;
    assert_eq!(parts.status, 200);
    assert_eq!(body, "HELLO WASM", "the upstream echoed the rewritten body");
    let seen = up.seen.lock().last().cloned().unwrap();
    assert_eq!(seen.body, "HELLO WASM");
    assert_eq!(seen.headers["content-length"], "10");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_body_buffered_and_rewritten() {
    let (_up, gw) = kitchen_gateway(Limits::default()).await;
    for http2 in [false, true] {
        let (parts, body) = send(
            &client(http2),
            get(gw.address, "/chunks", &[("x-mode", "response-body")]),
        )
        .await;
        assert_eq!(parts.status, 200);
        assert_eq!(body, "one-two-three [kitchen]");
        assert_eq!(parts.headers["content-length"], "23");
    }
    // Without the mode the chunks stream through.
    let (_, body) = send(&client(false), get(gw.address, "/chunks", &[])).await;
    assert_eq!(body, "one-two-three");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_runs_requests_in_order_and_responses_in_reverse() {
    let up = upstream().await;
    let runtime = runtime();
    let first = filter(
        "first",
        &runtime,
        "add_header",
        r#"{"name":"x-order","value":"first","side":"both"}"#,
        FailurePolicy::FailClosed,
    );
    let second = filter(
        "second",
        &runtime,
        "add_header",
        r#"{"name":"x-order","value":"second","side":"both"}"#,
        FailurePolicy::FailClosed,
    );
    let gw = gateway(
        up.address,
        runtime.clone(),
        vec![first, second],
        Limits::default(),
        vec![],
    );
    let (parts, _) = send(&client(false), get(gw.address, "/", &[])).await;
    let response: Vec<_> = parts
        .headers
        .get_all("x-order")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(response, vec!["second", "first"]);
    let seen = up.seen.lock().last().cloned().unwrap();
    let request: Vec<_> = seen
        .headers
        .get_all("x-order")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(request, vec!["first", "second"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_trailers_reach_the_plugin_and_the_upstream_as_the_plugin_left_them() {
    let up = upstream().await;
    let runtime = runtime();
    let mut spec = GatewaySpec {
        workers: 1,
        listeners: vec![listener(
            vec![route("/", "upstream")],
            vec![kitchen(&runtime)],
            Limits::default(),
        )],
        clusters: vec![cluster("upstream", up.address)],
    };
    // HTTP/2 to the upstream, so that trailers travel without a declared `trailer` header.
    spec.clusters[0].http2 = true;
    let gw = Gateway::start(runtime, spec);
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<GrpcBody>();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-client-trailer", "yes".parse().unwrap());
    let request = Request::post(format!("http://{}/trailers", gw.address))
        .body(GrpcBody::Once(Some(Bytes::from("payload")), Some(trailers)))
        .unwrap();
    let response = client.request(request).await.expect("the gateway answers");
    assert_eq!(response.status(), 200);
    let seen = up.seen.lock().last().cloned().unwrap();
    assert_eq!(seen.body, "payload");
    let trailers = seen.trailers.expect("the upstream got trailers");
    assert_eq!(trailers["x-client-trailer"], "yes");
    // The kitchen sink adds one in on_http_request_trailers.
    assert_eq!(trailers["x-kitchen-trailer"], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_direct_responses_and_missing_routes() {
    let up = upstream().await;
    let runtime = runtime();
    let direct = RouteSpec {
        name: "direct".into(),
        domains: vec![],
        path: PathMatch::Exact("/healthz".into()),
        action: RouteAction::DirectResponse {
            status: 200,
            body: "ok".into(),
        },
        timeout: None,
    };
    let other_host = RouteSpec {
        domains: vec!["only.example".into()],
        ..route("/private", "upstream")
    };
    let spec = GatewaySpec {
        workers: 1,
        listeners: vec![listener(
            vec![direct, other_host, route("/api", "upstream")],
            vec![kitchen(&runtime)],
            Limits::default(),
        )],
        clusters: vec![
            cluster("upstream", up.address),
            cluster("upstream_cluster", up.address),
        ],
    };
    let handle = start(runtime.clone(), spec, Arc::new(GatewayStats::default())).unwrap();
    let address = handle.address("main").unwrap();
    let c = client(false);
    let (parts, body) = send(&c, get(address, "/healthz", &[])).await;
    assert_eq!((parts.status.as_u16(), body.as_ref()), (200, &b"ok"[..]));
    assert_eq!(
        parts.headers["x-kitchen-response"], "1",
        "direct responses pass the plugins"
    );
    let (parts, _) = send(&c, get(address, "/nowhere", &[])).await;
    assert_eq!(parts.status, 404);
    let (parts, _) = send(&c, get(address, "/private", &[])).await;
    assert_eq!(parts.status, 404, "the host does not match");
    let mut request = get(address, "/private", &[]);
    request
        .headers_mut()
        .insert("host", "only.example".parse().unwrap());
    let (parts, _) = send(&c, request).await;
    assert_eq!(parts.status, 200);
    assert!(up.seen.lock().iter().all(|s| s.path != "/nowhere"));
    handle.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_refused_is_503_and_timeout_is_504() {
    let up = upstream().await;
    let runtime = runtime();
    // A port nothing listens on: bind, note it, close.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let spec = GatewaySpec {
        workers: 1,
        listeners: vec![listener(
            vec![route("/refused", "nowhere"), route("/", "upstream")],
            vec![],
            Limits::default(),
        )],
        clusters: vec![cluster("upstream", up.address), cluster("nowhere", closed)],
    };
    let handle = start(runtime, spec, Arc::new(GatewayStats::default())).unwrap();
    let address = handle.address("main").unwrap();
    let (parts, body) = send(&client(false), get(address, "/refused", &[])).await;
    assert_eq!(parts.status, 503);
    assert!(
        String::from_utf8_lossy(&body).contains("upstream connect error"),
        "{body:?}"
    );
    let (parts, body) = send(&client(false), get(address, "/slow", &[])).await;
    assert_eq!(parts.status, 504);
    assert_eq!(body, "upstream request timeout");
    let stats = handle.stats.responses_by_class();
    assert_eq!(stats[4], 2, "two 5xx counted");
    handle.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_the_buffer_limit_is_413() {
    let up = upstream().await;
    let runtime = runtime();
    let limits = Limits {
        per_stream_buffer_limit: 64,
        ..Limits::default()
    };
    let gw = gateway(
        up.address,
        runtime.clone(),
        vec![kitchen(&runtime)],
        limits,
        vec![],
    );
    // Ten chunks of 100 bytes: the plugin pauses on each, so the gateway holds them all.
    let mut chunked = b"POST /upload HTTP/1.1\r\nhost: a\r\nx-mode: buffer-body\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..10 {
        chunked.extend_from_slice(format!("64\r\n{}\r\n", "x".repeat(100)).as_bytes());
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let answer = raw(gw.address, chunked).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(up.seen.lock().is_empty());
    let body = "x".repeat(1000);
    // A body nobody buffers streams through whatever its size.
    let (parts, echoed) = send(&client(false), post(gw.address, "/upload", &[], &body)).await;
    assert_eq!(parts.status, 200);
    assert_eq!(echoed.len(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_plugin_fails_closed_or_open() {
    let up = upstream().await;
    let runtime = runtime();
    // One worker each, so the VM that trapped is the one every later request meets.
    let single_worker = |filter: FilterSpec| {
        let spec = GatewaySpec {
            workers: 1,
            listeners: vec![listener(
                vec![route("/", "upstream")],
                vec![filter],
                Limits::default(),
            )],
            clusters: vec![
                cluster("upstream", up.address),
                cluster("upstream_cluster", up.address),
            ],
        };
        Gateway::start(runtime.clone(), spec)
    };
    let closed = single_worker(kitchen(&runtime));
    let mut open_filter = kitchen(&runtime);
    open_filter.failure_policy = FailurePolicy::FailOpen;
    let open = single_worker(open_filter);
    let (parts, _) = send(
        &client(false),
        get(closed.address, "/", &[("x-mode", "panic")]),
    )
    .await;
    assert_eq!(parts.status, 503, "the trap fails the request closed");
    let (parts, _) = send(
        &client(false),
        get(open.address, "/", &[("x-mode", "panic")]),
    )
    .await;
    assert_eq!(parts.status, 200, "FAIL_OPEN skips the failed plugin");
    let (parts, _) = send(&client(false), get(closed.address, "/", &[])).await;
    assert_eq!(parts.status, 503, "the failed VM stays failed");
    let (parts, _) = send(&client(false), get(open.address, "/", &[])).await;
    assert_eq!(parts.status, 200);
    drop((closed, open));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_and_oversized_headers() {
    let up = upstream().await;
    let runtime = runtime();
    let limits = Limits {
        max_request_headers_bytes: 8192,
        ..Limits::default()
    };
    let gw = gateway(up.address, runtime, vec![], limits, vec![]);
    let answer = raw(gw.address, b"GARBAGE\r\n\r\n".to_vec()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let mut big = b"GET / HTTP/1.1\r\nhost: a\r\nx-big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 20_000));
    big.extend_from_slice(b"\r\n\r\n");
    let answer = raw(gw.address, big).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
}

/// Sends raw bytes and reads the answer until the gateway closes the connection.
async fn raw(address: SocketAddr, bytes: Vec<u8>) -> String {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(&bytes).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connections_are_reused() {
    let (up, gw) = kitchen_gateway(Limits::default()).await;
    let mut stream = tokio::net::TcpStream::connect(gw.address).await.unwrap();
    for _ in 0..3 {
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: example\r\n\r\n")
            .await
            .unwrap();
        let mut buffer = vec![0u8; 4096];
        let n = stream.read(&mut buffer).await.unwrap();
        let text = String::from_utf8_lossy(&buffer[..n]);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    }
    assert_eq!(
        up.seen.lock().len(),
        3,
        "three requests on one client connection"
    );
    let _ = &gw.runtime;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_cut_off_by_the_header_read_timeout() {
    let up = upstream().await;
    let runtime = runtime();
    let limits = Limits {
        header_read_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let gw = gateway(up.address, runtime, vec![], limits, vec![]);
    let mut slow = tokio::net::TcpStream::connect(gw.address).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the gateway closed the connection");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed near the 300 ms timeout"
    );
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    assert!(up.seen.lock().is_empty());
    // The listener goes on serving others.
    let (parts, _) = send(&client(false), get(gw.address, "/", &[])).await;
    assert_eq!(parts.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_but_busy_ones_are_not() {
    let up = upstream().await;
    let runtime = runtime();
    let limits = Limits {
        idle_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let mut slow_cluster = cluster("upstream", up.address);
    slow_cluster.request_timeout = Some(Duration::from_secs(5));
    let spec = GatewaySpec {
        workers: 1,
        listeners: vec![listener(vec![route("/", "upstream")], vec![], limits)],
        clusters: vec![slow_cluster],
    };
    let gw = Gateway::start(runtime, spec);
    // A request that waits on the upstream longer than the idle timeout still completes.
    let mut stream = tokio::net::TcpStream::connect(gw.address).await.unwrap();
    stream
        .write_all(b"GET /slow HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = vec![0u8; 4096];
    let n = stream.read(&mut buffer).await.unwrap();
    let text = String::from_utf8_lossy(&buffer[..n]).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    // Then, with nothing in flight, the connection is closed after the idle timeout.
    let started = std::time::Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "the idle connection was closed: {closed:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// A gRPC server over h2c: `kitchen.Echo/Say` answers `pong:<message>|<x-grpc-meta>`; any other
/// method is a trailers-only UNIMPLEMENTED.
async fn grpc_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = service_fn(|request: Request<Incoming>| async move {
                    let path = request.uri().path().to_owned();
                    if path == "/kitchen.Echo/Chat" {
                        return Ok(chat(request));
                    }
                    let meta = request
                        .headers()
                        .get("x-grpc-meta")
                        .map(|v| v.to_str().unwrap().to_owned())
                        .unwrap_or_default();
                    let body = request.into_body().collect().await.unwrap().to_bytes();
                    let response = Response::builder()
                        .status(200)
                        .header("content-type", "application/grpc");
                    if path != "/kitchen.Echo/Say" {
                        let response = response
                            .header("grpc-status", "12")
                            .header("grpc-message", "no such method");
                        return Ok::<_, Infallible>(
                            response.body(GrpcBody::Once(None, None)).unwrap(),
                        );
                    }
                    let reply = [b"pong:".as_slice(), &body[5..], b"|", meta.as_bytes()].concat();
                    let mut framed = vec![0u8];
                    framed.extend_from_slice(&(reply.len() as u32).to_be_bytes());
                    framed.extend_from_slice(&reply);
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", "0".parse().unwrap());
                    Ok(response
                        .body(GrpcBody::Once(Some(Bytes::from(framed)), Some(trailers)))
                        .unwrap())
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    address
}

/// A body as gRPC sends it: one data frame then trailers, or frames from a channel.
enum GrpcBody {
    Once(Option<Bytes>, Option<http::HeaderMap>),
    Channel(tokio::sync::mpsc::Receiver<Frame<Bytes>>),
}

impl http_body::Body for GrpcBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut *self {
            GrpcBody::Once(data, trailers) => std::task::Poll::Ready(match data.take() {
                Some(data) => Some(Ok(Frame::data(data))),
                None => trailers.take().map(|t| Ok(Frame::trailers(t))),
            }),
            GrpcBody::Channel(rx) => rx.poll_recv(cx).map(|frame| frame.map(Ok)),
        }
    }
}

fn grpc_framed(message: &[u8]) -> Bytes {
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    Bytes::from(framed)
}

/// `kitchen.Echo/Chat`: answers each message with `reply:<message>`, and ends with trailers once
/// the client half-closes.
fn chat(request: Request<Incoming>) -> Response<GrpcBody> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let mut body = request.into_body();
        let mut buffer = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                buffer.extend_from_slice(&data);
                while buffer.len() >= 5 {
                    let length = u32::from_be_bytes(buffer[1..5].try_into().unwrap()) as usize;
                    if buffer.len() < 5 + length {
                        break;
                    }
                    let message: Vec<u8> = buffer.drain(..5 + length).skip(5).collect();
                    let reply = [b"reply:".as_slice(), &message].concat();
                    let _ = tx.send(Frame::data(grpc_framed(&reply))).await;
                }
            }
        }
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        trailers.insert("x-stream-trailer", "t".parse().unwrap());
        let _ = tx.send(Frame::trailers(trailers)).await;
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .header("x-stream-meta", "m")
        .body(GrpcBody::Channel(rx))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_from_plugins_reach_http2_clusters() {
    let up = upstream().await;
    let grpc = grpc_server().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let runtime = runtime();
    let mut answers = Vec::new();
    for target in [grpc, closed] {
        let mut grpc_cluster = cluster("upstream_cluster", target);
        grpc_cluster.http2 = true;
        let spec = GatewaySpec {
            workers: 1,
            listeners: vec![listener(
                vec![route("/", "upstream")],
                vec![kitchen(&runtime)],
                Limits::default(),
            )],
            clusters: vec![cluster("upstream", up.address), grpc_cluster],
        };
        let gw = Gateway::start(runtime.clone(), spec);
        let (parts, _) = send(
            &client(false),
            get(gw.address, "/", &[("x-mode", "grpc-call")]),
        )
        .await;
        assert_eq!(parts.status, 200);
        let seen = up.seen.lock().last().cloned().unwrap();
        answers.push((
            seen.headers["x-kitchen-grpc-status"]
                .to_str()
                .unwrap()
                .to_owned(),
            seen.headers["x-kitchen-grpc-message"]
                .to_str()
                .unwrap()
                .to_owned(),
        ));
    }
    assert_eq!(
        answers[0],
        ("0".to_owned(), "pong:grpc ping|1".to_owned()),
        "the call and its metadata arrived"
    );
    assert_eq!(answers[1].0, "14", "an unreachable cluster is UNAVAILABLE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_streams_from_plugins_send_receive_and_close() {
    let up = upstream().await;
    let grpc = grpc_server().await;
    let runtime = runtime();
    let mut grpc_cluster = cluster("upstream_cluster", grpc);
    grpc_cluster.http2 = true;
    let spec = GatewaySpec {
        workers: 1,
        listeners: vec![listener(
            vec![route("/", "upstream")],
            vec![kitchen(&runtime)],
            Limits::default(),
        )],
        clusters: vec![cluster("upstream", up.address), grpc_cluster],
    };
    let gw = Gateway::start(runtime, spec);
    // The plugin opens the stream and sends "first"; on the reply it sends "second" and
    // half-closes; the server then ends with trailers, and the close resumes the request.
    let (parts, _) = send(
        &client(false),
        get(gw.address, "/", &[("x-mode", "grpc-stream")]),
    )
    .await;
    assert_eq!(parts.status, 200);
    let seen = up.seen.lock().last().cloned().unwrap();
    let header = |name: &str| seen.headers[name].to_str().unwrap().to_owned();
    assert_eq!(header("x-kitchen-grpc-stream-meta"), "m");
    assert_eq!(header("x-kitchen-grpc-stream-message"), "reply:second");
    assert_eq!(header("x-kitchen-grpc-stream-trailer"), "t");
    assert_eq!(header("x-kitchen-grpc-stream-close"), "0:");
}
