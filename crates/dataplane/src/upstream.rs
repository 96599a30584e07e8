//! Clusters on one worker: a keep-alive pool per cluster (hyper-util's client), endpoints taken
//! round robin, connect and request timeouts, plain HTTP or TLS (hyper-rustls).

use std::cell::Cell;
use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use wasmgate_abi::HttpCallRequest;
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

fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}
