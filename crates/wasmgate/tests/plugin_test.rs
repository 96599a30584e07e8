//! `wasmgate plugin test` through the binary, on real modules: the canonical plugins' own cases
//! pass, a wrong expectation fails with a readable diff, fixtures, ticks, metrics and traps are
//! checked, and a bad cases file is reported with its file and field.

mod common;

use std::path::Path;
use std::process::Output;

use common::{echo_upstream, plugin, repo, wasmgate};

fn plugin_test(module: &Path, cases: &Path, extra: &[&str]) -> Output {
    wasmgate()
        .args(["plugin", "test"])
        .arg(module)
        .arg(cases)
        .args(extra)
        .output()
        .expect("wasmgate runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn write_cases(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("cases.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

fn assert_passes(output: &Output, cases: usize) {
    let out = stdout(output);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout:\n{out}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        out.contains(&format!("{cases} cases: {cases} passed, 0 failed")),
        "{out}"
    );
}

#[test]
fn the_canonical_plugins_pass_their_own_cases() {
    for (module, cases, count) in [
        ("basic_auth", "plugins/basic-auth/tests/cases.yaml", 8),
        ("add_header", "plugins/add-header/tests/cases.yaml", 6),
        ("ext_authz", "plugins/ext-authz/tests/cases.yaml", 7),
        ("rate_limit", "plugins/rate-limit/tests/cases.yaml", 6),
    ] {
        let output = plugin_test(&plugin(module), &repo().join(cases), &[]);
        assert_passes(&output, count);
    }
}

#[test]
fn a_wrong_expectation_fails_with_a_readable_diff() {
    let dir = tempfile::tempdir().unwrap();
    let cases = write_cases(
        dir.path(),
        r#"
plugin:
  configuration: { basic_auth_rules: [ { prefix: /p, request_methods: [GET], credentials: ["ok:test"] } ] }
cases:
  - name: right
    request: { path: /p }
    expect: { response: { status: 401 } }
  - name: deliberately wrong
    request: { path: /p }
    expect:
      reaches_upstream: true
      response:
        status: 200
        headers: { x-user: alice }
        headers_absent: [www-authenticate]
        body: "first line\nsecond line\n"
      logs: [ { level: error, contains: boom } ]
"#,
    );
    let output = plugin_test(&plugin("basic_auth"), &cases, &[]);
    let out = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{out}");
    for line in [
        "ok   1 right",
        "FAIL 2 deliberately wrong",
        "     reaches_upstream: expected true, got false",
        "     response.status: expected 200, got 401",
        "     response.headers.x-user: expected \"alice\", got no such header (present: :status, www-authenticate,",
        "     response.headers_absent.www-authenticate: expected absent, got \"Basic realm=istio\"",
        "     response.body: (- expected, + got)",
        "       + No Basic Authentication information found.",
        "       - first line",
        "       - second line",
        "     logs[0]: expected a line at level error containing \"boom\", got 0 line(s), none matching",
        "2 cases: 1 passed, 1 failed",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
}

#[test]
fn fixtures_ticks_metrics_chunks_and_traps_on_the_kitchen_sink() {
    let dir = tempfile::tempdir().unwrap();
    let cases = write_cases(
        dir.path(),
        r#"
plugin:
  configuration: { header_prefix: x-k }
  log_level: debug
cases:
  - name: an http_call answered by a fixture
    request: { headers: { x-mode: http-call } }
    http_calls:
      - cluster: upstream_cluster
        path: /auth
        response: { status: 202, body: allowed }
    expect:
      http_calls: [ { cluster: upstream_cluster, method: GET, path: /auth, headers: { ":authority": auth.local }, timeout_ms: 1000 } ]
      upstream_request: { headers: { x-k-call-status: "202", x-k-call-body: allowed } }
      response: { status: 200, headers: { x-k-response: "1" } }

  - name: a failed http_call
    request: { headers: { x-mode: http-call } }
    http_calls: [ { cluster: upstream_cluster, failure: true } ]
    expect:
      upstream_request: { headers: { x-k-call-status: none } }

  - name: ticks fire the timer
    ticks: 3
    expect:
      metrics: { kitchen_ticks_total: 3 }
      logs: [ { level: info, contains: tick }, { level: debug, contains: debug line } ]
      logs_absent: [trace line]

  - name: a body in chunks is buffered, then rewritten
    request: { method: POST, headers: { x-mode: buffer-body }, body_chunks: [abc, def] }
    upstream: { status: 201, body: "created\n", trailers: { grpc-status: "0" } }
    expect:
      upstream_request: { body: ABCDEF }
      response: { status: 201, body: "created\n", trailers: { grpc-status: "0" } }

  - name: a local reply
    request: { headers: { x-mode: local-reply } }
    expect:
      reaches_upstream: false
      local_reply: true
      response: { status: 403, headers: { x-reason: denied }, body: denied by kitchen }

  - name: a panic is a trap
    request: { headers: { x-mode: panic } }
    expect: { trap: kitchen panic on purpose }

  - name: the next case gets a fresh VM
    expect:
      response: { status: 200 }
      logs: [ request headers ]

  - name: a stream paused for good stalls
    request: { headers: { x-mode: pause } }
    expect: { stalled: true, reaches_upstream: false }
"#,
    );
    let output = plugin_test(&plugin("test_kitchen_sink"), &cases, &[]);
    assert_passes(&output, 8);

    // An unanswered call, an unused fixture and an unexpected trap are failures, each said.
    let cases = write_cases(
        dir.path(),
        r#"
cases:
  - name: no fixture for the call
    request: { headers: { x-mode: http-call } }
    http_calls: [ { cluster: upstream_cluster, path: /other, response: { status: 200 } } ]
  - name: an unexpected trap
    request: { headers: { x-mode: panic } }
  - name: a configuration wrongly expected to be refused
    configuration: { header_prefix: x-ok }
    expect: { configuration_rejected: true }
"#,
    );
    let output = plugin_test(&plugin("test_kitchen_sink"), &cases, &[]);
    let out = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{out}");
    for line in [
        "     http_calls: expected a fixture for every call, got a call to upstream_cluster GET /auth that no fixture answers (answered as failed)",
        "     http_calls[0]: expected a call to upstream_cluster /other, got no such call",
        "     plugin: expected no trap, got a trap:",
        "kitchen panic on purpose",
        "     configuration_rejected: expected the plugin to refuse its configuration, got it accepted",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
}

#[test]
fn config_override_filter_and_a_plugin_from_another_sdk() {
    let dir = tempfile::tempdir().unwrap();
    let module = repo().join("plugins/test-assemblyscript/build/plugin.wasm");
    assert!(
        module.is_file(),
        "{} is missing; run scripts/build-plugins.sh",
        module.display()
    );
    let cases = write_cases(
        dir.path(),
        r#"
plugin: { configuration: from-the-file }
cases:
  - name: configured
    expect:
      upstream_request: { headers: { x-as-seen: "1", x-as-config: from-the-override } }
      response: { headers: { x-as-response: "1" } }
  - name: denied
    request: { path: /as-deny }
    expect:
      response: { status: 403, headers: { x-as-reason: denied }, body: denied by as }
"#,
    );
    let config = dir.path().join("plugin.conf");
    std::fs::write(&config, "from-the-override").unwrap();
    let output = plugin_test(
        &module,
        &cases,
        &["--config", config.to_str().unwrap(), "--filter", "config"],
    );
    assert_passes(&output, 1);
    assert!(!stdout(&output).contains("denied"));

    // A configuration the plugin refuses fails the cases that need it, saying so.
    std::fs::write(&config, "fail").unwrap();
    let output = plugin_test(&module, &cases, &["--config", config.to_str().unwrap()]);
    let out = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{out}");
    assert!(
        out.contains("plugin start: expected the plugin to start and accept its configuration"),
        "{out}"
    );
}

#[test]
fn a_yaml_or_json_config_file_reaches_the_plugin_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let cases = write_cases(
        dir.path(),
        r#"
cases:
  - name: configured from the file
    expect:
      upstream_request: { headers: { x-from-file: "yes" } }
      response: { headers_absent: [hello] }
"#,
    );
    for (name, text) in [
        (
            "config.yaml",
            "name: x-from-file\nvalue: \"yes\"\nside: request\n",
        ),
        (
            "config.json",
            r#"{"name": "x-from-file", "value": "yes", "side": "request"}"#,
        ),
    ] {
        let config = dir.path().join(name);
        std::fs::write(&config, text).unwrap();
        let output = plugin_test(
            &plugin("add_header"),
            &cases,
            &["--config", config.to_str().unwrap()],
        );
        assert_passes(&output, 1);
    }
    // A structured file that does not parse is refused, naming it.
    let config = dir.path().join("broken.yaml");
    std::fs::write(&config, "name: [unclosed").unwrap();
    let output = plugin_test(
        &plugin("add_header"),
        &cases,
        &["--config", config.to_str().unwrap()],
    );
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("broken.yaml"), "{stderr}");
}

#[test]
fn bad_inputs_exit_2_naming_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    for (text, message) in [
        (
            "cases:\n  - name: a\n    expect: { response: { status: many } }\n",
            "cases.yaml: cases[0].expect.response.status: invalid type",
        ),
        (
            "cases:\n  - name: a\n    requets: {}\n",
            "cases.yaml: cases[0]: unknown field `requets`, expected one of `name`",
        ),
        (
            "cases:\n  - name: a\n    request: { body: x, body_chunks: [y] }\n",
            "cases.yaml: cases[0].request: give body or body_chunks, not both",
        ),
    ] {
        let cases = write_cases(dir.path(), text);
        let output = plugin_test(&plugin("basic_auth"), &cases, &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(message), "missing {message:?} in {stderr}");
    }
    let cases = write_cases(dir.path(), "cases:\n  - name: a\n");
    let not_wasm = dir.path().join("not.wasm");
    std::fs::write(&not_wasm, "hello").unwrap();
    let output = plugin_test(&not_wasm, &cases, &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not.wasm"), "{stderr}");
    let output = plugin_test(&plugin("basic_auth"), &cases, &["--filter", "zzz"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no case matches --filter \"zzz\""));
}

#[test]
fn plugin_run_sends_what_the_plugin_let_through_to_a_live_upstream() {
    let upstream = echo_upstream();
    let output = wasmgate()
        .args(["plugin", "run"])
        .arg(plugin("test_kitchen_sink"))
        .args([
            "--upstream",
            &format!("http://{upstream}"),
            "--path",
            "/live",
        ])
        .args(["-H", "x-mode: remove", "-H", "x-remove-me: gone"])
        .output()
        .unwrap();
    let out = stdout(&output);
    assert!(output.status.success(), "{out}");
    for line in [
        "request headers, as the upstream received them:",
        "  + x-kitchen-seen: 1",
        "  - x-remove-me: gone",
        "    x-upstream: echo",
        "  + x-kitchen-response: 1",
        // The echo proves the edited request went over the wire, to the upstream's authority.
        "GET /live HTTP/1.1",
        "x-kitchen-seen: 1",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    assert!(
        out.to_ascii_lowercase()
            .contains(&format!("host: {upstream}")),
        "{out}"
    );
    assert!(!out.contains("x-remove-me: gone\r"), "{out}");

    // Nothing listens: the plugin still sees a 503, and the reason is printed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let output = wasmgate()
        .args(["plugin", "run"])
        .arg(plugin("test_kitchen_sink"))
        .args(["--upstream", &format!("http://{dead}")])
        .output()
        .unwrap();
    let out = stdout(&output);
    assert!(output.status.success(), "{out}");
    assert!(out.contains("upstream error (answered 503):"), "{out}");
    assert!(out.contains(":status: 503"), "{out}");

    let output = wasmgate()
        .args(["plugin", "run"])
        .arg(plugin("test_kitchen_sink"))
        .args(["--upstream", "ftp://example.com"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("the scheme must be http:// or https://")
    );
}
