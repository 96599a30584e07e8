//! Swapping a listener's filter chain while the gateway serves: new requests see the new chain at
//! once on every worker, unchanged plugins keep their VMs, and missing FAIL_CLOSE plugins deny.

mod common;

use std::net::SocketAddr;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use wasmgate_dataplane::*;

fn add_header(runtime: &wasmgate_runtime::Runtime, name: &str, value: &str) -> FilterSpec {
    filter(
        name,
        runtime,
        "add_header",
        &format!(r#"{{"name": "x-{name}", "value": "{value}"}}"#),
        FailurePolicy::FailClosed,
    )
}

/// Status, and the `x-a` and `x-b` response headers, of requests enough to reach both workers.
async fn observe(address: SocketAddr) -> Vec<(u16, Option<String>, Option<String>, String)> {
    let mut seen = Vec::new();
    for _ in 0..8 {
        // A new client (and connection) each time, so the kernel spreads them over the workers.
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let response = client
            .get(format!("http://{address}/").parse().unwrap())
            .await
            .unwrap();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        let (a, b) = (header("x-a"), header("x-b"));
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        seen.push((status, a, b, String::from_utf8_lossy(&body).into_owned()));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_chain_serves_at_once_and_unchanged_plugins_keep_their_vms() {
    let upstream = upstream().await;
    let runtime = runtime();
    let spec = GatewaySpec {
        workers: 2,
        listeners: vec![listener(
            vec![route("/", "upstream")],
            vec![add_header(&runtime, "a", "1")],
            Limits::default(),
        )],
        clusters: vec![cluster("upstream", upstream.address)],
    };
    let gateway = Gateway::start(runtime.clone(), spec);
    let handle = gateway.handle.as_ref().unwrap();
    assert!(
        observe(gateway.address)
            .await
            .iter()
            .all(|r| r.1.as_deref() == Some("1"))
    );
    assert_eq!(handle.stats.plugin_vms("a"), (2, 2));

    // Add b, keep a as it is: a's VMs stay, b gets one per worker.
    handle
        .update_chain(
            "main",
            vec![
                add_header(&runtime, "a", "1"),
                add_header(&runtime, "b", "2"),
            ],
            vec![],
        )
        .unwrap();
    for (status, a, b, _) in observe(gateway.address).await {
        assert_eq!(
            (status, a.as_deref(), b.as_deref()),
            (200, Some("1"), Some("2"))
        );
    }
    assert_eq!(handle.stats.plugin_vms("a"), (2, 2), "a was not restarted");
    assert_eq!(handle.stats.plugin_vms("b"), (2, 2));

    // Change a's configuration, drop b: a restarts with the new value, b's VMs go.
    handle
        .update_chain("main", vec![add_header(&runtime, "a", "3")], vec![])
        .unwrap();
    for (status, a, b, _) in observe(gateway.address).await {
        assert_eq!((status, a.as_deref(), b), (200, Some("3"), None));
    }
    assert_eq!(handle.stats.plugin_vms("a"), (2, 4));
    assert_eq!(handle.stats.plugin_vms("b").0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_fail_close_plugin_denies_until_it_arrives() {
    let upstream = upstream().await;
    let runtime = runtime();
    let mut main = listener(vec![route("/", "upstream")], vec![], Limits::default());
    main.missing_plugins = vec!["a".into()];
    let spec = GatewaySpec {
        workers: 2,
        listeners: vec![main],
        clusters: vec![cluster("upstream", upstream.address)],
    };
    let gateway = Gateway::start(runtime.clone(), spec);
    for (status, _, _, body) in observe(gateway.address).await {
        assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    }
    assert!(
        upstream.seen.lock().is_empty(),
        "nothing reached the upstream"
    );
    let handle = gateway.handle.as_ref().unwrap();
    handle
        .update_chain("main", vec![add_header(&runtime, "a", "1")], vec![])
        .unwrap();
    for (status, a, _, _) in observe(gateway.address).await {
        assert_eq!((status, a.as_deref()), (200, Some("1")));
    }
    assert!(matches!(
        handle.update_chain("nope", vec![], vec![]),
        Err(StartError::UnknownListener(_))
    ));
}
