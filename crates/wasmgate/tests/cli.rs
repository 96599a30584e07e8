//! The release interface end to end: `wasmgate run` from a config file and as the quickstart,
//! config errors, `validate`, and a graceful shutdown on SIGTERM.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

fn config_with(upstream: SocketAddr, filters: &str) -> String {
    format!(
        r#"workers: 2
admin: 127.0.0.1:0
listeners:
  - name: main
    address: 127.0.0.1:0
    http_filters:
{filters}
    routes:
      - match: {{ path: /healthz }}
        direct_response: {{ status: 200, body: "healthy" }}
      - match: {{ prefix: / }}
        cluster: upstream
clusters:
  - name: upstream
    endpoints: [{upstream}]
"#
    )
}

#[test]
fn run_serves_a_config_file_with_envoy_style_filters() {
    let dir = tempfile::tempdir().unwrap();
    let filters = format!(
        r#"      - name: add-header
        root_id: ""
        configuration: {{ name: x-added, value: yes, side: both }}
        vm_config: {{ vm_id: v1, runtime: envoy.wasm.runtime.v8, code: {{ local: {{ filename: {} }} }} }}"#,
        plugin("add_header").display()
    );
    let config = write_config(&dir, &config_with(upstream(Duration::ZERO), &filters));
    let mut gateway = start(&["run", "--config", config.to_str().unwrap()]);
    let main = gateway.listener("main");
    let (status, answer) = get(main, "/", "");
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer.contains("x-added: yes"),
        "a map configuration reached the plugin as JSON: {answer}"
    );
    assert!(answer.ends_with("upstream says hi"));
    let (status, answer) = get(main, "/healthz", "");
    assert_eq!(
        (status, answer.ends_with("healthy")),
        (200, true),
        "{answer}"
    );
    let (status, ready) = get(gateway.admin, "/ready", "");
    assert_eq!((status, ready.ends_with("LIVE\n")), (200, true));
    let (_, stats) = get(gateway.admin, "/stats/prometheus", "");
    assert!(
        stats.contains("wasmgate_http_responses_total{class=\"2xx\"} 2"),
        "{stats}"
    );
    assert!(
        stats.contains("wasmgate_plugin_vms{plugin=\"add-header\"} 2"),
        "one VM per worker: {stats}"
    );
    let (_, dump) = get(gateway.admin, "/config_dump", "");
    assert!(dump.contains("\"add-header\""), "{dump}");
    let (_, plugins) = get(gateway.admin, "/plugins", "");
    assert!(
        plugins.contains("\"sha256\"") && plugins.contains("\"loaded\""),
        "{plugins}"
    );
    let (status, _) = http(
        gateway.admin,
        "POST /logging?wasm=debug HTTP/1.1\r\nhost: a\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
    );
    assert_eq!(status, 200);
    let (_, logging) = get(gateway.admin, "/logging", "");
    assert!(logging.contains("wasm: debug"), "{logging}");
    let status = gateway.terminate();
    assert!(status.success(), "SIGTERM is a clean exit: {status}");
}

#[test]
fn quickstart_guards_the_product_page_with_basic_auth() {
    let mut gateway = start(&["run", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]);
    let address = gateway.listener("quickstart");
    let (status, answer) = get(address, "/productpage", "");
    assert_eq!(status, 401, "{answer}");
    assert!(
        answer.contains("www-authenticate: Basic realm=istio"),
        "{answer}"
    );
    // ok:test and admin3:admin3, as base64.
    let (status, answer) = get(
        address,
        "/productpage",
        "authorization: Basic b2s6dGVzdA==\r\n",
    );
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("The Comedy of Errors"));
    let post = "POST /productpage HTTP/1.1\r\nhost: a\r\nconnection: close\r\ncontent-length: 0\r\nauthorization: Basic YWRtaW4zOmFkbWluMw==\r\n\r\n";
    assert_eq!(http(address, post).0, 200);
    let (status, answer) = get(
        address,
        "/productpage",
        "authorization: Basic b2s6d3Jvbmc=\r\n",
    );
    assert_eq!(status, 401);
    assert!(
        answer.ends_with("User name or password is invalid."),
        "{answer}"
    );
    assert!(gateway.terminate().success());
}

#[test]
fn sigterm_lets_requests_in_flight_finish() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &dir,
        &config_with(upstream(Duration::from_millis(800)), "      []")
            .replace("    http_filters:\n      []", "    http_filters: []"),
    );
    let mut gateway = start(&["run", "--config", config.to_str().unwrap()]);
    let main = gateway.listener("main");
    let in_flight = std::thread::spawn(move || get(main, "/slow", ""));
    // Wait until the request is in the gateway (the upstream holds it for 800 ms).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, stats) = get(gateway.admin, "/stats/prometheus", "");
        if stats.contains("wasmgate_active_connections 1") || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = gateway.terminate();
    let (code, answer) = in_flight.join().unwrap();
    assert_eq!(code, 200, "the request in flight finished: {answer}");
    assert!(status.success());
}

#[test]
fn config_errors_stop_start_up_with_file_field_and_reason() {
    let up = upstream(Duration::ZERO);
    let unknown_cluster = config_with(up, "      []")
        .replace("cluster: upstream\n", "cluster: nowhere\n")
        .replace("    http_filters:\n      []", "    http_filters: []");
    let stderr = run_expecting_failure(&unknown_cluster);
    assert!(
        stderr.contains("listeners[0].routes[1].cluster") && stderr.contains("nowhere"),
        "{stderr}"
    );

    let missing_file = config_with(
        up,
        "      - name: f\n        vm_config: { code: { local: { filename: /does/not/exist.wasm } } }",
    );
    let stderr = run_expecting_failure(&missing_file);
    assert!(
        stderr.contains("http_filters[0]") && stderr.contains("/does/not/exist.wasm"),
        "{stderr}"
    );

    let bad_address = config_with(up, "      []")
        .replace("address: 127.0.0.1:0", "address: not-an-address")
        .replace("    http_filters:\n      []", "    http_filters: []");
    let stderr = run_expecting_failure(&bad_address);
    assert!(
        stderr.contains("listeners[0].address") && stderr.contains("not-an-address"),
        "{stderr}"
    );

    // A plugin that rejects its configuration stops start-up and says which.
    let rejecting = config_with(
        up,
        &format!(
            "      - name: strict\n        configuration: \"not json\"\n        vm_config: {{ code: {{ local: {{ filename: {} }} }} }}",
            plugin("add_header").display()
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, &rejecting);
    let output = wasmgate()
        .args(["run", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("strict") && stderr.contains("proxy_on_configure"),
        "{stderr}"
    );
}

#[test]
fn validate_checks_files_offline() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_config(
        &dir,
        &config_with("127.0.0.1:9".parse().unwrap(), "      []")
            .replace("    http_filters:\n      []", "    http_filters: []"),
    );
    let output = wasmgate().arg("validate").arg(&good).output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "workers: 0\nlisteners: []\nclustrs: []\n").unwrap();
    let output = wasmgate().arg("validate").arg(&bad).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("bad.yaml") && stderr.contains("clustrs"),
        "{stderr}"
    );
}

#[test]
fn wasm_plugin_manifests_join_the_chain_in_istio_order() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins.d");
    std::fs::create_dir(&plugins).unwrap();
    let wasm = plugin("add_header");
    std::fs::write(
        plugins.join("order.yaml"),
        format!(
            r#"apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata:
  name: unspecified-phase
spec:
  url: file://{wasm}
  pluginConfig: {{ name: x-order, value: unspecified, side: both }}
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata:
  name: authn-low
  namespace: default
spec:
  url: file://{wasm}
  phase: AUTHN
  priority: 1
  pluginConfig: {{ name: x-order, value: authn-low, side: both }}
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata:
  name: authn-high
  namespace: default
spec:
  url: file://{wasm}
  phase: AUTHN
  priority: 10
  pluginConfig: {{ name: x-order, value: authn-high, side: both }}
"#,
            wasm = wasm.display()
        ),
    )
    .unwrap();
    let filters = format!(
        "      - name: envoy-filter\n        configuration: '{{\"name\":\"x-order\",\"value\":\"filter\",\"side\":\"both\"}}'\n        vm_config: {{ code: {{ local: {{ filename: {} }} }} }}",
        wasm.display()
    );
    let yaml = format!(
        "{}plugins_dir: plugins.d\n",
        config_with(upstream(Duration::ZERO), &filters)
    );
    let config = write_config(&dir, &yaml);
    let mut gateway = start(&["run", "--config", config.to_str().unwrap()]);
    let (status, answer) = get(gateway.listener("main"), "/", "");
    assert_eq!(status, 200, "{answer}");
    let order: Vec<&str> = answer
        .lines()
        .filter_map(|l| l.strip_prefix("x-order: "))
        .map(str::trim)
        .collect();
    // Response callbacks run in reverse chain order: the chain is AUTHN by priority, then the
    // listener's own filters, then plugins without a phase.
    assert_eq!(
        order,
        vec!["unspecified", "filter", "authn-low", "authn-high"],
        "{answer}"
    );
    let (_, plugins) = get(gateway.admin, "/plugins", "");
    assert!(
        plugins.contains("authn-high") && plugins.contains("order.yaml"),
        "{plugins}"
    );
    assert!(gateway.terminate().success());
}

#[test]
fn a_plugin_stuck_in_a_loop_is_stopped_and_the_gateway_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let looping = dir.path().join("looping.wasm");
    // Request headers loop forever; everything else is a no-op.
    std::fs::write(
        &looping,
        wat_module(
            r#"(module
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (loop $forever (br $forever))
    (i32.const 0)))"#,
        ),
    )
    .unwrap();
    let upstream = upstream(Duration::ZERO);
    let yaml = format!(
        r#"workers: 1
admin: 127.0.0.1:0
plugin_limits: {{ callback_time_limit: 200ms }}
listeners:
  - name: stuck
    address: 127.0.0.1:0
    http_filters:
      - name: looping
        vm_config: {{ code: {{ local: {{ filename: {looping} }} }} }}
    routes: [ {{ match: {{ prefix: / }}, cluster: up }} ]
  - name: fine
    address: 127.0.0.1:0
    routes: [ {{ match: {{ prefix: / }}, cluster: up }} ]
clusters:
  - {{ name: up, endpoints: ["{upstream}"] }}
"#,
        looping = looping.display()
    );
    let config = write_config(&dir, &yaml);
    let gateway = start(&["run", "--config", config.to_str().unwrap()]);
    let started = std::time::Instant::now();
    let (status, answer) = get(gateway.listener("stuck"), "/", "");
    assert_eq!(status, 503, "FAIL_CLOSED after the trap: {answer}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // The worker is free again: the other listener, on the same single worker, serves.
    let (status, answer) = get(gateway.listener("fine"), "/", "");
    assert_eq!(status, 200, "{answer}");
    let (status, _) = get(gateway.listener("stuck"), "/", "");
    assert_eq!(status, 503, "the failed VM stays failed");
}

/// A module from WAT text, through the `wat` crate the toolkit already uses.
fn wat_module(text: &str) -> Vec<u8> {
    wat::parse_str(text).expect("valid WAT")
}
