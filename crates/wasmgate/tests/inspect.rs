//! `wasmgate plugin inspect` through the binary: real plugins (Rust SDK, AssemblyScript SDK),
//! modules importing what one host or neither provides, `--json`, and a module fetched by URL.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;

fn inspect(args: &[&str]) -> Output {
    wasmgate()
        .args(["plugin", "inspect"])
        .args(args)
        .output()
        .unwrap()
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The import table's row for `import` (module.name), split into its words.
fn row<'a>(stdout: &'a str, import: &str) -> Vec<&'a str> {
    stdout
        .lines()
        .map(str::split_whitespace)
        .map(Iterator::collect::<Vec<_>>)
        .find(|words| words.first() == Some(&import))
        .unwrap_or_else(|| panic!("no row for {import} in\n{stdout}"))
}

fn field<'a>(stdout: &'a str, name: &str) -> &'a str {
    let prefix = format!("{name}:");
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {name} in\n{stdout}"))
        .trim()
}

/// A Proxy-Wasm module of ABI `abi` (`0_2_1`, ...) with `imports` (WAT import fields), written
/// to `dir/name.wasm`. Apart from its imports, Wasmgate loads it.
fn module(dir: &Path, name: &str, abi: &str, imports: &str) -> PathBuf {
    // ABI 0.1.0's header callbacks have no end_of_stream parameter.
    let headers_params = if abi == "0_1_0" {
        "i32 i32"
    } else {
        "i32 i32 i32"
    };
    let wat = format!(
        r#"(module
            {imports}
            (memory (export "memory") 1)
            (func (export "proxy_abi_version_{abi}"))
            (func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 1024)
            (func (export "proxy_on_context_create") (param i32 i32))
            (func (export "proxy_on_vm_start") (param i32 i32) (result i32) i32.const 1)
            (func (export "proxy_on_request_headers") (param {headers_params}) (result i32) i32.const 0))"#
    );
    let path = dir.join(format!("{name}.wasm"));
    std::fs::write(&path, wat::parse_str(&wat).unwrap()).unwrap();
    path
}

#[test]
fn a_rust_sdk_plugin_links_in_both_hosts() {
    let wasm = plugin("basic_auth");
    let bytes = std::fs::read(&wasm).unwrap();
    let output = inspect(&[wasm.to_str().unwrap()]);
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stdout}{stderr}");
    assert_eq!(field(&stdout, "abi version"), "0.2.1");
    assert_eq!(field(&stdout, "sha256"), sha256_hex(&bytes));
    assert_eq!(field(&stdout, "size"), format!("{} bytes", bytes.len()));
    let callbacks = field(&stdout, "callbacks");
    for callback in [
        "proxy_on_request_headers",
        "proxy_on_configure",
        "proxy_on_memory_allocate",
        "_initialize",
    ] {
        assert!(callbacks.contains(callback), "{callback}: {callbacks}");
    }
    assert!(
        stdout.contains("wasmgate  envoy 1.40.0"),
        "the table names its columns: {stdout}"
    );
    for import in [
        "env.proxy_log",
        "env.proxy_send_local_response",
        "env.proxy_continue_stream",
        "wasi_snapshot_preview1.fd_write",
    ] {
        assert_eq!(row(&stdout, import), [import, "yes", "yes"], "{stdout}");
    }
    let wasi = field(&stdout, "wasi");
    assert!(
        wasi.starts_with("wasi_snapshot_preview1: ") && wasi.contains("fd_write"),
        "{wasi}"
    );
    assert_eq!(field(&stdout, "wasmgate"), "loads");
    assert!(
        !stderr.contains("warning:") && !stderr.contains("error:"),
        "{stderr}"
    );
}

#[test]
fn an_assemblyscript_plugin_uses_abi_0_2_0_and_wasi_unstable() {
    let wasm = repo().join("plugins/test-assemblyscript/build/plugin.wasm");
    assert!(
        wasm.is_file(),
        "{} is missing; run scripts/build-plugins.sh",
        wasm.display()
    );
    let output = inspect(&[wasm.to_str().unwrap()]);
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stdout}{stderr}");
    assert_eq!(field(&stdout, "abi version"), "0.2.0");
    assert!(field(&stdout, "callbacks").contains("malloc"), "{stdout}");
    assert_eq!(
        row(&stdout, "wasi_unstable.proc_exit"),
        ["wasi_unstable.proc_exit", "yes", "yes"]
    );
    assert_eq!(field(&stdout, "wasi"), "wasi_unstable: proc_exit");
    assert_eq!(field(&stdout, "wasmgate"), "loads");
    assert!(!stderr.contains("error:"), "{stderr}");
}

/// Imports of every verdict: both hosts (an Emscripten helper among them), neither, Wasmgate only
/// (a WASI stub, and an ABI 0.1.0 call Envoy defines for 0.1.0 modules only).
const MIXED_IMPORTS: &str = r#"
    (import "env" "proxy_log" (func (param i32 i32 i32) (result i32)))
    (import "env" "no_such_host_function" (func (param i32) (result i32)))
    (import "env" "pthread_equal" (func (param i32 i32) (result i32)))
    (import "wasi_snapshot_preview1" "proc_raise" (func (param i32) (result i32)))
    (import "wasi_snapshot_preview1" "random_get" (func (param i32 i32) (result i32)))
    (import "env" "proxy_continue_request" (func (result i32)))"#;

#[test]
fn an_import_no_host_provides_is_an_error_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = module(dir.path(), "mixed", "0_2_1", MIXED_IMPORTS);
    let output = inspect(&[wasm.to_str().unwrap()]);
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(2), "{stdout}{stderr}");
    assert_eq!(
        row(&stdout, "env.no_such_host_function"),
        ["env.no_such_host_function", "no", "no"]
    );
    assert_eq!(
        row(&stdout, "env.pthread_equal"),
        ["env.pthread_equal", "yes", "yes"]
    );
    assert_eq!(
        row(&stdout, "wasi_snapshot_preview1.proc_raise"),
        ["wasi_snapshot_preview1.proc_raise", "stub", "no"]
    );
    assert_eq!(
        row(&stdout, "env.proxy_continue_request"),
        ["env.proxy_continue_request", "yes", "no"]
    );
    assert_eq!(
        field(&stdout, "wasi"),
        "wasi_snapshot_preview1: proc_raise, random_get"
    );
    assert!(
        field(&stdout, "wasmgate").starts_with("does not load"),
        "{stdout}"
    );

    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("env.no_such_host_function") && errors[0].contains("neither"),
        "{stderr}"
    );
    let warning = |import: &str| {
        stderr
            .lines()
            .find(|l| l.starts_with(&format!("warning: {import}:")))
            .unwrap_or_else(|| panic!("no warning about {import}:\n{stderr}"))
    };
    assert!(
        warning("wasi_snapshot_preview1.proc_raise").contains("does not define it"),
        "{stderr}"
    );
    assert!(
        warning("env.proxy_continue_request").contains("only for ABI 0.1.0"),
        "{stderr}"
    );
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("warning:")).count(),
        2
    );
}

#[test]
fn imports_one_host_lacks_are_warnings_only() {
    let dir = tempfile::tempdir().unwrap();
    // Envoy defines proxy_get_log_level for ABI 0.2.1 only; both hosts have the Emscripten helpers.
    let envoy_only = module(
        dir.path(),
        "envoy-only",
        "0_2_0",
        r#"(import "env" "pthread_equal" (func (param i32 i32) (result i32)))
           (import "env" "emscripten_notify_memory_growth" (func (param i32)))
           (import "env" "proxy_get_log_level" (func (param i32) (result i32)))"#,
    );
    let output = inspect(&[envoy_only.to_str().unwrap()]);
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stdout}{stderr}");
    assert!(!stderr.contains("error:"), "{stderr}");
    assert!(!stderr.contains("pthread_equal"), "{stderr}");
    assert!(
        !stderr.contains("emscripten_notify_memory_growth"),
        "{stderr}"
    );
    assert!(
        stderr.contains("warning: env.proxy_get_log_level: Wasmgate provides it, but Envoy defines it only for ABI 0.2.1 modules"),
        "{stderr}"
    );
    assert_eq!(field(&stdout, "wasmgate"), "loads", "{stdout}{stderr}");

    // ABI 0.1.0's void continue_request: Wasmgate links it, Envoy only the status-returning form.
    let void_form = module(
        dir.path(),
        "void",
        "0_1_0",
        r#"(import "env" "proxy_continue_request" (func))"#,
    );
    let output = inspect(&[void_form.to_str().unwrap()]);
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stdout}{stderr}");
    assert_eq!(field(&stdout, "abi version"), "0.1.0");
    assert_eq!(field(&stdout, "wasmgate"), "loads");
    assert!(
        stderr.contains("warning: env.proxy_continue_request:") && stderr.contains("another type"),
        "{stderr}"
    );
}

#[test]
fn modules_no_host_loads_exit_2_and_non_modules_fail() {
    let dir = tempfile::tempdir().unwrap();
    // Proxy-Wasm modules define their own memory.
    let memory = module(
        dir.path(),
        "memory",
        "0_2_1",
        r#"(import "env" "memory" (memory 1))"#,
    );
    let output = inspect(&[memory.to_str().unwrap()]);
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(2), "{stdout}{stderr}");
    assert!(
        stderr.contains("error: env.memory: the module imports a memory"),
        "{stderr}"
    );

    let no_marker = dir.path().join("no-marker.wasm");
    std::fs::write(
        &no_marker,
        wat::parse_str(r#"(module (memory (export "memory") 1))"#).unwrap(),
    )
    .unwrap();
    let output = inspect(&[no_marker.to_str().unwrap()]);
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(2), "{stdout}{stderr}");
    assert!(
        field(&stdout, "abi version").starts_with("none"),
        "{stdout}"
    );
    assert!(
        stderr.contains("error: Wasmgate refuses the module") && stderr.contains("ABI marker"),
        "{stderr}"
    );

    let html = dir.path().join("page.wasm");
    std::fs::write(&html, "<html>not a module</html>").unwrap();
    let output = inspect(&[html.to_str().unwrap()]);
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not a Wasm module"), "{stderr}");

    let truncated = dir.path().join("truncated.wasm");
    let mut bytes = std::fs::read(plugin("basic_auth")).unwrap();
    bytes.truncate(200);
    std::fs::write(&truncated, bytes).unwrap();
    let output = inspect(&[truncated.to_str().unwrap()]);
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("not a valid WebAssembly module"),
        "{stderr}"
    );
}

#[test]
fn json_carries_the_whole_report() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = module(dir.path(), "mixed", "0_2_1", MIXED_IMPORTS);
    let bytes = std::fs::read(&wasm).unwrap();
    let output = inspect(&[wasm.to_str().unwrap(), "--json"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        output.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["source"], wasm.to_str().unwrap());
    assert_eq!(report["sha256"], sha256_hex(&bytes));
    assert_eq!(report["size"], bytes.len());
    assert_eq!(report["abi_version"], "0.2.1");
    assert_eq!(report["envoy_version"], "1.40.0");
    assert_eq!(
        report["callbacks"],
        serde_json::json!([
            "proxy_on_context_create",
            "proxy_on_memory_allocate",
            "proxy_on_request_headers",
            "proxy_on_vm_start"
        ])
    );
    let imports = report["imports"].as_array().unwrap();
    assert_eq!(imports.len(), 6);
    let import = |name: &str| {
        imports
            .iter()
            .find(|i| i["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {imports:?}"))
    };
    let log = import("proxy_log");
    assert_eq!(log["module"], "env");
    assert_eq!(log["kind"], "function");
    assert_eq!(log["type"], "(i32, i32, i32) -> (i32)");
    assert_eq!(log["wasmgate"], true);
    assert_eq!(log["envoy"], true);
    assert_eq!(log["envoy_note"], serde_json::Value::Null);
    let missing = import("no_such_host_function");
    assert_eq!(missing["wasmgate"], false);
    assert_eq!(missing["envoy"], false);
    let raise = import("proc_raise");
    assert_eq!(raise["module"], "wasi_snapshot_preview1");
    assert_eq!(raise["wasmgate"], true);
    assert_eq!(raise["wasmgate_stub"], true);
    assert_eq!(raise["envoy"], false);
    assert!(
        raise["envoy_note"]
            .as_str()
            .unwrap()
            .contains("does not define it"),
        "{raise}"
    );
    assert_eq!(import("random_get")["wasmgate_stub"], false);
    assert_eq!(import("pthread_equal")["wasmgate"], true);
    assert_eq!(
        report["wasi"],
        serde_json::json!({ "wasi_snapshot_preview1": ["proc_raise", "random_get"] })
    );
    assert_eq!(report["wasmgate_loads"], false);
    assert_eq!(report["errors"].as_array().unwrap().len(), 1);
    assert_eq!(report["warnings"].as_array().unwrap().len(), 2);

    let output = inspect(&[plugin("basic_auth").to_str().unwrap(), "--json"]);
    assert_eq!(output.status.code(), Some(0));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["wasmgate_loads"], true);
    assert_eq!(report["wasmgate_error"], serde_json::Value::Null);
    assert_eq!(report["errors"], serde_json::json!([]));
    assert_eq!(report["warnings"], serde_json::json!([]));
    assert_eq!(report["path"], serde_json::Value::Null);
}

#[test]
fn a_url_is_fetched_as_plugin_pull_fetches_it() {
    let modules = ModuleServer::start();
    let bytes = std::fs::read(plugin("basic_auth")).unwrap();
    modules.set("/plugins/basic_auth.wasm", 200, &bytes);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let url = modules.url("/plugins/basic_auth.wasm");
    let output = inspect(&[&url, "--cache-dir", cache.to_str().unwrap()]);
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stdout}{stderr}");
    assert_eq!(field(&stdout, "url"), url);
    let cached = PathBuf::from(field(&stdout, "cached"));
    assert!(cached.starts_with(&cache), "{stdout}");
    assert_eq!(std::fs::read(&cached).unwrap(), bytes);
    assert_eq!(field(&stdout, "sha256"), sha256_hex(&bytes));
    assert_eq!(field(&stdout, "abi version"), "0.2.1");

    // file:// goes through the same fetcher; a missing module is the fetcher's error.
    let local = dir.path().join("copy.wasm");
    std::fs::write(&local, &bytes).unwrap();
    let file_url = format!("file://{}", local.display());
    let output = inspect(&[&file_url, "--json", "--cache-dir", cache.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["source"], file_url);
    assert_eq!(report["sha256"], sha256_hex(&bytes));

    let missing = modules.url("/plugins/missing.wasm");
    let output = inspect(&[&missing, "--cache-dir", cache.to_str().unwrap()]);
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("404"), "{stderr}");
}
