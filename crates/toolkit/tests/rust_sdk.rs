//! The kitchen-sink plugin, written with the `proxy-wasm` Rust SDK, against the whole host.

mod common;

use std::sync::Arc;

use common::*;
use wasmgate_abi::{Action, HeaderMap, LogLevel, MetricType, Status, StreamType};
use wasmgate_runtime::{CallOutcome, PluginConfig, Vm, VmConfig, VmError};
use wasmgate_toolkit::harness::{Harness, Message, RecordingHost};

fn kitchen() -> Vec<u8> {
    rust_plugin("test_kitchen_sink")
}

fn echo_upstream() -> impl FnMut(&Message) -> Message {
    |request: &Message| {
        let mut response = Message::response(200).header("x-upstream-secret", "s3cret");
        response.body = request.body.clone();
        response
    }
}

fn header<'a>(message: &'a Message, name: &str) -> &'a str {
    message
        .headers
        .get_str(name)
        .unwrap_or_else(|| panic!("header {name} missing from {:?}", message.headers))
}

#[test]
fn edits_request_and_response_headers_and_reads_properties() {
    let mut h = harness(&kitchen(), "");
    let request = Message::request("GET", "/hello?x=1").header("x-remove-me", "1");
    let exchange = h.exchange(request, &mut echo_upstream()).unwrap();
    let sent = exchange
        .upstream_request
        .as_ref()
        .expect("request reached the upstream");
    assert_eq!(header(sent, "x-kitchen-seen"), "1");
    assert_eq!(header(sent, "x-kitchen-num-headers"), "5");
    assert_eq!(header(sent, "x-kitchen-eos"), "true");
    assert_eq!(header(sent, "x-kitchen-path"), "/hello?x=1");
    assert_eq!(header(sent, "x-kitchen-plugin-name"), "test");
    // An empty root id comes back as (null, 0), which the SDK reads as None: as with Envoy.
    assert_eq!(header(sent, "x-kitchen-root-id"), "none");
    assert_eq!(header(sent, "x-kitchen-vm-id"), "test");
    assert_eq!(
        header(sent, "x-remove-me"),
        "1",
        "only removed in remove mode"
    );
    let response = exchange.response.as_ref().unwrap();
    assert_eq!(header(response, "x-kitchen-response"), "1");
    assert_eq!(header(response, "x-kitchen-status"), "200");
    assert!(response.headers.get("x-upstream-secret").is_none());
    assert_eq!(
        exchange.actions,
        vec![
            ("on_request_headers", Action::Continue),
            ("on_response_headers", Action::Continue)
        ]
    );
    assert_eq!(h.logs_containing("on_log").len(), 1, "on_log ran once");
    assert_eq!(
        h.vm.context_ids(),
        vec![h.root],
        "the stream context was deleted"
    );
}

#[test]
fn wasi_environment_clocks_and_random() {
    let runtime = runtime();
    let vm_config = VmConfig {
        vm_id: "wasi".into(),
        environment: vec![("KITCHEN_ENV".into(), "from-plugin-config".into())],
        ..Default::default()
    };
    // The host's own environment must not leak into the plugin.
    assert!(
        std::env::var("HOME").is_ok(),
        "the test expects HOME set on the host"
    );
    let mut h = Harness::load(
        runtime,
        &kitchen(),
        vm_config,
        plugin("wasi", ""),
        RecordingHost::default(),
    )
    .unwrap();
    let mut randoms = Vec::new();
    for _ in 0..2 {
        let exchange = h
            .exchange(Message::request("GET", "/"), &mut echo_upstream())
            .unwrap();
        let sent = exchange.upstream_request.unwrap();
        assert_eq!(header(&sent, "x-kitchen-env"), "from-plugin-config");
        assert_eq!(header(&sent, "x-kitchen-home"), "unset");
        assert_eq!(header(&sent, "x-kitchen-clock"), "ok");
        assert_eq!(header(&sent, "x-kitchen-host-clock"), "ok");
        assert_eq!(header(&sent, "x-kitchen-mono"), "ok");
        let random = header(&sent, "x-kitchen-random").to_owned();
        assert_eq!(random.len(), 32);
        randoms.push(random);
    }
    assert_ne!(randoms[0], randoms[1], "random_get gives fresh bytes");
    let logs = h.logs();
    let stdout = logs
        .iter()
        .find(|r| r.message == "stdout from kitchen")
        .expect("stdout is logged");
    assert_eq!(stdout.level, LogLevel::Info);
    let stderr = logs
        .iter()
        .find(|r| r.message == "stderr from kitchen")
        .expect("stderr is logged");
    assert_eq!(stderr.level, LogLevel::Error);
}

#[test]
fn logs_respect_the_log_level() {
    let mut h = harness(&kitchen(), "");
    h.exchange(
        Message::request("GET", "/").header("x-log-warn", "1"),
        &mut echo_upstream(),
    )
    .unwrap();
    assert_eq!(h.logs_containing("trace line").len(), 1);
    assert_eq!(h.logs_containing("warn line")[0], "warn line");
    h.runtime.set_log_level(LogLevel::Warn);
    h.exchange(
        Message::request("GET", "/").header("x-log-warn", "1"),
        &mut echo_upstream(),
    )
    .unwrap();
    assert_eq!(
        h.logs_containing("trace line").len(),
        1,
        "trace is dropped at warn"
    );
    assert_eq!(
        h.logs_containing("debug line").len(),
        1,
        "debug is dropped at warn"
    );
    assert_eq!(h.logs_containing("warn line").len(), 2);
    let configured = h.logs_containing("configured: ");
    assert_eq!(configured, vec!["configured: {}".to_string()]);
}

#[test]
fn local_reply_short_circuits_and_passes_response_callbacks() {
    let mut h = harness(&kitchen(), "");
    let exchange = h
        .exchange(
            Message::request("GET", "/").header("x-mode", "local-reply"),
            &mut |_: &Message| -> Message { panic!("the upstream must not be called") },
        )
        .unwrap();
    assert!(exchange.upstream_request.is_none());
    let local = exchange.local_response.as_ref().unwrap();
    assert_eq!(local.status_code, 403);
    assert_eq!(local.body, b"denied by kitchen");
    assert_eq!(local.grpc_status, None);
    let response = exchange.response.unwrap();
    assert_eq!(header(&response, ":status"), "403");
    assert_eq!(header(&response, "x-reason"), "denied");
    assert_eq!(response.body_bytes(), b"denied by kitchen");
    // As in Envoy, the reply went through this plugin's response callbacks.
    assert_eq!(header(&response, "x-kitchen-response"), "1");
    assert_eq!(header(&response, "x-kitchen-status"), "403");
}

#[test]
fn header_map_operations() {
    let mut h = harness(&kitchen(), "");
    let exchange = h
        .exchange(
            Message::request("GET", "/")
                .header("x-mode", "remove")
                .header("x-remove-me", "1"),
            &mut echo_upstream(),
        )
        .unwrap();
    assert!(
        exchange
            .upstream_request
            .unwrap()
            .headers
            .get("x-remove-me")
            .is_none()
    );

    let request = Message::request("GET", "/")
        .header("x-mode", "replace")
        .header("x-replace-me", "a")
        .header("x-replace-me", "b");
    let sent = h
        .exchange(request, &mut echo_upstream())
        .unwrap()
        .upstream_request
        .unwrap();
    assert_eq!(
        sent.headers.get_all(b"x-replace-me").collect::<Vec<_>>(),
        vec![&b"replaced"[..]]
    );

    let request = Message::request("GET", "/")
        .header("x-mode", "pairs")
        .header("x-dup", "1")
        .header("x-dup", "2");
    let sent = h
        .exchange(request, &mut echo_upstream())
        .unwrap()
        .upstream_request
        .unwrap();
    assert_eq!(
        sent.headers.get_all(b"x-dup").count(),
        2,
        "set_pairs keeps repeated fields"
    );
    let count: usize = header(&sent, "x-pairs-count").parse().unwrap();
    assert_eq!(count, sent.headers.len() - 1);
}

#[test]
fn body_buffering_and_rewrite() {
    let mut h = harness(&kitchen(), "");
    let request = Message::request("POST", "/upload")
        .header("x-mode", "buffer-body")
        .body_chunk("hello ")
        .body_chunk("wasm ")
        .body_chunk("world");
    let exchange = h.exchange(request, &mut echo_upstream()).unwrap();
    assert_eq!(
        exchange.upstream_request.as_ref().unwrap().body_bytes(),
        b"HELLO WASM WORLD"
    );
    let body_actions: Vec<_> = exchange
        .actions
        .iter()
        .filter(|(name, _)| *name == "on_request_body")
        .map(|(_, a)| *a)
        .collect();
    assert_eq!(
        body_actions,
        vec![Action::Pause, Action::Pause, Action::Continue]
    );
    let histogram = h
        .runtime
        .shared()
        .metrics
        .find("kitchen_body_bytes")
        .unwrap();
    assert_eq!(histogram.kind, MetricType::Histogram);
    assert_eq!(histogram.histogram.unwrap().sum, 16.0);

    // Without the mode, bodies stream through unbuffered.
    let request = Message::request("POST", "/")
        .body_chunk("a")
        .body_chunk("b");
    let exchange = h.exchange(request, &mut echo_upstream()).unwrap();
    assert_eq!(exchange.upstream_request.unwrap().body_bytes(), b"ab");
    assert!(exchange.actions.iter().all(|(_, a)| *a == Action::Continue));
}

#[test]
fn response_body_rewrite_and_trailers() {
    let mut h = harness(&kitchen(), "");
    let request = Message::request("POST", "/")
        .header("x-mode", "response-body")
        .body_chunk("payload")
        .trailer("x-t", "1");
    let exchange = h
        .exchange(request, &mut |req: &Message| {
            assert_eq!(
                req.trailers.as_ref().unwrap().get_str("x-kitchen-trailer"),
                Some("1"),
                "trailer added"
            );
            Message::response(200)
                .body_chunk("part1-")
                .body_chunk("part2")
        })
        .unwrap();
    assert_eq!(
        exchange.response.unwrap().body_bytes(),
        b"part1-part2 [kitchen]"
    );
}

#[test]
fn response_path_local_reply() {
    let mut h = harness(&kitchen(), "");
    let exchange = h
        .exchange(
            Message::request("GET", "/").header("x-mode", "response-local-reply"),
            &mut echo_upstream(),
        )
        .unwrap();
    let response = exchange.response.unwrap();
    assert_eq!(header(&response, ":status"), "500");
    assert_eq!(response.body_bytes(), b"replaced response");
    assert!(exchange.upstream_request.is_some());
}

#[test]
fn http_call_pauses_and_resumes() {
    let mut h = harness(&kitchen(), "");
    h.answer_calls_with(Box::new(|call| {
        assert_eq!(call.upstream, "upstream_cluster");
        assert_eq!(call.headers.get_str(":path"), Some("/auth"));
        CallOutcome::Response {
            headers: HeaderMap::from_pairs([(":status", "200")]),
            body: b"allowed".to_vec(),
            trailers: HeaderMap::new(),
        }
    }));
    let exchange = h
        .exchange(
            Message::request("GET", "/").header("x-mode", "http-call"),
            &mut echo_upstream(),
        )
        .unwrap();
    assert_eq!(exchange.actions[0], ("on_request_headers", Action::Pause));
    let sent = exchange.upstream_request.expect("the request resumed");
    assert_eq!(header(&sent, "x-kitchen-call-status"), "200");
    assert_eq!(header(&sent, "x-kitchen-call-body"), "allowed");
    let recorded = h.host.recorded.lock();
    assert_eq!(recorded.http_calls.len(), 1);
    assert_eq!(
        recorded.continued.last().unwrap().1,
        StreamType::HttpRequest
    );
}

#[test]
fn http_call_failure_is_delivered_as_zero_headers() {
    let mut h = harness(&kitchen(), "");
    h.answer_calls_with(Box::new(|_| CallOutcome::Failure {
        message: "reset".into(),
    }));
    let exchange = h
        .exchange(
            Message::request("GET", "/").header("x-mode", "http-call"),
            &mut echo_upstream(),
        )
        .unwrap();
    let sent = exchange.upstream_request.unwrap();
    assert_eq!(header(&sent, "x-kitchen-call-status"), "none");
}

#[test]
fn http_call_to_unknown_cluster_is_bad_argument() {
    let runtime = runtime();
    let mut h = Harness::load(
        runtime,
        &kitchen(),
        vm_config("t"),
        plugin("t", ""),
        RecordingHost::new(vec![]),
    )
    .unwrap();
    let exchange = h
        .exchange(
            Message::request("GET", "/").header("x-mode", "http-call"),
            &mut echo_upstream(),
        )
        .unwrap();
    assert_eq!(
        header(
            exchange.upstream_request.as_ref().unwrap(),
            "x-kitchen-call-error"
        ),
        "BadArgument"
    );
}

#[test]
fn pause_without_resume_stalls() {
    let mut h = harness(&kitchen(), "");
    let exchange = h
        .exchange(
            Message::request("GET", "/").header("x-mode", "pause"),
            &mut echo_upstream(),
        )
        .unwrap();
    assert_eq!(exchange.stalled_in, Some("on_request_headers"));
    assert!(exchange.upstream_request.is_none());
}

#[test]
fn properties_set_and_read_back() {
    let mut h = harness(&kitchen(), "");
    let sent = h
        .exchange(
            Message::request("GET", "/").header("x-mode", "set-property"),
            &mut echo_upstream(),
        )
        .unwrap()
        .upstream_request
        .unwrap();
    assert_eq!(header(&sent, "x-kitchen-prop-readback"), "v1");
}

#[test]
fn foreign_functions_route_to_the_host() {
    let runtime = runtime();
    let host = RecordingHost::default().with_foreign_function(
        "kitchen_echo",
        Arc::new(|args: &[u8]| Ok([b"pong:".as_slice(), args].concat())),
    );
    let mut h = Harness::load(runtime, &kitchen(), vm_config("f"), plugin("f", ""), host).unwrap();
    let sent = h
        .exchange(
            Message::request("GET", "/").header("x-mode", "foreign"),
            &mut echo_upstream(),
        )
        .unwrap()
        .upstream_request
        .unwrap();
    assert_eq!(header(&sent, "x-kitchen-foreign"), "pong:ping");

    // Unknown foreign functions answer NOT_FOUND.
    let mut h = harness(&kitchen(), "");
    let sent = h
        .exchange(
            Message::request("GET", "/").header("x-mode", "foreign"),
            &mut echo_upstream(),
        )
        .unwrap()
        .upstream_request
        .unwrap();
    assert_eq!(header(&sent, "x-kitchen-foreign"), "err:NotFound");
}

#[test]
fn metrics_counters_gauges_histograms() {
    let mut h = harness(&kitchen(), "");
    for _ in 0..3 {
        h.exchange(Message::request("GET", "/"), &mut echo_upstream())
            .unwrap();
    }
    let metrics = &h.runtime.shared().metrics;
    assert_eq!(metrics.find("kitchen_requests_total").unwrap().value, 3);
    assert_eq!(
        metrics.find("kitchen_inflight").unwrap().value,
        0,
        "incremented per request, decremented in on_log"
    );
    let sent = h
        .exchange(
            Message::request("GET", "/").header("x-mode", "get-metric"),
            &mut echo_upstream(),
        )
        .unwrap()
        .upstream_request
        .unwrap();
    assert_eq!(header(&sent, "x-kitchen-metric"), "4");
}

#[test]
fn shared_data_cas_is_process_wide_across_vms_and_threads() {
    let runtime = runtime();
    let module = runtime.load(&kitchen()).unwrap();
    // The plugin creates a missing key without a CAS (the SDK passes cas 0 when the get found
    // nothing, as in Envoy), so two first writers could both win; seed the key so every update
    // goes through compare-and-swap.
    runtime
        .shared()
        .data
        .set("shared", b"kitchen_counter", b"0", 0);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let runtime = runtime.clone();
            let module = module.clone();
            std::thread::spawn(move || {
                let mut h = Harness::new(
                    runtime,
                    &module,
                    vm_config("shared"),
                    plugin("shared", ""),
                    RecordingHost::default(),
                )
                .unwrap();
                for _ in 0..25 {
                    h.exchange(Message::request("GET", "/"), &mut echo_upstream())
                        .unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let (value, _) = runtime
        .shared()
        .data
        .get("shared", b"kitchen_counter")
        .unwrap();
    assert_eq!(value, b"100", "every increment survived the CAS races");
    assert!(
        runtime
            .shared()
            .data
            .get("other-vm", b"kitchen_counter")
            .is_none()
    );
}

#[test]
fn queues_deliver_on_queue_ready_to_the_owner_vm() {
    let runtime = runtime();
    let module = runtime.load(&kitchen()).unwrap();
    let config = r#"{"queue": "paths"}"#;
    // The owner registers the queue at configure time; a second VM enqueues from a request.
    let mut owner = Harness::new(
        runtime.clone(),
        &module,
        vm_config("q"),
        plugin("owner", config),
        RecordingHost::default(),
    )
    .unwrap();
    let woken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = woken.clone();
    owner.vm.set_queue_waker(Arc::new(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }));
    let mut producer = Harness::new(
        runtime.clone(),
        &module,
        vm_config("q"),
        plugin("producer", config),
        RecordingHost::default(),
    )
    .unwrap();
    // The producer registered last, so it now owns the queue; the owner registers again to take it back.
    owner
        .vm
        .reconfigure(owner.root, config.as_bytes().to_vec())
        .unwrap();
    producer
        .exchange(Message::request("GET", "/queued"), &mut echo_upstream())
        .unwrap();
    assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(owner.vm.has_queue_events());
    assert!(!producer.vm.has_queue_events());
    assert_eq!(owner.vm.deliver_queue_ready().unwrap(), 1);
    assert_eq!(
        owner.logs_containing("queue message: "),
        vec!["queue message: /queued".to_string()]
    );
    let (last, _) = runtime
        .shared()
        .data
        .get("q", b"kitchen_last_queue_message")
        .unwrap();
    assert_eq!(last, b"/queued");
}

#[test]
fn ticks_follow_the_tick_period() {
    let mut h = harness(&kitchen(), r#"{"tick_ms": 25}"#);
    assert_eq!(
        h.vm.tick_period(h.root),
        Some(std::time::Duration::from_millis(25))
    );
    assert_eq!(
        h.vm.tick_periods(),
        vec![(h.root, std::time::Duration::from_millis(25))]
    );
    h.vm.on_tick(h.root).unwrap();
    h.vm.on_tick(h.root).unwrap();
    assert_eq!(
        h.runtime
            .shared()
            .metrics
            .find("kitchen_ticks_total")
            .unwrap()
            .value,
        2
    );
    assert_eq!(h.logs().iter().filter(|r| r.message == "tick").count(), 2);
    let h2 = harness(&kitchen(), "");
    assert_eq!(h2.vm.tick_period(h2.root), None);
}

#[test]
fn false_from_on_vm_start_or_on_configure_rejects_the_plugin() {
    let runtime = runtime();
    let module = runtime.load(&kitchen()).unwrap();
    let failing = VmConfig {
        vm_id: "r".into(),
        configuration: b"fail".to_vec(),
        ..Default::default()
    };
    let mut vm = Vm::new(
        &runtime,
        &module,
        failing,
        Box::new(RecordingHost::default()),
    )
    .unwrap();
    let error = vm.start_plugin(plugin("rejecting-vm", "")).unwrap_err();
    assert!(
        matches!(
            error,
            VmError::Rejected {
                callback: "proxy_on_vm_start",
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("rejecting-vm"), "{error}");
    assert!(vm.context_ids().is_empty());

    let mut vm = Vm::new(
        &runtime,
        &module,
        vm_config("r"),
        Box::new(RecordingHost::default()),
    )
    .unwrap();
    let error = vm
        .start_plugin(plugin("rejecting-config", "fail"))
        .unwrap_err();
    assert!(
        matches!(
            error,
            VmError::Rejected {
                callback: "proxy_on_configure",
                ..
            }
        ),
        "{error}"
    );
    let error = vm
        .start_plugin(plugin("bad-json", "{not json"))
        .unwrap_err();
    assert!(error.to_string().contains("returned false"), "{error}");
    // The VM itself is still good for a valid plugin.
    vm.start_plugin(plugin("fine", "{}")).unwrap();
}

/// A debug build keeps DWARF: the backtrace then names the guest's source file and line, as
/// Envoy's "Proxy-Wasm plugin in-VM backtrace" does.
#[test]
fn a_trap_backtrace_has_file_and_line_where_the_module_has_dwarf() {
    let debug_build = std::fs::read(
        common::repo_root().join("plugins/target/wasm32-wasip1/debug/test_kitchen_sink.wasm"),
    )
    .expect("scripts/build-plugins.sh builds a debug kitchen sink");
    let mut h = harness(&debug_build, "");
    let error = h
        .exchange(
            Message::request("GET", "/").header("x-mode", "panic"),
            &mut echo_upstream(),
        )
        .unwrap_err();
    match error {
        wasmgate_toolkit::harness::HarnessError::Vm(VmError::Trap { backtrace, .. }) => {
            let backtrace = backtrace.expect("a backtrace");
            assert!(
                backtrace.contains("test-kitchen-sink/src/lib.rs:"),
                "file and line from DWARF: {backtrace}"
            );
        }
        other => panic!("expected a trap, got {other}"),
    }
}

#[test]
fn a_panic_traps_and_fails_the_vm() {
    let mut h = harness(&kitchen(), "");
    let error = h
        .exchange(
            Message::request("GET", "/").header("x-mode", "panic"),
            &mut echo_upstream(),
        )
        .unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("trap in proxy_on_request_headers"),
        "{message}"
    );
    match error {
        wasmgate_toolkit::harness::HarnessError::Vm(VmError::Trap { backtrace, .. }) => {
            let backtrace = backtrace.expect("a backtrace");
            assert!(
                backtrace.contains("test_kitchen_sink"),
                "names from the name section: {backtrace}"
            );
        }
        other => panic!("expected a trap, got {other}"),
    }
    assert!(
        h.logs_containing("kitchen panic on purpose").len() == 1,
        "the SDK logged the panic first"
    );
    assert!(h.vm.failure().is_some());
    let again = h
        .exchange(Message::request("GET", "/"), &mut echo_upstream())
        .unwrap_err();
    assert!(again.to_string().contains("failed earlier"), "{again}");
}

#[test]
fn several_plugins_in_one_vm_and_several_vms() {
    let runtime = runtime();
    let module = runtime.load(&rust_plugin("test_multi_root")).unwrap();
    let mut vm = Vm::new(
        &runtime,
        &module,
        vm_config("multi"),
        Box::new(RecordingHost::default()),
    )
    .unwrap();
    let first = vm
        .start_plugin(PluginConfig {
            name: "a".into(),
            root_id: "alpha".into(),
            configuration: vec![],
        })
        .unwrap();
    let second = vm
        .start_plugin(PluginConfig {
            name: "b".into(),
            root_id: "beta".into(),
            configuration: vec![],
        })
        .unwrap();
    assert_ne!(first, second);
    assert!(
        vm.start_plugin(PluginConfig {
            name: "c".into(),
            root_id: "alpha".into(),
            configuration: vec![]
        })
        .is_err()
    );
    let rejected = vm.start_plugin(PluginConfig {
        name: "r".into(),
        root_id: "reject".into(),
        configuration: vec![],
    });
    assert!(matches!(rejected, Err(VmError::Rejected { .. })));
    let mut seen = Vec::new();
    for root in [first, second] {
        let ctx = vm.create_stream(root).unwrap();
        vm.stream_mut(ctx).unwrap().request_headers =
            Some(HeaderMap::from_pairs([(":path", "/")]).into());
        assert_eq!(vm.on_request_headers(ctx, true).unwrap(), Action::Continue);
        let headers = vm
            .stream(ctx)
            .unwrap()
            .request_headers
            .as_ref()
            .unwrap()
            .snapshot();
        seen.push((
            headers.get_str("x-root-id").unwrap().to_owned(),
            headers.get_str("x-context-id").unwrap().to_owned(),
        ));
        vm.finish_http_stream(ctx).unwrap();
    }
    assert_eq!(seen[0].0, "alpha");
    assert_eq!(seen[1].0, "beta");
    assert_ne!(seen[0].1, seen[1].1, "context ids are unique per VM");
    // A second VM of the same module is independent and numbers its own contexts.
    let mut other = Vm::new(
        &runtime,
        &module,
        vm_config("multi-2"),
        Box::new(RecordingHost::default()),
    )
    .unwrap();
    let root = other
        .start_plugin(PluginConfig {
            name: "a".into(),
            root_id: "alpha".into(),
            configuration: vec![],
        })
        .unwrap();
    assert_eq!(root, 1);
    assert!(vm.stop_plugin(first).unwrap());
    assert_eq!(vm.root_context("alpha"), None);
    assert_eq!(vm.root_context("beta"), Some(second));
}

#[test]
fn unknown_contexts_and_tokens_are_errors_not_panics() {
    let mut h = harness(&kitchen(), "");
    assert!(matches!(
        h.vm.on_request_headers(999, true),
        Err(VmError::UnknownContext(999))
    ));
    assert!(
        matches!(
            h.vm.on_request_headers(h.root, true),
            Err(VmError::UnknownContext(_))
        ),
        "a root is not a stream"
    );
    assert!(matches!(
        h.vm.on_http_call_response(
            42,
            CallOutcome::Failure {
                message: String::new()
            }
        ),
        Err(VmError::UnknownToken(42))
    ));
    assert!(matches!(
        h.vm.create_stream(77),
        Err(VmError::UnknownContext(77))
    ));
    let _ = Status::Ok;
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn properties_with_envoy_names_and_encodings() {
    use std::net::SocketAddr;
    let mut h = harness(&kitchen(), "");
    h.stream_info = wasmgate_abi::StreamInfo {
        source: Some("10.1.2.3:40000".parse::<SocketAddr>().unwrap()),
        destination: Some("127.0.0.1:8080".parse().unwrap()),
        connection_id: Some(7),
        mtls: true,
        protocol: Some("HTTP/1.1".into()),
        start_time: Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(5)),
        cluster_name: Some("backend".into()),
        route_name: Some("default".into()),
        node_id: Some("gateway-1".into()),
        ..Default::default()
    };
    let mut probe = |path: &str| -> String {
        let request = Message::request("POST", "/a/b?q=1&r=2")
            .header("x-mode", "property")
            .header("x-property-path", path)
            .header("x-foo", "one")
            .header("x-foo", "two")
            .header("x-request-id", "rid-1");
        let exchange = h.exchange(request, &mut echo_upstream()).unwrap();
        exchange
            .upstream_request
            .unwrap()
            .headers
            .get_str("x-kitchen-property")
            .unwrap()
            .to_owned()
    };
    let text = |s: &str| hex(s.as_bytes());
    assert_eq!(probe("request.path"), text("/a/b?q=1&r=2"));
    assert_eq!(probe("request.url_path"), text("/a/b"));
    assert_eq!(probe("request.query"), text("q=1&r=2"));
    assert_eq!(probe("request.host"), text("example.com"));
    assert_eq!(probe("request.method"), text("POST"));
    assert_eq!(probe("request.scheme"), text("http"));
    assert_eq!(probe("request.id"), text("rid-1"));
    assert_eq!(probe("request.protocol"), text("HTTP/1.1"));
    assert_eq!(
        probe("request.headers.x-foo"),
        text("one,two"),
        "repeated headers are comma-joined"
    );
    assert_eq!(probe("request.time"), hex(&5_000_000_000i64.to_le_bytes()));
    assert_eq!(probe("source.address"), text("10.1.2.3:40000"));
    assert_eq!(probe("source.port"), hex(&40000i64.to_le_bytes()));
    assert_eq!(probe("destination.port"), hex(&8080i64.to_le_bytes()));
    assert_eq!(probe("connection.id"), hex(&7u64.to_le_bytes()));
    assert_eq!(probe("connection.mtls"), "01");
    assert_eq!(probe("xds.cluster_name"), text("backend"));
    assert_eq!(probe("xds.route_name"), text("default"));
    assert_eq!(probe("xds.node.id"), text("gateway-1"));
    assert_eq!(probe("plugin_vm_id"), text("test"));
    assert_eq!(probe("plugin_name"), text("test"));
    assert_eq!(probe("response.code"), "none", "no response yet");
    assert_eq!(probe("no.such.property"), "none");
    assert_eq!(
        probe("upstream.address"),
        "none",
        "unknown facts are NOT_FOUND"
    );
    let map = probe("request.headers");
    let decoded_bytes: Vec<u8> = (0..map.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&map[i..i + 2], 16).unwrap())
        .collect();
    let decoded = HeaderMap::decode(&decoded_bytes).unwrap();
    assert_eq!(decoded.get_str(":path"), Some("/a/b?q=1&r=2"));
    assert_eq!(decoded.get_str("x-foo"), Some("one,two"));
}

#[test]
fn grpc_unary_call_round_trip() {
    let mut h = harness(&kitchen(), "");
    let ctx = h.vm.create_stream(h.root).unwrap();
    h.vm.stream_mut(ctx).unwrap().request_headers =
        Some(HeaderMap::from_pairs([(":path", "/"), ("x-mode", "grpc-call")]).into());
    assert_eq!(h.vm.on_request_headers(ctx, true).unwrap(), Action::Pause);
    let (token, call) = {
        let recorded = h.host.recorded.lock();
        let (_, token, call) = recorded
            .grpc_calls
            .last()
            .cloned()
            .expect("a gRPC call was made");
        (token, call)
    };
    assert_eq!(call.service, "kitchen.Echo");
    assert_eq!(call.method, "Say");
    assert_eq!(call.message, b"grpc ping");
    assert_eq!(call.timeout_ms, 1000);
    assert_eq!(call.initial_metadata.get_str("x-grpc-meta"), Some("1"));
    h.vm.on_grpc_receive(token, b"grpc pong".to_vec()).unwrap();
    let headers =
        h.vm.stream(ctx)
            .unwrap()
            .request_headers
            .as_ref()
            .unwrap()
            .snapshot();
    assert_eq!(headers.get_str("x-kitchen-grpc-message"), Some("grpc pong"));
    assert_eq!(headers.get_str("x-kitchen-grpc-status"), Some("0"));
    assert!(
        h.host
            .recorded
            .lock()
            .continued
            .contains(&(ctx, StreamType::HttpRequest))
    );
    h.vm.on_grpc_close(token, 0, "").unwrap();
    assert!(
        matches!(
            h.vm.on_grpc_receive(token, vec![]),
            Err(VmError::UnknownToken(_))
        ),
        "closed calls are forgotten"
    );
    h.vm.finish_http_stream(ctx).unwrap();
}

#[test]
fn grpc_stream_round_trip() {
    let mut h = harness(&kitchen(), "");
    let ctx = h.vm.create_stream(h.root).unwrap();
    h.vm.stream_mut(ctx).unwrap().request_headers =
        Some(HeaderMap::from_pairs([(":path", "/"), ("x-mode", "grpc-stream")]).into());
    assert_eq!(h.vm.on_request_headers(ctx, true).unwrap(), Action::Pause);
    let token = h.host.recorded.lock().grpc_streams.last().unwrap().1;
    assert_eq!(
        h.host.recorded.lock().grpc_sent,
        vec![(token, b"first".to_vec(), false)]
    );
    h.vm.on_grpc_receive_initial_metadata(token, HeaderMap::from_pairs([("x-stream-meta", "m")]))
        .unwrap();
    h.vm.on_grpc_receive(token, b"reply".to_vec()).unwrap();
    assert_eq!(
        h.host.recorded.lock().grpc_sent[1],
        (token, b"second".to_vec(), true)
    );
    h.vm.on_grpc_receive_trailing_metadata(
        token,
        HeaderMap::from_pairs([("x-stream-trailer", "t")]),
    )
    .unwrap();
    h.vm.on_grpc_close(token, 14, "unavailable").unwrap();
    let headers =
        h.vm.stream(ctx)
            .unwrap()
            .request_headers
            .as_ref()
            .unwrap()
            .snapshot();
    assert_eq!(headers.get_str("x-kitchen-grpc-stream-meta"), Some("m"));
    assert_eq!(
        headers.get_str("x-kitchen-grpc-stream-message"),
        Some("reply")
    );
    assert_eq!(headers.get_str("x-kitchen-grpc-stream-trailer"), Some("t"));
    assert_eq!(
        headers.get_str("x-kitchen-grpc-stream-close"),
        Some("14:unavailable")
    );
    h.vm.finish_http_stream(ctx).unwrap();
}

#[test]
fn grpc_to_unknown_upstream_is_parse_failure() {
    let runtime = runtime();
    let mut h = Harness::load(
        runtime,
        &kitchen(),
        vm_config("g"),
        plugin("g", ""),
        RecordingHost::new(vec![]),
    )
    .unwrap();
    let exchange = h
        .exchange(
            Message::request("GET", "/").header("x-mode", "grpc-call"),
            &mut echo_upstream(),
        )
        .unwrap();
    assert_eq!(
        header(
            exchange.upstream_request.as_ref().unwrap(),
            "x-kitchen-grpc-error"
        ),
        "ParseFailure"
    );
}
