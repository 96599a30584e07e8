//! Debugging and restriction through the binary: the host/VM trace switched on at run time for one
//! plugin or all (`POST /logging`), Envoy's `capability_restriction_config`, FAIL_RELOAD with its
//! backoff and counters, the VM state in `/plugins`, and gRPC's UNAVAILABLE for a failed plugin.

mod common;

use std::time::Duration;

use common::*;

fn post(address: std::net::SocketAddr, path: &str) -> (u16, String) {
    http(
        address,
        &format!(
            "POST {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
        ),
    )
}

fn lines_with<'a>(log: &'a str, needles: &[&str]) -> Vec<&'a str> {
    log.lines()
        .filter(|line| needles.iter().all(|n| line.contains(n)))
        .collect()
}

#[test]
fn the_host_vm_trace_turns_on_for_one_plugin_or_all_at_run_time() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream(Duration::ZERO);
    let add_header = plugin("add_header");
    let yaml = format!(
        r#"workers: 1
admin: 127.0.0.1:0
listeners:
  - name: main
    address: 127.0.0.1:0
    http_filters:
      - name: first
        configuration: {{ name: x-first, value: "1", side: request }}
        vm_config: {{ code: {{ local: {{ filename: {wasm} }} }} }}
      - name: second
        configuration: {{ name: x-second, value: "2", side: request }}
        vm_config: {{ code: {{ local: {{ filename: {wasm} }} }} }}
    routes: [ {{ match: {{ prefix: / }}, cluster: up }} ]
clusters:
  - {{ name: up, endpoints: ["{upstream}"] }}
"#,
        wasm = add_header.display()
    );
    let config = write_config(&dir, &yaml);
    let gateway = start_capturing(wasmgate().args(["run", "--config", config.to_str().unwrap()]));
    let listener = gateway.listener("main");

    // Off by default: a request leaves no trace.
    assert_eq!(get(listener, "/", "").0, 200);
    assert!(lines_with(&gateway.stderr.lock(), &["[host->vm]"]).is_empty());

    // One plugin.
    let (status, body) = post(gateway.admin, "/logging?wasm=trace&plugin=first");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("wasm.first: trace"), "{body}");
    assert_eq!(get(listener, "/one", "").0, 200);
    let found = eventually(Duration::from_secs(5), || {
        let log = gateway.stderr.lock();
        !lines_with(&log, &["[host<-vm] proxy_on_request_headers return: 0"]).is_empty()
    });
    assert!(found, "the trace shows the callback returning");
    {
        let log = gateway.stderr.lock();
        let entered = lines_with(&log, &["[host->vm] proxy_on_request_headers(", "first"]);
        assert!(!entered.is_empty(), "{log}");
        // proxy_on_request_headers(context, header count, end_of_stream) as in Envoy's trace; a
        // GET has no body, so end_of_stream is 1.
        assert!(entered.iter().any(|l| l.contains(", 1)")), "{entered:?}");
        let host_calls = lines_with(&log, &["[vm->host] env.proxy_", "-> Ok"]);
        assert!(
            !host_calls.is_empty(),
            "host calls with their status: {log}"
        );
        assert!(
            lines_with(&log, &["[host->vm]", "second"]).is_empty(),
            "the other plugin is not traced"
        );
    }

    // All plugins, then off again.
    assert_eq!(post(gateway.admin, "/logging?wasm=trace").0, 200);
    assert_eq!(get(listener, "/all", "").0, 200);
    // The stream ends in the plugins (on_log, on_done, on_delete) after the response has gone:
    // wait for its last callback, the second plugin's on_delete, before counting trace lines.
    assert!(eventually(Duration::from_secs(5), || {
        let log = gateway.stderr.lock();
        !lines_with(&log, &["[host->vm] proxy_on_request_headers(", "second"]).is_empty()
            && !lines_with(&log, &["[host<-vm] proxy_on_delete return", "second"]).is_empty()
    }));
    assert_eq!(post(gateway.admin, "/logging?wasm=info").0, 200);
    let before = gateway.stderr.lock().matches("[host->vm]").count();
    assert_eq!(get(listener, "/quiet", "").0, 200);
    assert_eq!(get(listener, "/quiet", "").0, 200);
    assert_eq!(
        gateway.stderr.lock().matches("[host->vm]").count(),
        before,
        "the trace is off again"
    );
    assert_eq!(post(gateway.admin, "/logging?wasm=loud").0, 400);
    // An unknown plugin is refused, naming the known ones, and changes nothing.
    let (status, body) = post(gateway.admin, "/logging?wasm=trace&plugin=nosuch");
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("unknown plugin \"nosuch\"; the plugins are: first, second"),
        "{body}"
    );
    let (status, body) = post(gateway.admin, "/logging?wasm.first=debug&wasm.nosuch=debug");
    assert_eq!(status, 400, "{body}");
    let (_, loggers) = get(gateway.admin, "/logging", "");
    assert!(!loggers.contains("wasm.first: debug"), "{loggers}");
}

#[test]
fn envoys_capability_restriction_hides_callbacks_and_refuses_host_functions() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream(Duration::ZERO);
    let add_header = plugin("add_header");
    let yaml = format!(
        r#"workers: 1
admin: 127.0.0.1:0
listeners:
  - name: hidden
    address: 127.0.0.1:0
    http_filters:
      - name: no-headers-callback
        configuration: {{ name: x-added, value: "1", side: response }}
        vm_config: {{ code: {{ local: {{ filename: {wasm} }} }} }}
        capability_restriction_config:
          allowed_capabilities: {{ proxy_on_vm_start: {{}}, proxy_on_configure: {{}}, proxy_on_context_create: {{}}, proxy_get_buffer_bytes: {{}}, proxy_log: {{}}, random_get: {{}}, fd_write: {{}}, environ_get: {{}}, environ_sizes_get: {{}}, clock_time_get: {{}} }}
    routes: [ {{ match: {{ prefix: / }}, cluster: up }} ]
  - name: refused
    address: 127.0.0.1:0
    http_filters:
      - name: no-header-writes
        configuration: {{ name: x-added, value: "1", side: response }}
        vm_config: {{ code: {{ local: {{ filename: {wasm} }} }} }}
        capability_restriction_config:
          allowed_capabilities: {{ proxy_on_vm_start: {{}}, proxy_on_configure: {{}}, proxy_on_context_create: {{}}, proxy_get_buffer_bytes: {{}}, proxy_on_response_headers: {{}}, proxy_log: {{}}, random_get: {{}}, fd_write: {{}}, environ_get: {{}}, environ_sizes_get: {{}}, clock_time_get: {{}} }}
    routes: [ {{ match: {{ prefix: / }}, cluster: up }} ]
  - name: free
    address: 127.0.0.1:0
    http_filters:
      - name: unrestricted
        configuration: {{ name: x-added, value: "1", side: response }}
        vm_config: {{ code: {{ local: {{ filename: {wasm} }} }} }}
    routes: [ {{ match: {{ prefix: / }}, cluster: up }} ]
clusters:
  - {{ name: up, endpoints: ["{upstream}"] }}
"#,
        wasm = add_header.display()
    );
    let config = write_config(&dir, &yaml);
    let gateway = start_capturing(wasmgate().args(["run", "--config", config.to_str().unwrap()]));

    let (status, answer) = get(gateway.listener("free"), "/", "");
    assert_eq!(status, 200);
    assert!(answer.contains("x-added: 1"), "{answer}");

    // proxy_on_response_headers is not allowed: the callback never runs, the response passes as is.
    let (status, answer) = get(gateway.listener("hidden"), "/", "");
    assert_eq!(status, 200);
    assert!(!answer.contains("x-added"), "{answer}");

    // The callback runs, but adding the header is refused (INTERNAL_FAILURE); the Rust SDK panics
    // on that, so the plugin traps and fails closed, as it would in Envoy.
    let (status, answer) = get(gateway.listener("refused"), "/", "");
    assert_eq!(status, 503, "{answer}");
    assert!(eventually(Duration::from_secs(5), || {
        gateway
            .stderr
            .lock()
            .contains("is not among the plugin's allowed capabilities")
    }));
}

/// A plugin that traps on requests carrying `x-crash` and adds `x-served-by: wat` otherwise.
const CRASHING: &str = r#"(module
  (import "env" "proxy_get_header_map_value"
    (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value"
    (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "x-crash")
  (data (i32.const 16) "x-served-by")
  (data (i32.const 32) "wat")
  (global $next (mut i32) (i32.const 4096))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $at i32)
    (local.set $at (global.get $next))
    (global.set $next (i32.add (global.get $next) (i32.add (local.get $size) (i32.const 8))))
    (local.get $at))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.eqz (call $get (i32.const 0) (i32.const 0) (i32.const 7) (i32.const 64) (i32.const 68)))
      (then unreachable))
    (drop (call $add (i32.const 0) (i32.const 16) (i32.const 11) (i32.const 32) (i32.const 3)))
    (i32.const 0))
)"#;

#[test]
fn fail_reload_rebuilds_the_vm_with_backoff_and_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    let crashing = dir.path().join("crashing.wasm");
    std::fs::write(&crashing, wat::parse_str(CRASHING).unwrap()).unwrap();
    let upstream = upstream(Duration::ZERO);
    let yaml = format!(
        r#"workers: 1
admin: 127.0.0.1:0
listeners:
  - name: reload
    address: 127.0.0.1:0
    http_filters:
      - name: crashing
        failure_policy: FAIL_RELOAD
        reload_config: {{ backoff: {{ base_interval: 300ms, max_interval: 1s }} }}
        vm_config: {{ code: {{ local: {{ filename: {wasm} }} }} }}
    routes: [ {{ match: {{ prefix: / }}, cluster: up }} ]
  - name: closed
    address: 127.0.0.1:0
    http_filters:
      - name: crashing-closed
        vm_config: {{ code: {{ local: {{ filename: {wasm} }} }} }}
    routes: [ {{ match: {{ prefix: / }}, cluster: up }} ]
clusters:
  - {{ name: up, endpoints: ["{upstream}"] }}
"#,
        wasm = crashing.display()
    );
    let config = write_config(&dir, &yaml);
    let gateway = start_capturing(wasmgate().args(["run", "--config", config.to_str().unwrap()]));
    let reload = gateway.listener("reload");

    let (status, answer) = get(reload, "/", "");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        get(reload, "/", "x-crash: 1\r\n").0,
        503,
        "the trap fails the request"
    );
    // The first rebuild is immediate; the VM serves again.
    let (status, answer) = get(reload, "/", "");
    assert_eq!(status, 200, "{answer}");
    // A second crash inside the backoff: the plugin fails closed until the backoff ends.
    assert_eq!(get(reload, "/", "x-crash: 1\r\n").0, 503);
    assert_eq!(get(reload, "/", "").0, 503, "rebuild waits out its backoff");
    assert!(
        eventually(Duration::from_secs(10), || get(reload, "/", "").0 == 200),
        "rebuilt once the backoff ended"
    );

    let (_, metrics) = get(gateway.admin, "/stats/prometheus", "");
    assert!(
        metrics.contains(r#"wasmgate_plugin_vm_failures_total{plugin="crashing"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics
            .contains(r#"wasmgate_plugin_vm_reloads_total{plugin="crashing",result="success"} 2"#),
        "{metrics}"
    );
    assert!(
        !metrics
            .contains(r#"wasmgate_plugin_vm_reloads_total{plugin="crashing",result="backoff"} 0"#),
        "{metrics}"
    );

    // FAIL_CLOSED: the VM stays failed, and /plugins says so and why.
    let closed = gateway.listener("closed");
    assert_eq!(get(closed, "/", "x-crash: 1\r\n").0, 503);
    assert_eq!(get(closed, "/", "").0, 503);
    let (_, plugins) = get(gateway.admin, "/plugins", "");
    let body = plugins.split("\r\n\r\n").nth(1).unwrap_or("");
    let plugins: serde_json::Value = serde_json::from_str(body).unwrap();
    let entry = |name: &str| {
        plugins
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()
            .clone()
    };
    let closed = entry("crashing-closed");
    assert_eq!(closed["vm"]["state"], "failed", "{closed}");
    assert_eq!(closed["vm"]["failures"], 1);
    assert!(
        closed["vm"]["last_failure"]
            .as_str()
            .unwrap()
            .contains("unreachable"),
        "{closed}"
    );
    let reloading = entry("crashing");
    assert_eq!(reloading["vm"]["state"], "running", "{reloading}");
    assert_eq!(reloading["vm"]["reloads"]["success"], 2);

    // A gRPC request to the failed plugin gets UNAVAILABLE the gRPC way.
    let (status, answer) = get(
        closed_address(&gateway),
        "/pkg.Service/Method",
        "content-type: application/grpc\r\n",
    );
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("grpc-status: 14"), "{answer}");
}

fn closed_address(gateway: &Running) -> std::net::SocketAddr {
    gateway.listener("closed")
}

#[test]
fn the_stats_matcher_chooses_which_plugin_metrics_are_shown() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream(Duration::ZERO);
    let kitchen = plugin("test_kitchen_sink");
    let config_for = |matcher: &str| {
        format!(
            r#"workers: 1
admin: 127.0.0.1:0
{matcher}
listeners:
  - name: main
    address: 127.0.0.1:0
    http_filters:
      - name: kitchen
        vm_config: {{ code: {{ local: {{ filename: {wasm} }} }} }}
    routes: [ {{ match: {{ prefix: / }}, cluster: up }} ]
clusters:
  - {{ name: up, endpoints: ["{upstream}"] }}
"#,
            wasm = kitchen.display()
        )
    };
    let metrics_of = |matcher: &str| {
        let config = write_config(&dir, &config_for(matcher));
        let gateway = start(&["run", "--config", config.to_str().unwrap()]);
        assert_eq!(get(gateway.listener("main"), "/", "").0, 200);
        get(gateway.admin, "/stats/prometheus", "").1
    };
    let all = metrics_of("");
    let plugin_metric_names = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with("# TYPE kitchen"))
            .map(|l| l.split_whitespace().nth(2).unwrap().to_owned())
            .collect()
    };
    let names = plugin_metric_names(&all);
    assert!(names.len() >= 2, "the kitchen sink defines metrics: {all}");
    let first = names[0].clone();
    // Only the first by its exact name; the gateway's own metrics stay.
    let only_first = metrics_of(&format!(
        "stats_matcher: {{ inclusion_list: {{ patterns: [ {{ exact: {first} }} ] }} }}"
    ));
    assert_eq!(plugin_metric_names(&only_first), vec![first.clone()]);
    assert!(only_first.contains("wasmgate_http_responses_total"));
    // Everything but the first.
    let but_first = metrics_of(&format!(
        "stats_matcher: {{ exclusion_list: {{ patterns: [ {{ safe_regex: {{ regex: '^{first}$' }} }} ] }} }}"
    ));
    let rest = plugin_metric_names(&but_first);
    assert_eq!(rest.len(), names.len() - 1);
    assert!(!rest.contains(&first));

    // A reload that changes the matcher applies it at once.
    let config = write_config(&dir, &config_for(""));
    let gateway = start(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(get(gateway.listener("main"), "/", "").0, 200);
    let inclusion =
        format!("stats_matcher: {{ inclusion_list: {{ patterns: [ {{ exact: {first} }} ] }} }}");
    let text = config_for(&inclusion);
    let temporary = config.with_extension("partial");
    std::fs::write(&temporary, text).unwrap();
    std::fs::rename(&temporary, &config).unwrap();
    assert!(
        eventually(Duration::from_secs(20), || {
            plugin_metric_names(&get(gateway.admin, "/stats/prometheus", "").1)
                == vec![first.clone()]
        }),
        "the reloaded stats_matcher shows only {first}"
    );
}
