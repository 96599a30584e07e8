//! Hot reload through the release binary: plugins added, changed and removed twenty times under
//! load without losing a request; a bad configuration refused whole; a bad manifest skipped alone;
//! SIGHUP; unchanged plugins keep their VMs.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use parking_lot::Mutex;

fn manifest(name: &str, wasm: &Path, header: &str, value: &str) -> String {
    format!(
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n  name: {name}\nspec:\n  url: file://{}\n  pluginConfig: {{ name: {header}, value: \"{value}\" }}\n---\n",
        wasm.display()
    )
}

/// Replaces `path` atomically, as `kubectl` or a deploy tool would, so a reload never reads half.
fn replace(path: &Path, text: &str) {
    let temporary = path.with_extension("partial");
    std::fs::write(&temporary, text).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    answer
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .map(str::trim)
}

struct Setup {
    dir: tempfile::TempDir,
    gateway: Running,
}

impl Setup {
    fn start(workers: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("plugins.d")).unwrap();
        std::fs::write(dir.path().join("gateway.yaml"), Self::yaml(workers, "/")).unwrap();
        let gateway = start_capturing(wasmgate().args([
            "run",
            "--config",
            dir.path().join("gateway.yaml").to_str().unwrap(),
        ]));
        Setup { dir, gateway }
    }

    fn yaml(workers: usize, prefix: &str) -> String {
        format!(
            "workers: {workers}\nadmin: 127.0.0.1:0\nplugins_dir: plugins.d\nlisteners:\n  - name: main\n    address: 127.0.0.1:0\n    routes: [ {{ match: {{ prefix: \"{prefix}\" }}, cluster: up }} ]\nclusters:\n  - name: up\n    endpoints: [\"{}\"]\n",
            upstream_address()
        )
    }

    fn plugins(&self, file: &str, text: &str) {
        replace(&self.dir.path().join("plugins.d").join(file), text);
    }

    /// Waits until the gateway has applied `generation` reloads.
    fn wait_generation(&self, generation: u64) {
        assert!(
            eventually(Duration::from_secs(20), || {
                metric(self.gateway.admin, "wasmgate_config_generation") >= generation
            }),
            "reload {generation} was applied; log:\n{}",
            self.gateway.stderr.lock()
        );
    }
}

/// One upstream for the whole test binary.
fn upstream_address() -> std::net::SocketAddr {
    static UPSTREAM: std::sync::OnceLock<std::net::SocketAddr> = std::sync::OnceLock::new();
    *UPSTREAM.get_or_init(|| upstream(Duration::ZERO))
}

/// Clients sending `GET /` in a loop (bounded) until stopped, each answer recorded.
struct Load {
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<(u16, String)>>>,
    clients: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(address: std::net::SocketAddr, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes: Arc<Mutex<Vec<(u16, String)>>> = Arc::default();
        let clients = (0..clients)
            .map(|_| {
                let (stop, outcomes) = (stop.clone(), outcomes.clone());
                std::thread::spawn(move || {
                    // Bounded: at most this many requests per client, however slow the machine.
                    for _ in 0..20_000 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let (status, answer) = get(address, "/", "");
                        outcomes.lock().push((status, answer));
                    }
                })
            })
            .collect();
        Load {
            stop,
            outcomes,
            clients,
        }
    }

    /// Stops the clients; every answer they got. A connection error panics in its client.
    fn finish(self) -> Vec<(u16, String)> {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            client
                .join()
                .expect("no client saw a connection error (get panics on one)");
        }
        std::mem::take(&mut *self.outcomes.lock())
    }
}

#[test]
fn plugins_added_changed_and_removed_twenty_times_under_load_lose_no_request() {
    let setup = Setup::start(2);
    let wasm = plugin("add_header");
    let address = setup.gateway.listener("main");
    let load = Load::start(address, 2);

    // Twenty changes: add a, change a, add b, change b, remove a, ... each checked by what the
    // next request carries.
    let mut expected_a: Option<String> = None;
    let mut expected_b: Option<String> = None;
    for round in 1..=20u64 {
        match round % 4 {
            1 => expected_a = Some(format!("a{round}")),
            2 => expected_b = Some(format!("b{round}")),
            3 => expected_a = None,
            _ => {
                expected_b = if round % 8 == 0 {
                    None
                } else {
                    Some(format!("b{round}"))
                }
            }
        }
        let mut text = String::new();
        if let Some(value) = &expected_a {
            text += &manifest("plugin-a", &wasm, "x-a", value);
        }
        if let Some(value) = &expected_b {
            text += &manifest("plugin-b", &wasm, "x-b", value);
        }
        setup.plugins("plugins.yaml", &text);
        setup.wait_generation(round);
        // Every worker serves the new chain now: check several fresh connections.
        for _ in 0..4 {
            let (status, answer) = get(address, "/", "");
            assert_eq!(status, 200, "{answer}");
            assert_eq!(
                header(&answer, "x-a"),
                expected_a.as_deref(),
                "round {round}: {answer}"
            );
            assert_eq!(
                header(&answer, "x-b"),
                expected_b.as_deref(),
                "round {round}: {answer}"
            );
        }
    }
    let outcomes = load.finish();
    assert!(
        outcomes.len() > 40,
        "the load ran: {} requests",
        outcomes.len()
    );
    let failed: Vec<u16> = outcomes
        .iter()
        .map(|(status, _)| *status)
        .filter(|s| *s != 200)
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        outcomes.len()
    );
    assert_eq!(
        metric(
            setup.gateway.admin,
            "wasmgate_config_reloads_total{result=\"failure\"}"
        ),
        0
    );
}

#[test]
fn a_bad_config_is_refused_whole_and_a_bad_manifest_alone() {
    let setup = Setup::start(1);
    let wasm = plugin("add_header");
    let address = setup.gateway.listener("main");
    setup.plugins("a.yaml", &manifest("plugin-a", &wasm, "x-a", "one"));
    setup.wait_generation(1);
    assert_eq!(header(&get(address, "/", "").1, "x-a"), Some("one"));

    // A gateway config that fails validation: refused, the serving one stays.
    let config = setup.dir.path().join("gateway.yaml");
    let good = std::fs::read_to_string(&config).unwrap();
    replace(&config, &good.replace("cluster: up", "cluster: nowhere"));
    assert!(eventually(Duration::from_secs(20), || {
        metric(
            setup.gateway.admin,
            "wasmgate_config_reloads_total{result=\"failure\"}",
        ) == 1
    }));
    assert!(
        setup
            .gateway
            .stderr
            .lock()
            .contains("configuration reload refused"),
        "{}",
        setup.gateway.stderr.lock()
    );
    let (status, answer) = get(address, "/", "");
    assert_eq!((status, header(&answer, "x-a")), (200, Some("one")));
    replace(&config, &good);
    setup.wait_generation(2);

    // A bad manifest beside a changed good one: the bad one is skipped, the good one applies.
    setup.plugins("a.yaml", &manifest("plugin-a", &wasm, "x-a", "two"));
    setup.plugins(
        "bad.yaml",
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n  name: bad\nspec:\n  url: ftp://nope/p.wasm\n  phse: AUTHN\n",
    );
    assert!(eventually(Duration::from_secs(20), || {
        header(&get(address, "/", "").1, "x-a") == Some("two")
    }));
    let (_, dump) = get(setup.gateway.admin, "/config_dump", "");
    assert!(dump.contains("bad.yaml") && dump.contains("phse"), "{dump}");

    // A module that does not load (a local file is part of the config): refused whole.
    let broken = setup.dir.path().join("broken.wasm");
    std::fs::write(&broken, b"\0asm\x01\0\0\0garbage").unwrap();
    let before = metric(
        setup.gateway.admin,
        "wasmgate_config_reloads_total{result=\"failure\"}",
    );
    setup.plugins("c.yaml", &manifest("plugin-c", &broken, "x-c", "c"));
    assert!(eventually(Duration::from_secs(20), || {
        metric(
            setup.gateway.admin,
            "wasmgate_config_reloads_total{result=\"failure\"}",
        ) > before
    }));
    assert_eq!(header(&get(address, "/", "").1, "x-a"), Some("two"));
}

#[test]
fn sighup_reloads_a_rebuilt_module_and_unchanged_plugins_keep_their_vms() {
    let setup = Setup::start(1);
    let module = setup.dir.path().join("plugin.wasm");
    let original = std::fs::read(plugin("add_header")).unwrap();
    std::fs::write(&module, &original).unwrap();
    let other = setup.dir.path().join("other.wasm");
    std::fs::write(&other, &original).unwrap();
    setup.plugins(
        "p.yaml",
        &(manifest("rebuilt", &module, "x-r", "r") + &manifest("steady", &other, "x-s", "s")),
    );
    setup.wait_generation(1);
    let starts = |plugin: &str| {
        metric(
            setup.gateway.admin,
            &format!("wasmgate_plugin_vm_starts_total{{plugin=\"{plugin}\"}}"),
        )
    };
    assert_eq!((starts("rebuilt"), starts("steady")), (1, 1));
    // /config_dump names each plugin's manifest, chain position, module and state.
    let (_, dump) = get(setup.gateway.admin, "/config_dump", "");
    let dump: serde_json::Value =
        serde_json::from_str(dump.split_once("\r\n\r\n").unwrap().1).unwrap();
    let entries = dump["plugins"].as_array().unwrap();
    let summary: Vec<(String, u64, String, bool)> = entries
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["chain_position"].as_u64().unwrap(),
                p["state"].as_str().unwrap().to_owned(),
                p["origin"].as_str().unwrap().contains("p.yaml (document"),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("rebuilt".into(), 0, "loaded".into(), true),
            ("steady".into(), 1, "loaded".into(), true)
        ]
    );
    assert_eq!(
        entries[0]["sha256"].as_str(),
        Some(sha256_hex(&original).as_str())
    );

    // A rebuild at the same path changes nothing the watcher looks at; SIGHUP picks it up.
    let mut rebuilt = original.clone();
    rebuilt.extend_from_slice(b"\x00\x05\x04test");
    std::fs::write(&module, &rebuilt).unwrap();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &setup.gateway.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    setup.wait_generation(2);
    let (_, plugins) = get(setup.gateway.admin, "/plugins", "");
    assert!(plugins.contains(&sha256_hex(&rebuilt)), "{plugins}");
    assert_eq!(
        (starts("rebuilt"), starts("steady")),
        (2, 1),
        "only the rebuilt plugin restarted"
    );
    let (status, answer) = get(setup.gateway.listener("main"), "/", "");
    assert_eq!(
        (status, header(&answer, "x-r"), header(&answer, "x-s")),
        (200, Some("r"), Some("s"))
    );
}

#[test]
fn routes_clusters_and_tcp_targets_change_on_reload_without_restarting_plugins() {
    let echo = echo_upstream();
    let second = fixed_upstream("second upstream");
    let kitchen = plugin("test_kitchen_sink");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    let yaml = |routes: &str, clusters: &str, tcp_cluster: &str| {
        format!(
            "workers: 1\nadmin: 127.0.0.1:0\nlisteners:\n  - name: main\n    address: 127.0.0.1:0\n    http_filters:\n      - name: kitchen\n        vm_config: {{ code: {{ local: {{ filename: {} }} }} }}\n    routes: {routes}\n  - name: tcp\n    address: 127.0.0.1:0\n    tcp_proxy: {{ cluster: {tcp_cluster} }}\nclusters:\n  - {{ name: up, endpoints: [\"{echo}\"] }}\n{clusters}",
            kitchen.display()
        )
    };
    std::fs::write(
        &config,
        yaml("[ { match: { prefix: / }, cluster: up } ]", "", "up"),
    )
    .unwrap();
    let gateway = start_capturing(wasmgate().args(["run", "--config", config.to_str().unwrap()]));
    let main = gateway.listener("main");
    let tcp = gateway.listener("tcp");
    let through_tcp = || {
        http(
            tcp,
            "GET /raw HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
        )
        .1
    };

    // No cluster `upstream_cluster` yet: the plugin's call is BAD_ARGUMENT.
    let (status, answer) = get(main, "/direct", "x-mode: http-call\r\n");
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer.contains("x-kitchen-call-error: BadArgument"),
        "{answer}"
    );
    assert!(through_tcp().contains("GET /raw HTTP/1.1"));

    replace(
        &config,
        &yaml(
            "[ { match: { path: /direct }, direct_response: { status: 418, body: teapot } }, { match: { prefix: /second }, cluster: upstream_cluster }, { match: { prefix: / }, cluster: up } ]",
            &format!("  - {{ name: upstream_cluster, endpoints: [\"{second}\"] }}\n"),
            "upstream_cluster",
        ),
    );
    assert!(
        eventually(Duration::from_secs(20), || {
            metric(gateway.admin, "wasmgate_config_generation") >= 1
        }),
        "{}",
        gateway.stderr.lock()
    );
    let (status, answer) = get(main, "/direct", "");
    assert_eq!(status, 418, "{answer}");
    assert!(answer.ends_with("teapot"), "{answer}");
    let (status, answer) = get(main, "/second/x", "");
    assert_eq!(status, 200, "{answer}");
    assert!(answer.ends_with("second upstream"), "{answer}");
    // The plugin, not restarted, now reaches the new cluster.
    let (_, answer) = get(main, "/other", "x-mode: http-call\r\n");
    assert!(answer.contains("x-kitchen-call-status: 200"), "{answer}");
    assert!(
        answer.contains("x-kitchen-call-body: second upstream"),
        "{answer}"
    );
    assert_eq!(
        metric(
            gateway.admin,
            "wasmgate_plugin_vm_starts_total{plugin=\"kitchen\"}"
        ),
        1
    );
    assert!(through_tcp().ends_with("second upstream"));
    let log = gateway.stderr.lock().clone();
    assert!(log.contains("routes and clusters updated"), "{log}");
    assert!(!log.contains("takes effect on restart"), "{log}");
    let (_, dump) = get(gateway.admin, "/config_dump", "");
    assert!(dump.contains("upstream_cluster"), "{dump}");

    // A listener whose limits change is replaced: it serves again, on its new socket.
    let current = std::fs::read_to_string(&config).unwrap();
    replace(
        &config,
        &current.replace(
            "    routes: [",
            "    limits: { idle_timeout: 60s }\n    routes: [ { match: { path: /new }, direct_response: { status: 202 } }, ",
        ),
    );
    assert!(eventually(Duration::from_secs(20), || {
        metric(gateway.admin, "wasmgate_config_generation") >= 2
    }));
    let main = listener_address(gateway.admin, "main");
    assert_eq!(get(main, "/new", "").0, 202);
    assert!(
        !gateway.stderr.lock().contains("takes effect on restart"),
        "{}",
        gateway.stderr.lock()
    );
}

/// A listener's bound address as the admin's `/listeners` tells it (`name::address` lines).
fn listener_address(admin: std::net::SocketAddr, name: &str) -> std::net::SocketAddr {
    let (status, answer) = get(admin, "/listeners", "");
    assert_eq!(status, 200, "{answer}");
    answer
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}::")))
        .unwrap_or_else(|| panic!("listener {name} in {answer}"))
        .trim()
        .parse()
        .unwrap()
}

fn listener_names(admin: std::net::SocketAddr) -> Vec<String> {
    let (_, answer) = get(admin, "/listeners", "");
    let body = answer.split_once("\r\n\r\n").unwrap().1;
    body.lines()
        .filter_map(|l| l.split_once("::").map(|(n, _)| n.to_owned()))
        .collect()
}

#[test]
fn listeners_are_added_and_removed_on_reload_and_a_removed_one_finishes_its_requests() {
    let slow = upstream(Duration::from_millis(1500));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    let listener = |name: &str, address: &str, body: &str| {
        format!(
            "  - name: {name}\n    address: {address}\n    routes:\n      - {{ match: {{ path: /slow }}, cluster: slow }}\n      - {{ match: {{ prefix: / }}, direct_response: {{ status: 200, body: {body} }} }}\n"
        )
    };
    let yaml = |listeners: &str| {
        format!(
            "workers: 2\nadmin: 127.0.0.1:0\nlisteners:\n{listeners}clusters:\n  - {{ name: slow, endpoints: [\"{slow}\"] }}\n"
        )
    };
    std::fs::write(&config, yaml(&listener("a", "127.0.0.1:0", "from-a"))).unwrap();
    let gateway = start_capturing(wasmgate().args(["run", "--config", config.to_str().unwrap()]));
    let a = gateway.listener("a");
    assert_eq!(listener_address(gateway.admin, "a"), a);

    // Added: b serves, a keeps its socket.
    replace(
        &config,
        &yaml(&(listener("a", "127.0.0.1:0", "from-a") + &listener("b", "127.0.0.1:0", "from-b"))),
    );
    assert!(eventually(Duration::from_secs(20), || listener_names(
        gateway.admin
    )
    .len()
        == 2));
    let b = listener_address(gateway.admin, "b");
    assert!(get(b, "/", "").1.ends_with("from-b"));
    assert!(get(a, "/", "").1.ends_with("from-a"));
    let (_, json) = get(gateway.admin, "/listeners?format=json", "");
    let json: serde_json::Value =
        serde_json::from_str(json.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(
        json["listener_statuses"][1]["local_address"]["socket_address"]["port_value"],
        b.port()
    );

    // Removed while a request to it is in flight: the request finishes, new connections are
    // refused.
    let in_flight = std::thread::spawn(move || get(a, "/slow", ""));
    std::thread::sleep(Duration::from_millis(300));
    replace(&config, &yaml(&listener("b", "127.0.0.1:0", "from-b")));
    assert!(eventually(Duration::from_secs(20), || listener_names(
        gateway.admin
    ) == ["b"]));
    let (status, answer) = in_flight.join().unwrap();
    assert_eq!(status, 200, "{answer}");
    assert!(answer.ends_with("upstream says hi"), "{answer}");
    assert!(
        eventually(Duration::from_secs(10), || std::net::TcpStream::connect(a)
            .is_err()),
        "a still accepts connections"
    );
    assert!(get(b, "/", "").1.ends_with("from-b"));

    // A new listener whose address is taken: the reload is refused whole, b serves on.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().to_string();
    replace(
        &config,
        &yaml(&(listener("b", "127.0.0.1:0", "changed") + &listener("c", &busy, "from-c"))),
    );
    assert!(eventually(Duration::from_secs(20), || {
        metric(
            gateway.admin,
            "wasmgate_config_reloads_total{result=\"failure\"}",
        ) == 1
    }));
    assert_eq!(listener_names(gateway.admin), ["b"]);
    assert!(
        get(b, "/", "").1.ends_with("from-b"),
        "the refused reload changed nothing"
    );
    let log = gateway.stderr.lock().clone();
    assert!(log.contains(&format!("cannot listen on {busy}")), "{log}");
    drop(taken);
}

#[test]
fn clusters_routes_and_listeners_changed_ten_times_under_load_lose_no_request() {
    let one = fixed_upstream("one");
    let two = fixed_upstream("two");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    let yaml = |round: u64| {
        let (endpoint, body) = if round.is_multiple_of(2) {
            (one, "one")
        } else {
            (two, "two")
        };
        let extra = if round % 2 == 1 {
            "  - name: extra\n    address: 127.0.0.1:0\n    routes: [ { match: { prefix: / }, direct_response: { status: 200, body: extra } } ]\n"
        } else {
            ""
        };
        let yaml = format!(
            "workers: 2\nadmin: 127.0.0.1:0\nlisteners:\n  - name: main\n    address: 127.0.0.1:0\n    routes:\n      - {{ match: {{ path: /round }}, direct_response: {{ status: 200, body: \"{round}\" }} }}\n      - {{ match: {{ prefix: / }}, cluster: up{round} }}\n{extra}clusters:\n  - {{ name: up{round}, endpoints: [\"{endpoint}\"] }}\n"
        );
        (yaml, body)
    };
    std::fs::write(&config, yaml(0).0).unwrap();
    let gateway = start_capturing(wasmgate().args(["run", "--config", config.to_str().unwrap()]));
    let address = gateway.listener("main");
    let load = Load::start(address, 2);

    for round in 1..=10u64 {
        let (text, body) = yaml(round);
        replace(&config, &text);
        // The generation counts a reload once every worker has applied all of it.
        assert!(
            eventually(Duration::from_secs(20), || {
                metric(gateway.admin, "wasmgate_config_generation") >= round
            }),
            "round {round} applied; log:\n{}",
            gateway.stderr.lock()
        );
        assert!(get(address, "/round", "").1.ends_with(&round.to_string()));
        for _ in 0..4 {
            let (status, answer) = get(address, "/", "");
            assert_eq!(status, 200, "{answer}");
            assert!(answer.ends_with(body), "round {round}: {answer}");
        }
        let names = listener_names(gateway.admin);
        assert_eq!(
            names.contains(&"extra".to_owned()),
            round % 2 == 1,
            "{names:?}"
        );
    }
    let outcomes = load.finish();
    assert!(outcomes.len() > 20, "the load ran: {}", outcomes.len());
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|(status, answer)| {
            *status != 200 || !(answer.ends_with("\r\n\r\none") || answer.ends_with("\r\n\r\ntwo"))
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        outcomes.len(),
        &failed[..failed.len().min(5)]
    );
    assert_eq!(
        metric(
            gateway.admin,
            "wasmgate_config_reloads_total{result=\"failure\"}"
        ),
        0
    );
}
