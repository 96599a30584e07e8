//! The release binary as a TCP proxy: a listener with `network_filters` and `tcp_proxy`, in the
//! shape the network-plugins issue gives, against a real echo server; a NETWORK WasmPlugin from
//! `plugins_dir` in the same chain; and a hot reload of the network chain.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;

/// Echoes every byte back until the client half-closes, then closes.
fn echo_server() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut buffer = [0u8; 16 * 1024];
                loop {
                    match stream.read(&mut buffer) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if stream.write_all(&buffer[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = stream.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    address
}

/// Sends `text`, half-closes, and reads everything the proxy sends back.
fn round_trip(address: SocketAddr, text: &str) -> String {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(text.as_bytes()).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
fn a_tcp_proxy_listener_runs_its_network_plugins() {
    let echo = echo_server();
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins.d");
    std::fs::create_dir(&plugins).unwrap();
    let greeting = plugin("test_tcp_greeting");
    let counter = plugin("test_tcp_counter");
    let yaml = format!(
        r#"workers: 1
admin: 127.0.0.1:0
plugins_dir: plugins.d
listeners:
  - name: tcp
    address: 127.0.0.1:0
    network_filters:
      - name: greeting
        vm_config: {{ code: {{ local: {{ filename: {greeting} }} }} }}
    tcp_proxy: {{ cluster: echo }}
clusters:
  - name: echo
    endpoints: ["{echo}"]
"#,
        greeting = greeting.display()
    );
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, yaml).unwrap();
    let gateway = start_capturing(wasmgate().args(["run", "--config", config.to_str().unwrap()]));
    let tcp = gateway.listener("tcp");
    // Downstream "hello" becomes "howdy" on the way up; the echo comes back unchanged.
    assert_eq!(round_trip(tcp, "hello world"), "howdy world");

    // A NETWORK WasmPlugin joins the chain by hot reload: the counter plugin's metric moves.
    std::fs::write(
        plugins.join("counter.yaml"),
        format!(
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n  name: counter\nspec:\n  type: NETWORK\n  url: file://{}\n",
            counter.display()
        ),
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || {
            let (_, plugins) = get(gateway.admin, "/plugins", "");
            plugins.contains("\"counter\"") && plugins.contains("\"network\"")
        }),
        "{}",
        gateway.stderr.lock()
    );
    assert_eq!(round_trip(tcp, "hello again"), "howdy again");
    let (_, stats) = get(gateway.admin, "/stats/prometheus", "");
    assert!(
        stats
            .lines()
            .any(|l| l.starts_with("tcp_counter") || l.contains("tcp_counter")),
        "the counter plugin's metrics are exposed: {stats}"
    );
}

/// Network plugins on an HTTP listener run on the connection's bytes before the HTTP codec, as
/// Istio places them: a counter sees the request and response bytes, and a plugin that closes the
/// connection on a banned word stops a request carrying it before any HTTP handling.
#[test]
fn network_plugins_on_an_http_listener_see_the_bytes_before_the_http_codec() {
    let upstream = upstream(Duration::ZERO);
    let dir = tempfile::tempdir().unwrap();
    let counter = plugin("test_tcp_counter");
    let banned = plugin("test_tcp_banned");
    let add_header = plugin("add_header");
    let yaml = format!(
        r#"workers: 1
admin: 127.0.0.1:0
listeners:
  - name: web
    address: 127.0.0.1:0
    network_filters:
      - name: counter
        vm_config: {{ code: {{ local: {{ filename: {counter} }} }} }}
      - name: banned
        vm_config: {{ code: {{ local: {{ filename: {banned} }} }} }}
    http_filters:
      - name: add-header
        configuration: {{ name: x-http-plugin, value: ran, side: response }}
        vm_config: {{ code: {{ local: {{ filename: {add_header} }} }} }}
    routes: [ {{ match: {{ prefix: / }}, cluster: up }} ]
clusters:
  - {{ name: up, endpoints: ["{upstream}"] }}
"#,
        counter = counter.display(),
        banned = banned.display(),
        add_header = add_header.display()
    );
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, yaml).unwrap();
    let gateway = start(&["run", "--config", config.to_str().unwrap()]);
    let web = gateway.listener("web");

    let (status, answer) = get(web, "/hello", "");
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("x-http-plugin: ran"), "{answer}");
    assert!(answer.contains("upstream says hi"), "{answer}");

    // The counter saw the request's bytes downstream and the response's bytes upstream.
    let counter_value = |name: &str| -> u64 {
        let (_, metrics) = get(gateway.admin, "/stats/prometheus", "");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    assert!(eventually(Duration::from_secs(5), || {
        counter_value("tcp_counter_done") >= 1
    }));
    let request_len = "GET /hello HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n".len();
    assert_eq!(counter_value("tcp_counter_connections"), 1);
    assert_eq!(
        counter_value("tcp_counter_downstream_bytes"),
        request_len as u64
    );
    let response_len = answer.len() as u64;
    assert_eq!(counter_value("tcp_counter_upstream_bytes"), response_len);

    // A banned word in the request: the network plugin closes the connection, no HTTP answer.
    let mut stream = TcpStream::connect(web).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET /forbidden HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));

    // The listener still serves.
    assert_eq!(get(web, "/again", "").0, 200);
}

/// SIGTERM drains a TCP proxy listener: no new connections, while open ones go on until a side
/// ends them; then the process exits.
#[test]
fn a_tcp_connection_open_at_shutdown_goes_on_until_it_ends() {
    let echo = echo_server();
    let dir = tempfile::tempdir().unwrap();
    let counter = plugin("test_tcp_counter");
    let yaml = format!(
        r#"workers: 1
admin: 127.0.0.1:0
listeners:
  - name: tcp
    address: 127.0.0.1:0
    network_filters:
      - name: counter
        vm_config: {{ code: {{ local: {{ filename: {counter} }} }} }}
    tcp_proxy: {{ cluster: echo }}
clusters:
  - name: echo
    endpoints: ["{echo}"]
"#,
        counter = counter.display()
    );
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, yaml).unwrap();
    let mut gateway = start(&["run", "--config", config.to_str().unwrap()]);
    let tcp = gateway.listener("tcp");
    let mut stream = TcpStream::connect(tcp).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buffer = [0u8; 5];
    stream.write_all(b"first").unwrap();
    stream.read_exact(&mut buffer).unwrap();
    assert_eq!(&buffer, b"first");

    let status = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(gateway.child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    // The listener stops accepting...
    assert!(eventually(Duration::from_secs(10), || {
        TcpStream::connect(tcp).is_err()
    }));
    // ...while the open connection still carries bytes both ways.
    stream.write_all(b"again").unwrap();
    stream.read_exact(&mut buffer).unwrap();
    assert_eq!(&buffer, b"again");
    assert!(
        gateway.child.try_wait().unwrap().is_none(),
        "still draining"
    );
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    let exited = eventually(Duration::from_secs(10), || {
        gateway.child.try_wait().unwrap().is_some()
    });
    assert!(exited, "the gateway exits once its last connection ended");
}
