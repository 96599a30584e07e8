//! Sends a fixed number of HTTP/1.1 keep-alive requests through an in-process gateway (one worker,
//! as `bench/run.sh` runs it) to a minimal upstream, with or without `plugins/test-bench`.
//!
//! Made for `valgrind --tool=callgrind` (see `bench/profile.sh`): the measured requests run inside
//! `measured`, so `--zero-before` / `--dump-after` on it count only them. Logging is set up as
//! `wasmgate run` sets it up (`info,wasm=trace`, a reloadable EnvFilter and the fmt layer).
//!
//!   PLUGIN=1|0 (default 1)  REQUESTS (default 2000)  WARMUP (default 200)  LOG=info|off

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, reload};
use wasmgate_dataplane::*;
use wasmgate_runtime::{PluginConfig, Runtime, RuntimeConfig, VmConfig};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// An upstream that answers every request on a connection as nginx's `return 200` does.
fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || serve_upstream(stream));
        }
    });
    address
}

fn serve_upstream(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Thu, 27 Nov 2026 12:00:00 GMT\r\nContent-Type: text/plain\r\nContent-Length: 17\r\nConnection: keep-alive\r\n\r\nhello from nginx\n";
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = find(&buffer, b"\r\n\r\n") {
            buffer.drain(..end + 4);
            if stream.write_all(RESPONSE).is_err() {
                return;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// One request as wrk sends it, and its whole response.
fn request(stream: &mut TcpStream, request: &[u8], buffer: &mut Vec<u8>) {
    stream.write_all(request).unwrap();
    buffer.clear();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(buffer, b"\r\n\r\n") {
            let head = std::str::from_utf8(&buffer[..end]).unwrap();
            assert!(
                head.starts_with("HTTP/1.1 200"),
                "unexpected answer: {head}"
            );
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .expect("a content-length");
            if buffer.len() >= end + 4 + length {
                return;
            }
        }
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "the gateway closed the connection");
        buffer.extend_from_slice(&chunk[..n]);
    }
}

#[inline(never)]
fn measured(stream: &mut TcpStream, bytes: &[u8], buffer: &mut Vec<u8>, count: usize) {
    for _ in 0..count {
        request(stream, bytes, buffer);
    }
    std::hint::black_box(buffer);
}

fn main() {
    let plugin = env("PLUGIN", 1) == 1;
    let requests = env("REQUESTS", 2000);
    let warmup = env("WARMUP", 200);
    if std::env::var("LOG").as_deref() != Ok("off") {
        let filter = EnvFilter::new("info,wasm=trace");
        let (layer, _handle) = reload::Layer::new(filter);
        tracing_subscriber::registry()
            .with(layer)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .init();
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let runtime = Runtime::new(RuntimeConfig {
        cache_dir: Some(root.join("target/wasmgate-bench-cache")),
        ..Default::default()
    })
    .unwrap();
    let mut filters = Vec::new();
    if plugin {
        let wasm = root.join("plugins/target/wasm32-wasip1/release/test_bench.wasm");
        let bytes = std::fs::read(&wasm)
            .unwrap_or_else(|e| panic!("{}: {e}; run scripts/build-plugins.sh", wasm.display()));
        filters.push(FilterSpec {
            name: "bench".into(),
            module: runtime.load(&bytes).unwrap(),
            vm: VmConfig {
                vm_id: "bench".into(),
                ..Default::default()
            },
            plugin: PluginConfig {
                name: "bench".into(),
                ..Default::default()
            },
            failure_policy: FailurePolicy::FailClosed,
            reload_backoff: std::time::Duration::from_secs(1),
            reload_backoff_max: std::time::Duration::from_secs(10),
        });
    }
    let upstream = upstream();
    let spec = GatewaySpec {
        workers: 1,
        listeners: vec![ListenerSpec {
            name: "main".into(),
            address: "127.0.0.1:0".parse().unwrap(),
            routes: vec![RouteSpec {
                name: "all".into(),
                domains: vec![],
                path: PathMatch::Prefix("/".into()),
                action: RouteAction::Cluster("upstream".into()),
                timeout: None,
            }],
            filters,
            network_filters: Vec::new(),
            tcp_proxy: None,
            missing_plugins: Vec::new(),
            limits: Limits::default(),
            tls: None,
        }],
        clusters: vec![ClusterSpec {
            name: "upstream".into(),
            endpoints: vec![upstream.to_string()],
            connect_timeout: Duration::from_secs(5),
            request_timeout: None,
            http2: false,
            tls: None,
        }],
    };
    let handle = start(runtime, spec, Arc::new(GatewayStats::default())).unwrap();
    let address = handle.address("main").unwrap();
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_nodelay(true).unwrap();
    let bytes = format!("GET / HTTP/1.1\r\nHost: {address}\r\n\r\n").into_bytes();
    let mut buffer = Vec::new();
    for _ in 0..warmup {
        request(&mut stream, &bytes, &mut buffer);
    }
    let started = Instant::now();
    measured(&mut stream, &bytes, &mut buffer, requests);
    let elapsed = started.elapsed();
    println!(
        "plugin={plugin} requests={requests} elapsed={elapsed:?} req/s={:.0}",
        requests as f64 / elapsed.as_secs_f64()
    );
    drop(stream);
    handle.shutdown();
}
