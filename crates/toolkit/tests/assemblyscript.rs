//! The AssemblyScript SDK plugin (@solo-io/proxy-runtime): a second, independent SDK against the
//! host. It speaks ABI 0.2.0, allocates with `malloc`, has no `_initialize`/`_start` (a start
//! section), and imports `wasi_unstable.proc_exit`.

mod common;

use common::*;
use wasmgate_abi::{AbiVersion, Action, LogLevel};
use wasmgate_runtime::VmError;
use wasmgate_toolkit::harness::{Harness, HarnessError, Message, RecordingHost};

fn upstream() -> impl FnMut(&Message) -> Message {
    |_: &Message| Message::response(200).header("x-upstream", "1")
}

fn header<'a>(message: &'a Message, name: &str) -> &'a str {
    message
        .headers
        .get_str(name)
        .unwrap_or_else(|| panic!("header {name} missing from {:?}", message.headers))
}

#[test]
fn module_shape_abi_0_2_0_malloc_no_start_functions() {
    let runtime = runtime();
    let module = runtime.load(&assemblyscript_plugin()).unwrap();
    assert_eq!(module.abi_version(), AbiVersion::V0_2_0);
    let info = module.info();
    assert!(info.callbacks.contains(&"malloc".to_string()));
    for absent in ["proxy_on_memory_allocate", "_initialize", "_start"] {
        assert!(
            !info.callbacks.contains(&absent.to_string()),
            "{absent} in {:?}",
            info.callbacks
        );
    }
    assert!(
        info.imports
            .contains(&"wasi_unstable.proc_exit".to_string()),
        "{:?}",
        info.imports
    );
}

#[test]
fn configures_and_edits_request_and_response_headers() {
    let mut h = harness(&assemblyscript_plugin(), "hello");
    assert_eq!(h.vm.module().abi_version(), AbiVersion::V0_2_0);
    assert_eq!(h.vm.root_context(""), Some(h.root));
    let configured = h.logs_containing("as configured");
    assert_eq!(configured, vec!["as configured: hello".to_string()]);
    let record = h
        .logs()
        .into_iter()
        .find(|r| r.message == "as configured: hello")
        .unwrap();
    assert_eq!(record.level, LogLevel::Info);
    assert_eq!(record.plugin, "test");
    assert_eq!(record.context_id, h.root);

    let request = Message::request("GET", "/hello").header("x-as-config", "from-client");
    let exchange = h.exchange(request, &mut upstream()).unwrap();
    let sent = exchange
        .upstream_request
        .as_ref()
        .expect("request reached the upstream");
    assert_eq!(header(sent, "x-as-seen"), "1");
    assert_eq!(
        sent.headers
            .get_all(b"x-as-config")
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect::<Vec<_>>(),
        vec!["hello".to_string()],
        "replace overwrote the client's value"
    );
    assert_eq!(header(sent, ":path"), "/hello");
    let response = exchange.response.as_ref().expect("a response");
    assert_eq!(header(response, ":status"), "200");
    assert_eq!(header(response, "x-as-response"), "1");
    assert_eq!(header(response, "x-upstream"), "1");
    assert!(exchange.local_response.is_none());
    assert_eq!(
        exchange.actions,
        vec![
            ("on_request_headers", Action::Continue),
            ("on_response_headers", Action::Continue),
        ]
    );

    assert_eq!(h.logs_containing("as request headers").len(), 1);
    assert_eq!(h.logs_containing("as on_log").len(), 1);
    let messages: Vec<String> = h.logs().into_iter().map(|r| r.message).collect();
    let headers_at = messages
        .iter()
        .position(|m| m == "as request headers")
        .unwrap();
    let on_log_at = messages.iter().position(|m| m == "as on_log").unwrap();
    assert!(headers_at < on_log_at, "{messages:?}");
    assert_eq!(h.vm.context_ids(), vec![h.root]);
}

#[test]
fn deny_path_sends_a_local_reply_through_the_response_callbacks() {
    let mut h = harness(&assemblyscript_plugin(), "hello");
    let exchange = h
        .exchange(
            Message::request("GET", "/as-deny"),
            &mut |_: &Message| -> Message { panic!("the upstream must not be called") },
        )
        .unwrap();
    assert!(exchange.upstream_request.is_none());
    let local = exchange.local_response.as_ref().expect("a local reply");
    assert_eq!(local.status_code, 403);
    assert_eq!(local.body, b"denied by as");
    assert_eq!(local.headers.get_str("x-as-reason"), Some("denied"));
    assert_eq!(
        local.grpc_status, None,
        "the SDK's InvalidCode (-1) is no gRPC status"
    );
    assert_eq!(exchange.actions[0], ("on_request_headers", Action::Pause));

    let response = exchange
        .response
        .as_ref()
        .expect("the client got the reply");
    assert_eq!(header(response, ":status"), "403");
    assert_eq!(header(response, "x-as-reason"), "denied");
    assert_eq!(response.body_bytes(), b"denied by as");
    // As in Envoy, the local reply went through the plugin's response callbacks.
    assert_eq!(header(response, "x-as-response"), "1");
    assert_eq!(
        exchange.actions,
        vec![
            ("on_request_headers", Action::Pause),
            ("on_response_headers", Action::Continue),
            ("on_response_body", Action::Continue),
        ]
    );
    assert!(
        h.logs_containing("as request headers").is_empty(),
        "the deny path returns before logging"
    );
    assert_eq!(h.logs_containing("as on_log").len(), 1);
    assert_eq!(h.vm.context_ids(), vec![h.root]);
    assert_eq!(h.host.recorded.lock().local_responses.len(), 1);
}

#[test]
fn configuration_fail_is_rejected() {
    let result = Harness::load(
        runtime(),
        &assemblyscript_plugin(),
        vm_config("as"),
        plugin("as-plugin", "fail"),
        RecordingHost::default(),
    );
    match result {
        Err(HarnessError::Vm(VmError::Rejected {
            plugin,
            callback,
            what,
        })) => {
            assert_eq!(plugin, "as-plugin");
            assert_eq!(callback, "proxy_on_configure");
            assert_eq!(what, "configuration");
        }
        Err(other) => panic!("expected a rejection, got {other:?}"),
        Ok(_) => panic!("configuration \"fail\" was accepted"),
    }
}

#[test]
fn reconfiguration_takes_effect_and_a_rejected_one_keeps_the_old() {
    let mut h = harness(&assemblyscript_plugin(), "hello");
    h.vm.reconfigure(h.root, b"second".to_vec()).unwrap();
    assert_eq!(h.logs_containing("as configured: second").len(), 1);
    let exchange = h
        .exchange(Message::request("GET", "/"), &mut upstream())
        .unwrap();
    assert_eq!(
        header(exchange.upstream_request.as_ref().unwrap(), "x-as-config"),
        "second"
    );

    let error = h.vm.reconfigure(h.root, b"fail".to_vec()).unwrap_err();
    assert!(
        matches!(
            error,
            VmError::Rejected {
                callback: "proxy_on_configure",
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(h.vm.failure(), None, "a rejection is not a trap");
    // The plugin kept its previous configuration.
    let exchange = h
        .exchange(Message::request("GET", "/"), &mut upstream())
        .unwrap();
    assert_eq!(
        header(exchange.upstream_request.as_ref().unwrap(), "x-as-config"),
        "second"
    );
}

#[test]
fn sequential_exchanges_on_one_vm() {
    let mut h = harness(&assemblyscript_plugin(), "hello");
    for round in 0..8 {
        let path = if round % 3 == 2 { "/as-deny" } else { "/ok" };
        let exchange = h
            .exchange(
                Message::request("POST", path).body_chunk(format!("body {round}")),
                &mut upstream(),
            )
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let response = exchange.response.as_ref().expect("a response");
        assert_eq!(header(response, "x-as-response"), "1", "round {round}");
        if path == "/as-deny" {
            assert_eq!(header(response, ":status"), "403", "round {round}");
            assert!(exchange.upstream_request.is_none());
        } else {
            assert_eq!(header(response, ":status"), "200", "round {round}");
            let sent = exchange.upstream_request.as_ref().unwrap();
            assert_eq!(header(sent, "x-as-seen"), "1", "round {round}");
            assert_eq!(sent.body_bytes(), format!("body {round}").as_bytes());
        }
        assert_eq!(
            h.vm.context_ids(),
            vec![h.root],
            "round {round}: the stream context was deleted"
        );
    }
    assert_eq!(h.logs_containing("as on_log").len(), 8);
    assert_eq!(h.logs_containing("as request headers").len(), 6);
    assert_eq!(h.host.recorded.lock().local_responses.len(), 2);
    assert_eq!(h.vm.failure(), None);
}

#[test]
fn two_vms_from_one_module_are_independent() {
    let runtime = runtime();
    let wasm = assemblyscript_plugin();
    let mut first = Harness::load(
        runtime.clone(),
        &wasm,
        vm_config("as-1"),
        plugin("first", "one"),
        RecordingHost::default(),
    )
    .unwrap();
    let mut second = Harness::load(
        runtime,
        &wasm,
        vm_config("as-2"),
        plugin("second", "two"),
        RecordingHost::default(),
    )
    .unwrap();
    assert!(std::sync::Arc::ptr_eq(
        first.vm.module(),
        second.vm.module()
    ));
    for (h, expected) in [(&mut first, "one"), (&mut second, "two")] {
        let exchange = h
            .exchange(Message::request("GET", "/"), &mut upstream())
            .unwrap();
        assert_eq!(
            header(exchange.upstream_request.as_ref().unwrap(), "x-as-config"),
            expected
        );
        assert_eq!(
            h.logs_containing("as configured"),
            vec![format!("as configured: {expected}")]
        );
    }
}
