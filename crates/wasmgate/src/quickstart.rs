//! `wasmgate run` without `--config`: Istio's Bookinfo example in small. A built-in demo upstream
//! serves a product page, and the basic-auth plugin guards `/productpage` for GET and POST with the
//! credentials of Istio's example (`ok:test` and `admin3:admin3`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// The basic-auth configuration from Istio's wasm-extensions example.
pub const BASIC_AUTH_CONFIG: &str = r#"{
  "basic_auth_rules": [
    {"prefix": "/productpage", "request_methods": ["GET", "POST"], "credentials": ["ok:test", "YWRtaW4zOmFkbWluMw=="]}
  ]
}"#;

const PRODUCT_PAGE: &str = "<html><head><title>Simple Bookstore App</title></head>\n\
<body><h1>The Comedy of Errors</h1><p>Summary: Wikipedia Summary: The Comedy of Errors is one of \
William Shakespeare's early plays.</p></body></html>\n";

/// Finds the basic-auth module built by `scripts/build-plugins.sh`.
pub fn basic_auth_module() -> anyhow::Result<PathBuf> {
    let relative = "plugins/target/wasm32-wasip1/release/basic_auth.wasm";
    let mut candidates = Vec::new();
    if let Some(path) = std::env::var_os("WASMGATE_QUICKSTART_PLUGIN") {
        candidates.push(PathBuf::from(path));
    }
    candidates.push(PathBuf::from(relative));
    if let Ok(exe) = std::env::current_exe() {
        // target/{release,debug}/wasmgate -> the repository root.
        if let Some(root) = exe
            .parent()
            .and_then(|p| p.parent())
            .and_then(|p| p.parent())
        {
            candidates.push(root.join(relative));
        }
    }
    for candidate in &candidates {
        if candidate.is_file() {
            return Ok(std::fs::canonicalize(candidate).unwrap_or_else(|_| candidate.clone()));
        }
    }
    bail!(
        "the quickstart needs the basic-auth plugin, and none of these exist: {}. Build it with \
         scripts/build-plugins.sh (scripts/quickstart.sh does), or set WASMGATE_QUICKSTART_PLUGIN",
        candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Starts the demo upstream on its own thread; returns its address.
pub fn start_demo_upstream() -> anyhow::Result<SocketAddr> {
    let socket =
        std::net::TcpListener::bind("127.0.0.1:0").context("demo upstream: binding 127.0.0.1:0")?;
    socket.set_nonblocking(true)?;
    let address = socket.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("wasmgate-demo-upstream".into())
        .spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(socket) else {
                    return;
                };
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    tokio::spawn(async move {
                        let service = service_fn(
                            |request: hyper::Request<hyper::body::Incoming>| async move {
                                let (status, body) = match request.uri().path() {
                                    "/productpage" | "/" => (200, PRODUCT_PAGE.to_owned()),
                                    other => (404, format!("no page at {other}\n")),
                                };
                                let response = hyper::Response::builder()
                                    .status(status)
                                    .header("content-type", "text/html; charset=utf-8")
                                    .body(Full::new(Bytes::from(body)))
                                    .expect("a valid response");
                                Ok::<_, Infallible>(response)
                            },
                        );
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        })?;
    Ok(address)
}

/// The quickstart as a gateway configuration, in the same YAML a user would write.
pub fn config_yaml(
    listen: SocketAddr,
    admin: SocketAddr,
    upstream: SocketAddr,
    plugin: &std::path::Path,
) -> String {
    let configuration = serde_json::to_string(
        &serde_json::from_str::<serde_json::Value>(BASIC_AUTH_CONFIG).expect("valid JSON"),
    )
    .expect("serializable");
    format!(
        r#"workers: 1
admin: {admin}
listeners:
  - name: quickstart
    address: {listen}
    http_filters:
      - name: basic-auth
        root_id: ""
        configuration: '{configuration}'
        vm_config: {{ vm_id: basic-auth, code: {{ local: {{ filename: "{plugin}" }} }} }}
    routes:
      - match: {{ prefix: / }}
        cluster: productpage
clusters:
  - name: productpage
    endpoints: [{upstream}]
"#,
        plugin = plugin.display()
    )
}
