//! TCP proxy listeners with network (TCP) plugins, against real TCP echo servers on 127.0.0.1.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rcgen::{CertificateParams, KeyPair};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use wasmgate_dataplane::*;
use wasmgate_runtime::Runtime;

// === helpers ===

/// Echoes every connection's bytes back, and half-closes once the client has.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(echo(stream));
        }
    });
    address
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(stream: S) {
    let (mut read, mut write) = tokio::io::split(stream);
    let _ = tokio::io::copy(&mut read, &mut write).await;
    let _ = write.shutdown().await;
}

/// A port nothing listens on.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

fn tcp_cluster(name: &str, address: SocketAddr) -> ClusterSpec {
    cluster(name, address)
}

fn tcp_listener(cluster: &str, filters: Vec<FilterSpec>, limits: Limits) -> ListenerSpec {
    ListenerSpec {
        network_filters: filters,
        tcp_proxy: Some(TcpProxySpec {
            cluster: cluster.into(),
            sni_routes: vec![],
        }),
        ..listener(vec![], vec![], limits)
    }
}

fn start_tcp(
    runtime: Arc<Runtime>,
    filters: Vec<FilterSpec>,
    clusters: Vec<ClusterSpec>,
    limits: Limits,
) -> Gateway {
    Gateway::start(
        runtime,
        GatewaySpec {
            workers: 1,
            listeners: vec![tcp_listener("backend", filters, limits)],
            clusters,
        },
    )
}

fn counter(runtime: &Runtime) -> FilterSpec {
    filter(
        "counter",
        runtime,
        "test_tcp_counter",
        "",
        FailurePolicy::FailClosed,
    )
}

fn greeting(runtime: &Runtime, configuration: &str) -> FilterSpec {
    filter(
        "greeting",
        runtime,
        "test_tcp_greeting",
        configuration,
        FailurePolicy::FailClosed,
    )
}

fn banned(runtime: &Runtime, policy: FailurePolicy) -> FilterSpec {
    filter("banned", runtime, "test_tcp_banned", "", policy)
}

fn metric(runtime: &Runtime, name: &str) -> i64 {
    runtime
        .shared()
        .metrics
        .find(name)
        .map_or(0, |metric| metric.value)
}

fn shared(runtime: &Runtime, vm_id: &str, key: &str) -> Option<String> {
    runtime
        .shared()
        .data
        .get(vm_id, key.as_bytes())
        .map(|(value, _)| String::from_utf8(value).unwrap())
}

/// Waits (up to 10 s) until `ready` holds.
async fn until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sends `data`, half-closes, and reads until the gateway closes (10 s at most).
async fn exchange(address: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(data).await.unwrap();
    stream.shutdown().await.unwrap();
    read_to_end(&mut stream).await
}

/// Everything until end of stream (a reset counts as the end).
async fn read_to_end<R: AsyncRead + Unpin>(stream: &mut R) -> Vec<u8> {
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the gateway never closed the connection");
    out
}

// === tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_pass_both_ways_through_the_chain() {
    let echo = echo_server().await;
    let runtime = runtime();
    let gw = start_tcp(
        runtime.clone(),
        vec![counter(&runtime), greeting(&runtime, "")],
        vec![tcp_cluster("backend", echo)],
        Limits::default(),
    );
    // Downstream "hello" becomes "howdy"; the echo comes back through the chain in reverse.
    let out = exchange(gw.address, b"hello world, HELLO").await;
    assert_eq!(out, b"howdy world, HOWDY");
    until("the connection's end in the plugin", || {
        metric(&runtime, "tcp_counter_done") == 1
    })
    .await;
    assert_eq!(metric(&runtime, "tcp_counter_connections"), 1);
    assert_eq!(metric(&runtime, "tcp_counter_downstream_bytes"), 18);
    assert_eq!(metric(&runtime, "tcp_counter_upstream_bytes"), 18);
    assert_eq!(metric(&runtime, "tcp_counter_upstream_close_remote"), 1);
    assert_eq!(
        metric(&runtime, "tcp_counter_downstream_close_remote")
            + metric(&runtime, "tcp_counter_downstream_close_local"),
        1
    );
    // The connection's properties, as the plugin read them.
    let line = shared(&runtime, "counter", "tcp_counter_connection").unwrap();
    assert!(line.starts_with("id="), "{line}");
    assert!(line.contains("source=127.0.0.1:"), "{line}");
    assert!(
        line.contains(&format!("destination={}", gw.address)),
        "{line}"
    );
    assert!(line.contains("mtls=false sni=-"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_works_both_ways() {
    // The upstream speaks first, half-closes, then reads what the client sends until its end.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        stream.write_all(b"banner").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut seen = Vec::new();
        stream.read_to_end(&mut seen).await.unwrap();
        let _ = seen_tx.send(seen);
    });
    let runtime = runtime();
    let gw = start_tcp(
        runtime.clone(),
        vec![counter(&runtime)],
        vec![tcp_cluster("backend", upstream)],
        Limits::default(),
    );
    let mut client = TcpStream::connect(gw.address).await.unwrap();
    let (mut read, mut write) = client.split();
    // The upstream's half-close reaches the client while the client's side stays open...
    let mut banner = Vec::new();
    read.read_to_end(&mut banner).await.unwrap();
    assert_eq!(banner, b"banner");
    until("the upstream close callback", || {
        metric(&runtime, "tcp_counter_upstream_close_remote") == 1
    })
    .await;
    // ...and the client can still send, then half-close its own side.
    write.write_all(b"late words").await.unwrap();
    write.shutdown().await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), seen_rx)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen, b"late words");
    until("the connection's end", || {
        metric(&runtime, "tcp_counter_done") == 1
    })
    .await;
    assert_eq!(metric(&runtime, "tcp_counter_downstream_bytes"), 10);
    assert_eq!(metric(&runtime, "tcp_counter_upstream_bytes"), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_transfer_arrives_byte_for_byte() {
    let echo = echo_server().await;
    let runtime = runtime();
    let gw = start_tcp(
        runtime.clone(),
        vec![counter(&runtime), greeting(&runtime, "")],
        vec![tcp_cluster("backend", echo)],
        Limits::default(),
    );
    let size = 8 << 20;
    let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    let stream = TcpStream::connect(gw.address).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        write.write_all(&sent).await.unwrap();
        write.shutdown().await.unwrap();
    });
    let out = read_to_end(&mut read).await;
    writer.await.unwrap();
    assert_eq!(out.len(), data.len());
    assert!(out == data, "the echoed bytes differ");
    until("the connection's end", || {
        metric(&runtime, "tcp_counter_done") == 1
    })
    .await;
    assert_eq!(
        metric(&runtime, "tcp_counter_downstream_bytes"),
        size as i64
    );
    assert_eq!(metric(&runtime, "tcp_counter_upstream_bytes"), size as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upstream_closes_the_connection() {
    let nowhere = closed_port().await;
    let runtime = runtime();
    let gw = start_tcp(
        runtime.clone(),
        vec![counter(&runtime)],
        vec![tcp_cluster("backend", nowhere)],
        Limits::default(),
    );
    let mut client = TcpStream::connect(gw.address).await.unwrap();
    let _ = client.write_all(b"anyone?").await;
    assert_eq!(read_to_end(&mut client).await, b"");
    until("the connection's end", || {
        metric(&runtime, "tcp_counter_done") == 1
    })
    .await;
    assert_eq!(metric(&runtime, "tcp_counter_upstream_close_remote"), 1);
    assert_eq!(metric(&runtime, "tcp_counter_downstream_close_local"), 1);
    assert_eq!(metric(&runtime, "tcp_counter_downstream_bytes"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_ends_only_its_connection() {
    let echo = echo_server().await;
    let runtime = runtime();
    let gw = start_tcp(
        runtime.clone(),
        vec![counter(&runtime)],
        vec![tcp_cluster("backend", echo)],
        Limits::default(),
    );
    {
        // Sends a good deal, reads nothing, and goes away.
        let mut client = TcpStream::connect(gw.address).await.unwrap();
        client.write_all(&vec![b'x'; 1 << 20]).await.unwrap();
        until("bytes through the plugin", || {
            metric(&runtime, "tcp_counter_downstream_bytes") > 0
        })
        .await;
    }
    until("the abandoned connection's end", || {
        metric(&runtime, "tcp_counter_done") == 1
    })
    .await;
    assert_eq!(exchange(gw.address, b"still here").await, b"still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_plugin_closes_its_connection_and_the_listener_keeps_serving() {
    let echo = echo_server().await;
    let runtime = runtime();
    let gw = start_tcp(
        runtime.clone(),
        vec![
            counter(&runtime),
            banned(&runtime, FailurePolicy::FailReload),
        ],
        vec![tcp_cluster("backend", echo)],
        Limits::default(),
    );
    assert_eq!(exchange(gw.address, b"kaboom").await, b"");
    // FAIL_RELOAD: the next connection gets a fresh VM.
    assert_eq!(exchange(gw.address, b"fine").await, b"fine");
    until("both connections' ends", || {
        metric(&runtime, "tcp_counter_done") == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_refuses_later_connections_and_fail_open_skips_the_plugin() {
    let echo = echo_server().await;
    let runtime = runtime();
    let closed = start_tcp(
        runtime.clone(),
        vec![banned(&runtime, FailurePolicy::FailClosed)],
        vec![tcp_cluster("backend", echo)],
        Limits::default(),
    );
    assert_eq!(exchange(closed.address, b"boom").await, b"");
    // The VM is gone: as Envoy, every later connection is closed.
    assert_eq!(exchange(closed.address, b"fine").await, b"");

    let open = start_tcp(
        runtime.clone(),
        vec![banned(&runtime, FailurePolicy::FailOpen)],
        vec![tcp_cluster("backend", echo)],
        Limits::default(),
    );
    assert_eq!(exchange(open.address, b"boom").await, b"boom");
    assert_eq!(exchange(open.address, b"fine").await, b"fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_banned_word_closes_the_connection_from_either_side() {
    let echo = echo_server().await;
    let runtime = runtime();
    let gw = start_tcp(
        runtime.clone(),
        vec![
            counter(&runtime),
            banned(&runtime, FailurePolicy::FailClosed),
        ],
        vec![tcp_cluster("backend", echo)],
        Limits::default(),
    );
    // Downstream: what passed before the word comes back, then the connection closes.
    let mut client = TcpStream::connect(gw.address).await.unwrap();
    client.write_all(b"ok\n").await.unwrap();
    let mut line = [0u8; 3];
    client.read_exact(&mut line).await.unwrap();
    assert_eq!(&line, b"ok\n");
    client.write_all(b"something forbidden").await.unwrap();
    assert_eq!(read_to_end(&mut client).await, b"");
    // Upstream (`proxy_close_stream(UPSTREAM)`): the echo of "leak" never reaches the client.
    let mut client = TcpStream::connect(gw.address).await.unwrap();
    client.write_all(b"a leak").await.unwrap();
    assert_eq!(read_to_end(&mut client).await, b"");
    until("both connections' ends", || {
        metric(&runtime, "tcp_counter_done") == 2
    })
    .await;
    assert_eq!(metric(&runtime, "tcp_counter_downstream_close_local"), 2);
    // The listener still serves.
    assert_eq!(exchange(gw.address, b"fine").await, b"fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_data_accumulates_until_the_plugin_lets_it_go() {
    let echo = echo_server().await;
    let runtime = runtime();
    let gw = start_tcp(
        runtime.clone(),
        vec![greeting(&runtime, r#"{"line_mode": true}"#)],
        vec![tcp_cluster("backend", echo)],
        Limits::default(),
    );
    let mut client = TcpStream::connect(gw.address).await.unwrap();
    client.write_all(b"hel").await.unwrap();
    until("the first call", || {
        shared(&runtime, "greeting", "tcp_greeting_sizes").as_deref() == Some("3")
    })
    .await;
    client.write_all(b"lo world\n").await.unwrap();
    let mut out = [0u8; 12];
    client.read_exact(&mut out).await.unwrap();
    // The held "hel" and the new bytes made one buffer, so "hello" across the chunks matched.
    assert_eq!(&out, b"howdy world\n");
    assert_eq!(
        shared(&runtime, "greeting", "tcp_greeting_sizes").as_deref(),
        Some("3,12")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_data_over_the_buffer_limit_closes_the_connection() {
    let echo = echo_server().await;
    let runtime = runtime();
    let gw = start_tcp(
        runtime.clone(),
        vec![greeting(&runtime, r#"{"line_mode": true}"#)],
        vec![tcp_cluster("backend", echo)],
        Limits {
            per_stream_buffer_limit: 1024,
            ..Limits::default()
        },
    );
    let mut client = TcpStream::connect(gw.address).await.unwrap();
    let _ = client.write_all(&[b'a'; 4096]).await;
    assert_eq!(read_to_end(&mut client).await, b"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callout_holds_the_connection_until_it_answers() {
    let echo = echo_server().await;
    let auth = upstream().await;
    let nowhere = closed_port().await;
    let runtime = runtime();
    for phase in ["connection", "data", "upstream_data"] {
        let allow = filter(
            &format!("callout-{phase}"),
            &runtime,
            "test_tcp_callout",
            &format!(r#"{{"cluster": "auth", "path": "/auth", "phase": "{phase}"}}"#),
            FailurePolicy::FailClosed,
        );
        let gw = start_tcp(
            runtime.clone(),
            vec![allow, greeting(&runtime, "")],
            vec![
                tcp_cluster("backend", echo),
                cluster("auth", auth.address),
                cluster("down", nowhere),
            ],
            Limits::default(),
        );
        let before = auth.seen.lock().len();
        assert_eq!(exchange(gw.address, b"hello there").await, b"howdy there");
        assert_eq!(auth.seen.lock().len(), before + 1, "{phase}");
    }
    assert_eq!(metric(&runtime, "tcp_callout_answers"), 3);
    // A call that fails closes the connection.
    let deny = filter(
        "callout-down",
        &runtime,
        "test_tcp_callout",
        r#"{"cluster": "down", "phase": "connection"}"#,
        FailurePolicy::FailClosed,
    );
    let gw = start_tcp(
        runtime.clone(),
        vec![deny],
        vec![tcp_cluster("backend", echo), cluster("down", nowhere)],
        Limits::default(),
    );
    assert_eq!(exchange(gw.address, b"hello").await, b"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_plugins_tick() {
    let echo = echo_server().await;
    let runtime = runtime();
    let ticking = filter(
        "counter",
        &runtime,
        "test_tcp_counter",
        r#"{"tick_ms": 10}"#,
        FailurePolicy::FailClosed,
    );
    let _gw = start_tcp(
        runtime.clone(),
        vec![ticking],
        vec![tcp_cluster("backend", echo)],
        Limits::default(),
    );
    until("ticks", || metric(&runtime, "tcp_counter_ticks") >= 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_plugins_use_shared_queues() {
    let echo = echo_server().await;
    let runtime = runtime();
    let queued = filter(
        "counter",
        &runtime,
        "test_tcp_counter",
        r#"{"queue": "connections"}"#,
        FailurePolicy::FailClosed,
    );
    let gw = start_tcp(
        runtime.clone(),
        vec![queued],
        vec![tcp_cluster("backend", echo)],
        Limits::default(),
    );
    for _ in 0..3 {
        assert_eq!(exchange(gw.address, b"hello").await, b"hello");
    }
    // Each connection enqueued its id; the root was told and dequeued them.
    until("queue messages", || {
        metric(&runtime, "tcp_counter_queue_messages") == 3
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_chain_update_applies_to_new_connections() {
    let echo = echo_server().await;
    let runtime = runtime();
    let gw = start_tcp(
        runtime.clone(),
        vec![],
        vec![tcp_cluster("backend", echo)],
        Limits::default(),
    );
    assert_eq!(exchange(gw.address, b"hello").await, b"hello");
    let handle = gw.handle.as_ref().unwrap();
    handle
        .update_network_chain("main", vec![greeting(&runtime, "")], vec![])
        .unwrap();
    assert_eq!(exchange(gw.address, b"hello").await, b"howdy");
    assert!(matches!(
        handle.update_network_chain("nope", vec![], vec![]),
        Err(StartError::UnknownListener(_))
    ));
}

// === TLS passthrough by SNI ===

struct TlsBackend {
    address: SocketAddr,
    roots: RootCertStore,
}

/// A TLS echo server whose certificate names `name`.
async fn tls_echo(name: &str) -> TlsBackend {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let der = CertificateDer::from(cert.der().to_vec());
    let mut roots = RootCertStore::empty();
    roots.add(der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![der],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(stream) = acceptor.accept(stream).await {
                    echo(stream).await;
                }
            });
        }
    });
    TlsBackend { address, roots }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_passthrough_routes_by_sni() {
    let secure = tls_echo("a.example.com").await;
    let plain = echo_server().await;
    let runtime = runtime();
    let spec = GatewaySpec {
        workers: 1,
        listeners: vec![ListenerSpec {
            tcp_proxy: Some(TcpProxySpec {
                cluster: "plain".into(),
                sni_routes: vec![SniRoute {
                    server_names: vec!["*.example.com".into()],
                    cluster: "secure".into(),
                }],
            }),
            ..tcp_listener("plain", vec![counter(&runtime)], Limits::default())
        }],
        clusters: vec![
            tcp_cluster("plain", plain),
            tcp_cluster("secure", secure.address),
        ],
    };
    let gw = Gateway::start(runtime.clone(), spec);
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(secure.roots.clone())
            .with_no_client_auth();
    let connector = TlsConnector::from(Arc::new(config));
    let stream = TcpStream::connect(gw.address).await.unwrap();
    // The handshake completes end to end with the backend: the gateway passed the bytes untouched.
    let mut tls = connector
        .connect(ServerName::try_from("a.example.com").unwrap(), stream)
        .await
        .unwrap();
    tls.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    tls.read_exact(&mut pong).await.unwrap();
    assert_eq!(&pong, b"ping");
    let line = shared(&runtime, "counter", "tcp_counter_connection").unwrap();
    assert!(line.ends_with("sni=a.example.com"), "{line}");
    drop(tls);
    // Not TLS at all: the default cluster, no server name.
    assert_eq!(exchange(gw.address, b"plain text").await, b"plain text");
    let line = shared(&runtime, "counter", "tcp_counter_connection").unwrap();
    assert!(line.ends_with("sni=-"), "{line}");
}
