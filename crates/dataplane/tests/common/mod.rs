//! Helpers shared by the integration tests: test plugins, a recording upstream (plain or TLS),
//! and specs with defaults.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use wasmgate_dataplane::*;
use wasmgate_runtime::{PluginConfig, Runtime, RuntimeConfig, VmConfig};

pub fn plugin_bytes(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!(
        "../../plugins/target/wasm32-wasip1/release/{name}.wasm"
    ));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{} is missing ({e}); run scripts/build-plugins.sh",
            path.display()
        )
    })
}

pub fn runtime() -> Arc<Runtime> {
    let cache_dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/wasmgate-test-cache");
    Runtime::new(RuntimeConfig {
        cache_dir: Some(cache_dir),
        ..Default::default()
    })
    .unwrap()
}

/// What the upstream saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub trailers: Option<http::HeaderMap>,
    /// The HTTP version of the request.
    pub version: http::Version,
    /// The SNI of the connection, on a TLS upstream.
    pub sni: Option<String>,
}

pub struct Upstream {
    pub address: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

/// A real HTTP server on 127.0.0.1:0. `/auth` answers "allowed"; `/slow` waits 2 s; `/chunks`
/// streams three chunks; everything else echoes the request body with `x-upstream-secret` set.
pub async fn upstream() -> Upstream {
    serve_upstream(None).await
}

/// The same server over TLS (HTTP/1.1 or HTTP/2 by ALPN, as the acceptor's config offers).
pub async fn tls_upstream(acceptor: TlsAcceptor) -> Upstream {
    serve_upstream(Some(acceptor)).await
}

async fn serve_upstream(tls: Option<TlsAcceptor>) -> Upstream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let record = record.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => serve_recording(stream, record, None).await,
                    Some(acceptor) => {
                        let Ok(stream) = acceptor.accept(stream).await else {
                            return;
                        };
                        let sni = stream.get_ref().1.server_name().map(str::to_owned);
                        serve_recording(stream, record, sni).await
                    }
                }
            });
        }
    });
    Upstream { address, seen }
}

async fn serve_recording<I>(io: I, record: Arc<Mutex<Vec<Seen>>>, sni: Option<String>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request: Request<Incoming>| {
        let record = record.clone();
        let sni = sni.clone();
        async move {
            let (parts, body) = request.into_parts();
            let collected = body.collect().await.unwrap();
            let trailers = collected.trailers().cloned();
            let body = collected.to_bytes();
            let path = parts.uri.path().to_owned();
            record.lock().push(Seen {
                path: path.clone(),
                headers: parts.headers,
                body: body.clone(),
                trailers,
                version: parts.version,
                sni,
            });
            let response = match path.as_str() {
                "/auth" => Response::builder()
                    .status(200)
                    .body(boxed(Full::new(Bytes::from("allowed")))),
                "/slow" => {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    Response::builder()
                        .status(200)
                        .body(boxed(Full::new(Bytes::from("late"))))
                }
                "/chunks" => Response::builder()
                    .status(200)
                    .body(boxed(Chunks::new(&["one-", "two-", "three"]))),
                _ => Response::builder()
                    .status(200)
                    .header("x-upstream-secret", "s3cret")
                    .header("content-type", "text/plain")
                    .body(boxed(Full::new(body))),
            };
            Ok::<_, Infallible>(response.unwrap())
        }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), service)
        .await;
}

pub type TestBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

pub fn boxed<B>(body: B) -> TestBody
where
    B: http_body::Body<Data = Bytes, Error = Infallible> + Send + Sync + 'static,
{
    body.boxed()
}

/// A body of separate chunks, each its own frame.
pub struct Chunks(std::collections::VecDeque<Bytes>);

impl Chunks {
    pub fn new(chunks: &[&str]) -> Self {
        Self(chunks.iter().map(|c| Bytes::from(c.to_string())).collect())
    }
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|chunk| Ok(Frame::data(chunk))))
    }
}

pub fn filter(
    name: &str,
    runtime: &Runtime,
    wasm: &str,
    configuration: &str,
    policy: FailurePolicy,
) -> FilterSpec {
    FilterSpec {
        name: name.into(),
        module: runtime.load(&plugin_bytes(wasm)).unwrap(),
        vm: VmConfig {
            vm_id: name.into(),
            ..Default::default()
        },
        plugin: PluginConfig {
            name: name.into(),
            root_id: String::new(),
            configuration: configuration.as_bytes().to_vec(),
        },
        failure_policy: policy,
        reload_backoff: std::time::Duration::from_millis(50),
        reload_backoff_max: std::time::Duration::from_millis(500),
    }
}

pub fn kitchen(runtime: &Runtime) -> FilterSpec {
    filter(
        "kitchen",
        runtime,
        "test_kitchen_sink",
        "",
        FailurePolicy::FailClosed,
    )
}

pub fn route(prefix: &str, cluster: &str) -> RouteSpec {
    RouteSpec {
        name: format!("route{prefix}"),
        domains: vec![],
        path: PathMatch::Prefix(prefix.into()),
        action: RouteAction::Cluster(cluster.into()),
        timeout: None,
    }
}

/// A plain HTTP/1.1 cluster with one endpoint.
pub fn cluster(name: &str, address: SocketAddr) -> ClusterSpec {
    ClusterSpec {
        name: name.into(),
        endpoints: vec![address.to_string()],
        connect_timeout: Duration::from_secs(1),
        request_timeout: Some(Duration::from_millis(500)),
        http2: false,
        tls: None,
    }
}

/// A plain listener on 127.0.0.1:0.
pub fn listener(routes: Vec<RouteSpec>, filters: Vec<FilterSpec>, limits: Limits) -> ListenerSpec {
    ListenerSpec {
        name: "main".into(),
        address: "127.0.0.1:0".parse().unwrap(),
        routes,
        filters,
        missing_plugins: Vec::new(),
        limits,
        tls: None,
        network_filters: Vec::new(),
        tcp_proxy: None,
    }
}

/// A started gateway, shut down when dropped.
pub struct Gateway {
    pub handle: Option<GatewayHandle>,
    pub address: SocketAddr,
    pub runtime: Arc<Runtime>,
}

impl Gateway {
    /// Starts `spec`, whose listener `main` is the one tests talk to.
    pub fn start(runtime: Arc<Runtime>, spec: GatewaySpec) -> Self {
        let handle = start(runtime.clone(), spec, Arc::new(GatewayStats::default())).unwrap();
        let address = handle.address("main").unwrap();
        Gateway {
            handle: Some(handle),
            address,
            runtime,
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown();
        }
    }
}
