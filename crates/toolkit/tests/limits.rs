//! Limits that keep a plugin from holding a worker: a callback stuck in an endless loop is stopped
//! at the runtime's callback time limit and handled as a trap (Envoy cannot do this).

mod common;

use std::time::{Duration, Instant};

use common::*;
use wasmgate_runtime::{Runtime, RuntimeConfig, Vm, VmError};
use wasmgate_toolkit::harness::RecordingHost;

/// A plugin whose request-headers callback loops forever, and whose tick loops through calls.
const LOOPING: &str = r#"
(module
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (loop $forever (br $forever))
    (i32.const 0))
  (func $recurse_forever (param i32) (result i32)
    (loop $again (br_if $again (i32.eqz (call $deep (local.get 0)))))
    (i32.const 0))
  (func $deep (param i32) (result i32) (i32.const 0))
  (func (export "proxy_on_tick") (param i32)
    (drop (call $recurse_forever (i32.const 1))))
)
"#;

fn runtime_with_limit(limit: Duration) -> std::sync::Arc<Runtime> {
    Runtime::new(RuntimeConfig {
        callback_time_limit: limit,
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn an_endless_loop_is_stopped_at_the_time_limit_and_fails_the_vm() {
    let runtime = runtime_with_limit(Duration::from_millis(100));
    let module = runtime.load(&wat::parse_str(LOOPING).unwrap()).unwrap();
    for callback in ["headers", "tick"] {
        let mut vm = Vm::new(
            &runtime,
            &module,
            vm_config("looping"),
            Box::new(RecordingHost::default()),
        )
        .unwrap();
        let root = vm.start_plugin(plugin("looping", "")).unwrap();
        let started = Instant::now();
        let error = if callback == "headers" {
            let stream = vm.create_stream(root).unwrap();
            vm.on_request_headers(stream, false).unwrap_err()
        } else {
            vm.on_tick(root).unwrap_err()
        };
        let took = started.elapsed();
        match &error {
            VmError::Trap { message, .. } => assert!(
                message.contains("longer than the 100ms callback time limit"),
                "{message}"
            ),
            other => panic!("a trap, not {other}"),
        }
        // Stopped near the deadline: well under what a stuck worker would cost.
        assert!(
            took < Duration::from_secs(5),
            "{callback}: stopped after {took:?}"
        );
        assert!(
            vm.failure().is_some(),
            "the VM is failed, as after any trap"
        );
    }
}

#[test]
fn a_zero_limit_means_none_and_normal_plugins_run_under_the_default() {
    assert_eq!(
        RuntimeConfig::default().callback_time_limit,
        Duration::from_secs(2)
    );
    let runtime = runtime_with_limit(Duration::ZERO);
    let module = runtime.load(&rust_plugin("test_kitchen_sink")).unwrap();
    let mut vm = Vm::new(
        &runtime,
        &module,
        vm_config("kitchen"),
        Box::new(RecordingHost::default()),
    )
    .unwrap();
    let root = vm.start_plugin(plugin("kitchen", "")).unwrap();
    let stream = vm.create_stream(root).unwrap();
    vm.stream_mut(stream).unwrap().request_headers = Some(
        wasmgate_abi::HeaderMap::from_pairs([
            (":method", "GET"),
            (":path", "/"),
            (":authority", "example.com"),
        ])
        .into(),
    );
    vm.on_request_headers(stream, false).unwrap();
}

/// Grows memory a megabyte at a time until `memory.grow` fails, then aborts as an allocator does
/// (request headers); recurses without end (request body); and, for the capability allow-list,
/// calls `proxy_log` and WASI `random_get`, answering with a local reply when either is refused.
const HOSTILE: &str = r#"
(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response"
    (func $reply (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "random_get" (func $random (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "hello")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (loop $more
      (br_if $more (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
    unreachable)
  (func $recurse (param i32) (result i32)
    (i32.add (call $recurse (i32.add (local.get 0) (i32.const 1))) (i32.const 1)))
  (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32)
    (call $recurse (i32.const 0)))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (if (i32.eq (call $log (i32.const 2) (i32.const 0) (i32.const 5)) (i32.const 10))
      (then (drop (call $reply (i32.const 403) (i32.const 0) (i32.const 0) (i32.const 0)
                               (i32.const 0) (i32.const 0) (i32.const 0) (i32.const -1)))))
    (i32.const 0))
  (func (export "proxy_on_request_trailers") (param i32 i32) (result i32)
    (if (i32.eq (call $random (i32.const 64) (i32.const 4)) (i32.const 76))
      (then (drop (call $reply (i32.const 418) (i32.const 0) (i32.const 0) (i32.const 0)
                               (i32.const 0) (i32.const 0) (i32.const 0) (i32.const -1)))))
    (i32.const 0))
)
"#;

fn hostile_vm(runtime: &Runtime, config: wasmgate_runtime::VmConfig) -> (Vm, u32, RecordingHost) {
    let module = runtime.load(&wat::parse_str(HOSTILE).unwrap()).unwrap();
    let host = RecordingHost::default();
    let mut vm = Vm::new(runtime, &module, config, Box::new(host.clone())).unwrap();
    let root = vm.start_plugin(plugin("hostile", "")).unwrap();
    let stream = vm.create_stream(root).unwrap();
    (vm, stream, host)
}

fn trap_message(error: VmError) -> String {
    match error {
        VmError::Trap { message, .. } => message,
        other => panic!("a trap, not {other}"),
    }
}

#[test]
fn a_memory_bomb_stops_at_the_memory_limit_and_the_trap_says_so() {
    let runtime = Runtime::new(RuntimeConfig {
        max_memory_bytes: 4 << 20,
        ..Default::default()
    })
    .unwrap();
    let (mut vm, stream, _) = hostile_vm(&runtime, vm_config("bomb"));
    let message = trap_message(vm.on_request_headers(stream, false).unwrap_err());
    assert!(
        message.contains("memory reached the limit of 4194304 bytes")
            && message.contains("plugin_limits.max_memory_bytes"),
        "{message}"
    );
    assert!(vm.failure().is_some());
}

#[test]
fn deep_recursion_traps_at_the_stack_limit() {
    let runtime = Runtime::new(RuntimeConfig {
        max_stack_bytes: 128 << 10,
        ..Default::default()
    })
    .unwrap();
    let (mut vm, stream, _) = hostile_vm(&runtime, vm_config("deep"));
    let message = trap_message(vm.on_request_body(stream, true).unwrap_err());
    assert!(
        message.contains("more than its 131072 bytes of stack")
            && message.contains("plugin_limits.max_stack_bytes"),
        "{message}"
    );
}

#[test]
fn the_capability_allow_list_refuses_host_functions_and_hides_callbacks() {
    let runtime = Runtime::new(RuntimeConfig::default()).unwrap();
    let allowed = [
        "proxy_on_context_create",
        "proxy_on_vm_start",
        "proxy_on_configure",
        "proxy_on_response_headers",
        "proxy_on_request_trailers",
        "proxy_send_local_response",
    ];
    let restricted = wasmgate_runtime::VmConfig {
        vm_id: "restricted".into(),
        capabilities: Some(allowed.iter().map(|s| s.to_string()).collect()),
        ..Default::default()
    };
    let (mut vm, stream, host) = hostile_vm(&runtime, restricted);
    // proxy_log answers INTERNAL_FAILURE and logs nothing; the plugin replies 403 on seeing it.
    vm.on_response_headers(stream, false).unwrap();
    // WASI random_get answers NOTCAPABLE (76); the plugin replies 418.
    vm.on_request_trailers(stream).unwrap();
    // proxy_on_request_body is not allowed: never called, so its endless recursion never runs.
    vm.on_request_body(stream, true).unwrap();
    assert!(vm.failure().is_none());
    let recorded = host.recorded.lock();
    let codes: Vec<u32> = recorded
        .local_responses
        .iter()
        .map(|(_, r)| r.status_code)
        .collect();
    assert_eq!(codes, vec![403, 418]);
    assert!(recorded.logs.is_empty(), "{:?}", recorded.logs);
    drop(recorded);

    // Without a restriction the same calls succeed.
    let (mut vm, stream, host) = hostile_vm(&runtime, vm_config("free"));
    vm.on_response_headers(stream, false).unwrap();
    vm.on_request_trailers(stream).unwrap();
    let recorded = host.recorded.lock();
    assert!(recorded.local_responses.is_empty());
    assert_eq!(recorded.logs.len(), 1);
    assert_eq!(recorded.logs[0].message, "hello");
}

#[test]
fn outbound_calls_beyond_the_limit_are_refused() {
    let runtime = Runtime::new(RuntimeConfig {
        max_http_calls: 2,
        ..Default::default()
    })
    .unwrap();
    let module = runtime.load(&rust_plugin("test_kitchen_sink")).unwrap();
    let host = RecordingHost::new(vec!["upstream_cluster".into()]);
    let mut vm = Vm::new(
        &runtime,
        &module,
        vm_config("calls"),
        Box::new(host.clone()),
    )
    .unwrap();
    let root = vm.start_plugin(plugin("calls", "")).unwrap();
    let mut paused = 0;
    let mut last = 0;
    for _ in 0..3 {
        let stream = vm.create_stream(root).unwrap();
        last = stream;
        vm.stream_mut(stream).unwrap().request_headers = Some(
            wasmgate_abi::HeaderMap::from_pairs([
                (":method", "GET"),
                (":path", "/"),
                (":authority", "example.com"),
                ("x-mode", "http-call"),
            ])
            .into(),
        );
        if vm.on_request_headers(stream, false).unwrap() == wasmgate_abi::Action::Pause {
            paused += 1;
        }
    }
    assert_eq!(host.recorded.lock().http_calls.len(), 2);
    assert_eq!(
        paused, 2,
        "the third call was refused, so that stream did not wait"
    );
    let headers = vm
        .stream(last)
        .unwrap()
        .request_headers
        .as_ref()
        .unwrap()
        .snapshot();
    assert_eq!(
        headers.get_str("x-kitchen-call-error"),
        Some("InternalFailure")
    );
}
