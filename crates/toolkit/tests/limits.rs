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
    vm.stream_mut(stream).unwrap().request_headers = Some(wasmgate_abi::HeaderMap::from_pairs([
        (":method", "GET"),
        (":path", "/"),
        (":authority", "example.com"),
    ]));
    vm.on_request_headers(stream, false).unwrap();
}
