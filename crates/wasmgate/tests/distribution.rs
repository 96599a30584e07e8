//! Module distribution through the release binary: `plugin push` and `plugin pull` against a real
//! registry (plain, htpasswd, TLS) in each image layout, the gateway serving plugins from OCI and
//! HTTP, and failed fetches that never break traffic.

mod common;

#[path = "../../fetch/tests/common/registry.rs"]
mod registry;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::*;
use registry::{Mode, TestRegistry};

fn run(args: &[&str]) -> Output {
    wasmgate().args(args).output().unwrap()
}

fn ok(output: Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "wasmgate failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn tokio() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// A WasmPlugin manifest adding `header: value` to responses, from `url`.
fn manifest(name: &str, url: &str, header: &str, extra: &str) -> String {
    format!(
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n  name: {name}\nspec:\n  url: {url}\n{extra}  pluginConfig: {{ name: {header}, value: {name} }}\n---\n"
    )
}

/// A gateway config routing `/` to `upstream`, with `extra` top-level YAML.
fn gateway_yaml(upstream: std::net::SocketAddr, listeners: &str, extra: &str) -> String {
    format!(
        "workers: 1\nadmin: 127.0.0.1:0\n{extra}\nlisteners:\n{listeners}\nclusters:\n  - name: up\n    endpoints: [\"{upstream}\"]\n"
    )
}

fn listener(name: &str, filters: &str) -> String {
    format!(
        "  - name: {name}\n    address: 127.0.0.1:0\n    routes: [ {{ match: {{ prefix: / }}, cluster: up }} ]\n    http_filters:\n{filters}"
    )
}

fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    answer
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .map(str::trim)
}

/// A plugin's `state` and `sha256` in the admin `/plugins`.
fn plugin_state(admin: std::net::SocketAddr, name: &str) -> (String, Option<String>) {
    let (_, answer) = get(admin, "/plugins", "");
    let body = answer.split_once("\r\n\r\n").expect("a body").1;
    let plugins: serde_json::Value = serde_json::from_str(body).expect("JSON");
    let plugin = plugins
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("{name} in {body}"));
    (
        plugin["state"].as_str().unwrap().to_owned(),
        plugin["sha256"].as_str().map(str::to_owned),
    )
}

fn push(file: &Path, reference: &str, variant: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "plugin",
        "push",
        file.to_str().unwrap(),
        reference,
        "--variant",
        variant,
    ];
    args.extend_from_slice(extra);
    let stdout = ok(run(&args));
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("digest "))
        .expect("push prints the digest")
        .to_owned()
}

#[test]
fn push_pull_and_serve_every_image_layout_from_a_real_registry() {
    let io = tokio();
    let registry = io.block_on(TestRegistry::start(Mode::Plain));
    let address = registry.address.clone();
    let wasm = plugin("add_header");
    let module_sha = sha256_hex(&std::fs::read(&wasm).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let mut manifests = String::new();
    for variant in ["compat", "artifact", "docker"] {
        let reference = format!("oci://{address}/plugins/add-header:{variant}");
        let digest = push(
            &wasm,
            &reference,
            variant,
            &["--insecure-registry", &address],
        );
        assert!(digest.starts_with("sha256:"), "{digest}");
        let pulled = ok(run(&[
            "plugin",
            "pull",
            &reference,
            "--insecure-registry",
            &address,
            "--cache-dir",
            cache.to_str().unwrap(),
        ]));
        assert!(pulled.contains(&format!("sha256 {module_sha}")), "{pulled}");
        assert!(pulled.contains(&format!("digest {digest}")), "{pulled}");
        let path = pulled.lines().next().unwrap();
        assert_eq!(sha256_hex(&std::fs::read(path).unwrap()), module_sha);
        // Istio compares `sha256` with the manifest digest; a scheme-less reference is OCI.
        let pinned = format!("  sha256: {}\n", digest.trim_start_matches("sha256:"));
        manifests.push_str(&manifest(
            &format!("from-{variant}"),
            &format!("{address}/plugins/add-header:{variant}"),
            &format!("x-{variant}"),
            &pinned,
        ));
    }
    let listed = ok(run(&[
        "plugin",
        "cache",
        "ls",
        "--cache-dir",
        cache.to_str().unwrap(),
    ]));
    assert_eq!(
        listed.lines().count(),
        1,
        "one module, whatever the layout: {listed}"
    );
    assert!(listed.contains(&module_sha), "{listed}");

    let plugins = dir.path().join("plugins.d");
    std::fs::create_dir(&plugins).unwrap();
    std::fs::write(plugins.join("oci.yaml"), manifests).unwrap();
    let yaml = gateway_yaml(
        upstream(Duration::ZERO),
        &listener("main", "      []\n"),
        &format!(
            "plugins_dir: plugins.d\ninsecure_registries: [\"{address}\"]\nmodule_cache: {{ dir: {} }}\n",
            dir.path().join("gateway-cache").display()
        ),
    );
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, yaml).unwrap();
    let gateway = start(&["run", "--config", config.to_str().unwrap()]);
    let (status, answer) = get(gateway.listener("main"), "/", "");
    assert_eq!(status, 200, "{answer}");
    for variant in ["compat", "artifact", "docker"] {
        assert_eq!(
            header(&answer, &format!("x-{variant}")),
            Some(format!("from-{variant}").as_str()),
            "{answer}"
        );
    }
    let (_, plugins) = get(gateway.admin, "/plugins", "");
    assert!(
        plugins.contains(&module_sha) && !plugins.contains("\"state\": \"failed\""),
        "{plugins}"
    );
    let (_, stats) = get(gateway.admin, "/stats/prometheus", "");
    assert!(
        stats.contains("wasm_remote_fetch_count{result=\"success\"} 3"),
        "{stats}"
    );
    assert!(stats.contains("wasm_cache_entries 1"), "{stats}");
    assert!(
        stats.contains("wasm_config_conversion_duration_count 1"),
        "{stats}"
    );
}

#[test]
fn pull_secrets_and_a_tls_registry_with_its_ca() {
    let io = tokio();
    let (user, password) = ("wasm-user", "s3cret-pass");
    let locked = io.block_on(TestRegistry::start(Mode::Htpasswd {
        username: user.into(),
        password: password.into(),
    }));
    let tls = io.block_on(TestRegistry::start(Mode::Tls));
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, tls.ca_pem.as_ref().unwrap()).unwrap();
    let wasm = plugin("add_header");
    let module_sha = sha256_hex(&std::fs::read(&wasm).unwrap());
    let secrets = dir.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    let docker_config = secrets.join("registry-pull-secret");
    std::fs::write(
        &docker_config,
        format!(
            r#"{{"auths": {{"{}": {{"username": "{user}", "password": "{password}"}}}}}}"#,
            locked.address
        ),
    )
    .unwrap();

    // Every layout: pushed with a user name and the password from the environment, then over
    // TLS with the CA; pulled back with the credentials from a Docker config, and with the CA.
    let pull = |reference: &str, flags: &[&str], cache: &str| {
        let mut args = vec![
            "plugin",
            "pull",
            reference,
            "--cache-dir",
            dir.path().join(cache).to_str().unwrap(),
        ]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
        args.extend(flags.iter().map(|f| (*f).to_owned()));
        wasmgate().args(&args).output().unwrap()
    };
    let ca_file = ca.to_str().unwrap();
    let config_file = docker_config.to_str().unwrap();
    for variant in ["compat", "artifact", "docker"] {
        let locked_ref = format!("oci://{}/private/add-header:{variant}", locked.address);
        let output = wasmgate()
            .args(["plugin", "push", wasm.to_str().unwrap(), &locked_ref])
            .args(["--variant", variant])
            .args(["--insecure-registry", &locked.address, "--username", user])
            .env("WASMGATE_REGISTRY_PASSWORD", password)
            .output()
            .unwrap();
        let pushed = ok(output);
        let tls_ref = format!("oci://{}/secure/add-header:{variant}", tls.address);
        let tls_digest = push(&wasm, &tls_ref, variant, &["--ca-file", ca_file]);
        let insecure = ["--insecure-registry", locked.address.as_str()];
        let output = pull(
            &locked_ref,
            &[&insecure[..], &["--docker-config", config_file]].concat(),
            &format!("locked-{variant}"),
        );
        assert!(
            !String::from_utf8_lossy(&output.stderr).contains(password),
            "the password leaked"
        );
        let pulled = ok(output);
        assert!(pulled.contains(&format!("sha256 {module_sha}")), "{pulled}");
        let digest = pushed
            .lines()
            .find_map(|l| l.strip_prefix("digest "))
            .unwrap();
        assert!(pulled.contains(&format!("digest {digest}")), "{pulled}");
        let anonymous = pull(&locked_ref, &insecure, &format!("anonymous-{variant}"));
        let message = String::from_utf8_lossy(&anonymous.stderr);
        assert!(!anonymous.status.success());
        assert!(message.contains("requires credentials"), "{message}");
        let pulled = ok(pull(
            &tls_ref,
            &["--ca-file", ca_file],
            &format!("tls-{variant}"),
        ));
        assert!(pulled.contains(&format!("sha256 {module_sha}")), "{pulled}");
        assert!(pulled.contains(&format!("digest {tls_digest}")), "{pulled}");
    }
    let locked_ref = format!("oci://{}/private/add-header:compat", locked.address);
    let tls_ref = format!("oci://{}/secure/add-header:compat", tls.address);
    let refused = run(&[
        "plugin",
        "push",
        wasm.to_str().unwrap(),
        &locked_ref,
        "--insecure-registry",
        &locked.address,
    ]);
    assert!(!refused.status.success(), "anonymous push is refused");
    let untrusted = run(&[
        "plugin",
        "pull",
        &tls_ref,
        "--cache-dir",
        dir.path().join("c").to_str().unwrap(),
    ]);
    let message = String::from_utf8_lossy(&untrusted.stderr);
    assert!(!untrusted.status.success());
    assert!(message.to_lowercase().contains("certificate"), "{message}");

    // The gateway: the secret from pull_secrets_dir, the CA from module_fetch.ca_files.
    let plugins = dir.path().join("plugins.d");
    std::fs::create_dir(&plugins).unwrap();
    std::fs::write(
        plugins.join("p.yaml"),
        manifest(
            "private",
            &locked_ref,
            "x-private",
            "  imagePullSecret: registry-pull-secret\n  imagePullPolicy: Always\n",
        ) + &manifest("secure", &tls_ref, "x-secure", ""),
    )
    .unwrap();
    let yaml = gateway_yaml(
        upstream(Duration::ZERO),
        &listener("main", "      []\n"),
        &format!(
            "plugins_dir: plugins.d\npull_secrets_dir: secrets\ninsecure_registries: [\"{}\"]\nmodule_fetch: {{ ca_files: [ca.pem] }}\nmodule_cache: {{ dir: cache }}\n",
            locked.address
        ),
    );
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, yaml).unwrap();
    let gateway = start_capturing(wasmgate().args(["run", "--config", config.to_str().unwrap()]));
    let (status, answer) = get(gateway.listener("main"), "/", "");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(header(&answer, "x-private"), Some("private"), "{answer}");
    assert_eq!(header(&answer, "x-secure"), Some("secure"), "{answer}");
    let (_, dump) = get(gateway.admin, "/config_dump", "");
    let (_, plugins) = get(gateway.admin, "/plugins", "");
    let (_, stats) = get(gateway.admin, "/stats/prometheus", "");
    let logs = gateway.stderr.lock().clone();
    for place in [&dump, &plugins, &stats, &logs] {
        assert!(!place.contains(password), "the password leaked: {place}");
    }
}

#[test]
fn failed_fetches_never_break_traffic_and_recover_in_the_background() {
    let modules = ModuleServer::start();
    let wasm = std::fs::read(plugin("add_header")).unwrap();
    let sha = sha256_hex(&wasm);
    modules.set("/ok.wasm", 200, &wasm);
    modules.set("/html.wasm", 200, b"<html>oops</html>");
    // /later.wasm is 404 until the test puts a module there: the same plugin with an extra custom
    // section, so its sha256 differs and the cache cannot answer for it.
    let mut later = wasm.clone();
    later.extend_from_slice(b"\x00\x05\x04test");
    let later_sha = sha256_hex(&later);
    modules.reply(
        "/slow.wasm",
        Reply::Slow(Duration::from_secs(4), wasm.clone()),
    );
    let mut truncated = b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n".to_vec();
    truncated.extend_from_slice(&wasm[..100]);
    modules.reply("/truncated.wasm", Reply::Raw(truncated));
    modules.reply(
        "/loop.wasm",
        Reply::Raw(
            b"HTTP/1.1 302 Found\r\nlocation: /loop.wasm\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec(),
        ),
    );
    // Over the 4 MiB cap the config sets below.
    modules.set("/huge.wasm", 200, &vec![0u8; 5 << 20]);
    // 500 once, then the module: the fetch's own retry gets it, and nothing fails. A module of
    // its own (another custom section), so the cache cannot answer for it.
    let mut flaky = wasm.clone();
    flaky.extend_from_slice(b"\x00\x06\x05flaky");
    let flaky_sha = sha256_hex(&flaky);
    modules.flaky("/flaky.wasm", 1, 500, &flaky);
    let dir = tempfile::tempdir().unwrap();
    let remote = |name: &str, path: &str, sha: &str, policy: &str, header: &str| {
        format!(
            "      - name: {name}\n        failure_policy: {policy}\n        configuration: '{{\"name\": \"{header}\", \"value\": \"{name}\"}}'\n        vm_config: {{ code: {{ remote: {{ http_uri: {{ uri: \"{}\" }}, sha256: \"{sha}\" }} }} }}\n",
            modules.url(path)
        )
    };
    let listeners = [
        listener(
            "open",
            &(remote("missing", "/missing.wasm", &sha, "FAIL_OPEN", "x-missing")
                + &remote("html", "/html.wasm", &sha, "FAIL_OPEN", "x-html")
                + &remote(
                    "wrong-sha",
                    "/ok.wasm",
                    &"0".repeat(64),
                    "FAIL_OPEN",
                    "x-wrong",
                )
                + &remote("slow", "/slow.wasm", &sha, "FAIL_OPEN", "x-slow")
                + &remote(
                    "truncated",
                    "/truncated.wasm",
                    &sha,
                    "FAIL_OPEN",
                    "x-truncated",
                )
                + &remote("loop", "/loop.wasm", &sha, "FAIL_OPEN", "x-loop")
                + &remote("huge", "/huge.wasm", &sha, "FAIL_OPEN", "x-huge")
                + &remote("envoy-remote", "/ok.wasm", &sha, "FAIL_CLOSED", "x-remote")
                + &remote("flaky", "/flaky.wasm", &flaky_sha, "FAIL_CLOSED", "x-flaky")),
        ),
        listener(
            "closed",
            &remote("later", "/later.wasm", &later_sha, "FAIL_CLOSED", "x-later"),
        ),
    ]
    .join("\n");
    let yaml = gateway_yaml(
        upstream(Duration::ZERO),
        &listeners,
        "module_fetch: { timeout: 2s, attempt_timeout: 1s, max_attempts: 2, max_module_bytes: 4194304, retry_initial_backoff: 100ms }\nmodule_cache: { dir: cache }\n",
    );
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, yaml).unwrap();
    let gateway = start_capturing(wasmgate().args(["run", "--config", config.to_str().unwrap()]));

    // FAIL_OPEN: the listener serves without the three broken plugins; the good remote one runs.
    let (status, answer) = get(gateway.listener("open"), "/", "");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        header(&answer, "x-remote"),
        Some("envoy-remote"),
        "{answer}"
    );
    assert_eq!(header(&answer, "x-flaky"), Some("flaky"), "{answer}");
    for absent in [
        "x-missing",
        "x-html",
        "x-wrong",
        "x-slow",
        "x-truncated",
        "x-loop",
        "x-huge",
    ] {
        assert_eq!(header(&answer, absent), None, "{answer}");
    }
    // FAIL_CLOSE with no module: deny-all, as Istio 1.25.
    let (status, answer) = get(gateway.listener("closed"), "/", "");
    assert_eq!(status, 403, "{answer}");
    assert!(answer.ends_with("RBAC: access denied"), "{answer}");

    let (_, stats) = get(gateway.admin, "/stats/prometheus", "");
    // At least one of each at start-up (background retries may have added more by now): 404,
    // slow, truncated, redirect loop and over the cap are download failures, twice 404 with the
    // FAIL_CLOSE plugin's.
    for (result, at_least) in [
        ("success", 2),
        ("fetch_failure", 1),
        ("checksum_mismatched", 1),
        ("download_failure", 6),
    ] {
        let line = format!("wasm_remote_fetch_count{{result=\"{result}\"}} ");
        let count: u64 = stats
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("{line} in\n{stats}"));
        assert!(count >= at_least, "{line}{count} < {at_least}");
    }
    assert_eq!(
        plugin_state(gateway.admin, "later"),
        ("failed".into(), None)
    );
    assert_eq!(
        plugin_state(gateway.admin, "envoy-remote"),
        ("loaded".into(), Some(sha.clone()))
    );
    assert_eq!(
        plugin_state(gateway.admin, "flaky"),
        ("loaded".into(), Some(flaky_sha))
    );

    // The module appears: the background retry swaps the plugin in, and traffic flows through it.
    modules.set("/later.wasm", 200, &later);
    let closed = gateway.listener("closed");
    assert!(
        eventually(Duration::from_secs(20), || {
            let (status, answer) = get(closed, "/", "");
            status == 200 && header(&answer, "x-later") == Some("later")
        }),
        "the plugin was swapped in once its module could be fetched"
    );
    assert_eq!(
        plugin_state(gateway.admin, "later"),
        ("loaded".into(), Some(later_sha))
    );

    // Each failure was logged once, with the URL, the reason and what the gateway did.
    let logs = gateway.stderr.lock().clone();
    for (url, reason, action) in [
        ("/missing.wasm", "404", "FAIL_OPEN"),
        ("/html.wasm", "not a Wasm module", "FAIL_OPEN"),
        ("/ok.wasm", "0000000000", "FAIL_OPEN"),
        ("/slow.wasm", "no complete answer within", "FAIL_OPEN"),
        ("/truncated.wasm", "attempts", "FAIL_OPEN"),
        ("/loop.wasm", "redirects", "FAIL_OPEN"),
        ("/huge.wasm", "4194304-byte limit", "FAIL_OPEN"),
        ("/later.wasm", "404", "FAIL_CLOSE"),
    ] {
        let lines: Vec<&str> = logs
            .lines()
            .filter(|l| {
                l.contains("cannot load the plugin's module") && l.contains(&modules.url(url))
            })
            .filter(|l| url != "/ok.wasm" || l.contains(reason))
            .collect();
        assert_eq!(lines.len(), 1, "one line for {url}:\n{logs}");
        assert!(
            lines[0].contains(reason) && lines[0].contains(action),
            "{}",
            lines[0]
        );
    }
    assert!(
        lines_with(&logs, &["cannot load", &modules.url("/flaky.wasm")]).is_empty(),
        "a 500 the retry got past is no failure:\n{logs}"
    );
}

#[test]
fn a_restarted_gateway_serves_remote_plugins_from_its_cache_without_the_network() {
    let modules = ModuleServer::start();
    let wasm = std::fs::read(plugin("add_header")).unwrap();
    modules.set("/p.wasm", 200, &wasm);
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins.d");
    std::fs::create_dir(&plugins).unwrap();
    // No sha256: the cache index, not a pinned checksum, must find the module after the restart.
    std::fs::write(
        plugins.join("p.yaml"),
        manifest("cached", &modules.url("/p.wasm"), "x-cached", ""),
    )
    .unwrap();
    let yaml = gateway_yaml(
        upstream(Duration::ZERO),
        &listener("main", "      []\n"),
        "plugins_dir: plugins.d\nmodule_cache: { dir: cache }\n",
    );
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, yaml).unwrap();
    for round in ["first start, fetching", "restart, server gone"] {
        let gateway = start(&["run", "--config", config.to_str().unwrap()]);
        let (status, answer) = get(gateway.listener("main"), "/", "");
        assert_eq!(status, 200, "{round}: {answer}");
        assert_eq!(
            header(&answer, "x-cached"),
            Some("cached"),
            "{round}: {answer}"
        );
        let (_, stats) = get(gateway.admin, "/stats/prometheus", "");
        let hit = round.starts_with("restart");
        assert!(
            stats.contains(&format!("wasm_cache_lookup_count{{hit=\"{hit}\"}} 1")),
            "{round}: {stats}"
        );
        drop(gateway);
        modules.set("/p.wasm", 503, b"down");
    }
}

/// Writes an OCI image layout holding one Wasm artifact image per `(name, module)`, laid out as
/// `wasmgate plugin build --oci` writes it (crates/wasmgate/src/scaffold.rs, `write_oci_layout`):
/// `oci-layout`, `index.json` naming each image by `org.opencontainers.image.ref.name`, and the
/// config, module and manifest under `blobs/sha256/`. Returns the manifest digests.
fn write_layout(dir: &Path, images: &[(&str, &[u8])]) -> Vec<String> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let blob = |data: &[u8]| {
        let hex = sha256_hex(data);
        std::fs::write(blobs.join(&hex), data).unwrap();
        format!("sha256:{hex}")
    };
    let descriptor = |media_type: &str, data: &[u8], title: Option<&str>| {
        let mut d = serde_json::json!({
            "mediaType": media_type,
            "digest": format!("sha256:{}", sha256_hex(data)),
            "size": data.len(),
        });
        if let Some(title) = title {
            d["annotations"] = serde_json::json!({ "org.opencontainers.image.title": title });
        }
        d
    };
    let config = serde_json::to_vec(&serde_json::json!({
        "type": "envoy_proxy",
        "abiVersions": ["v0.2.1"],
        "config": { "root_ids": [] },
    }))
    .unwrap();
    blob(&config);
    let config_descriptor = descriptor(
        "application/vnd.module.wasm.config.v1+json",
        &config,
        Some("runtime-config.json"),
    );
    let mut manifests = Vec::new();
    let mut digests = Vec::new();
    for (name, module) in images {
        blob(module);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_descriptor,
            "layers": [
                config_descriptor,
                descriptor("application/vnd.module.wasm.content.layer.v1+wasm", module, Some("plugin.wasm")),
            ],
        }))
        .unwrap();
        digests.push(blob(&manifest));
        let mut entry = descriptor(
            "application/vnd.oci.image.manifest.v1+json",
            &manifest,
            None,
        );
        entry["annotations"] = serde_json::json!({ "org.opencontainers.image.ref.name": name });
        manifests.push(entry);
    }
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    });
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec_pretty(&index).unwrap(),
    )
    .unwrap();
    digests
}

#[test]
fn push_an_oci_image_layout_as_it_is_and_pull_it_back() {
    let io = tokio();
    let registry = io.block_on(TestRegistry::start(Mode::Plain));
    let address = registry.address.clone();
    let module = std::fs::read(plugin("add_header")).unwrap();
    let module_sha = sha256_hex(&module);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let pull = |reference: &str| {
        let pulled = ok(run(&[
            "plugin",
            "pull",
            reference,
            "--insecure-registry",
            &address,
            "--cache-dir",
            cache.to_str().unwrap(),
        ]));
        let path = pulled.lines().next().unwrap().to_owned();
        (pulled, std::fs::read(path).unwrap())
    };
    let push_layout = |layout: &Path, reference: &str| {
        run(&[
            "plugin",
            "push",
            layout.to_str().unwrap(),
            reference,
            "--insecure-registry",
            &address,
        ])
    };
    let digest_of = |stdout: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("digest "))
            .expect("a digest line")
            .to_owned()
    };

    // One image: pushed byte for byte, so the registry's digest is the layout's.
    let layout = dir.path().join("layout");
    let digests = write_layout(&layout, &[("latest", &module)]);
    let reference = format!("oci://{address}/plugins/from-layout:v1");
    let pushed = ok(push_layout(&layout, &reference));
    assert_eq!(digest_of(&pushed), digests[0], "{pushed}");
    let (pulled, bytes) = pull(&reference);
    assert_eq!(sha256_hex(&bytes), module_sha);
    assert!(pulled.contains(&format!("sha256 {module_sha}")), "{pulled}");
    assert_eq!(digest_of(&pulled), digests[0], "{pulled}");
    // inspect reads oci:// through the same fetcher.
    let inspected = ok(run(&[
        "plugin",
        "inspect",
        &reference,
        "--insecure-registry",
        &address,
        "--cache-dir",
        cache.to_str().unwrap(),
    ]));
    assert!(
        inspected.contains(&format!("sha256:      {module_sha}"))
            && inspected.contains(&format!("digest:      {}", digests[0])),
        "{inspected}"
    );

    // Several images: the one named as the reference's tag.
    let mut other = module.clone();
    other.extend_from_slice(b"\x00\x05\x04test");
    let multi = dir.path().join("multi");
    let digests = write_layout(&multi, &[("v1", &module), ("v2", &other)]);
    let reference = format!("oci://{address}/plugins/from-layout:v2");
    assert_eq!(digest_of(&ok(push_layout(&multi, &reference))), digests[1]);
    let (_, bytes) = pull(&reference);
    assert_eq!(bytes, other);
    let refused = push_layout(&multi, &format!("oci://{address}/plugins/from-layout:v3"));
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        message.contains("none is named \"v3\"") && message.contains("v1, v2"),
        "{message}"
    );

    // --variant packages .wasm files only; a blob that does not match its digest is refused
    // before anything is uploaded.
    let refused = run(&[
        "plugin",
        "push",
        layout.to_str().unwrap(),
        &format!("oci://{address}/plugins/from-layout:variant"),
        "--variant",
        "artifact",
        "--insecure-registry",
        &address,
    ]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--variant"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let mut corrupt = module.clone();
    corrupt[100] ^= 0xff;
    std::fs::write(layout.join("blobs/sha256").join(&module_sha), &corrupt).unwrap();
    let refused = push_layout(&layout, &format!("oci://{address}/plugins/corrupt:v1"));
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(message.contains("does not match its digest"), "{message}");
}

/// Writes `text` to `path` through a rename from the folder above, so a gateway watching the
/// file's folder sees one whole change.
fn replace_file(path: &Path, text: &str) {
    let folder = path.parent().unwrap();
    let staging = folder.parent().unwrap().join(format!(
        "{}.staging",
        folder.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&staging, text).unwrap();
    std::fs::rename(&staging, path).unwrap();
}

/// Changes `plugins.d/p.yaml` and waits until the gateway has applied the change.
fn reload_with(gateway: &Running, manifest_file: &Path, text: &str) {
    let before = metric(gateway.admin, "wasmgate_config_generation");
    replace_file(manifest_file, text);
    assert!(
        eventually(Duration::from_secs(20), || metric(
            gateway.admin,
            "wasmgate_config_generation"
        ) > before),
        "the change was applied; log:\n{}",
        gateway.stderr.lock()
    );
}

/// The lines of `logs` holding every one of `words`.
fn lines_with<'a>(logs: &'a str, words: &[&str]) -> Vec<&'a str> {
    logs.lines()
        .filter(|l| words.iter().all(|w| l.contains(w)))
        .collect()
}

#[test]
fn an_earlier_version_keeps_serving_when_its_new_version_cannot_be_had() {
    let modules = ModuleServer::start();
    let wasm = std::fs::read(plugin("add_header")).unwrap();
    let sha = sha256_hex(&wasm);
    modules.set("/v1.wasm", 200, &wasm);
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins.d");
    std::fs::create_dir(&plugins).unwrap();
    let manifest_file = plugins.join("p.yaml");
    std::fs::write(
        &manifest_file,
        manifest("versioned", &modules.url("/v1.wasm"), "x-v1", ""),
    )
    .unwrap();
    let yaml = gateway_yaml(
        upstream(Duration::ZERO),
        &listener("main", "      []\n"),
        "plugins_dir: plugins.d\nmodule_cache: { dir: cache }\nmodule_fetch: { timeout: 2s, attempt_timeout: 1s, max_attempts: 2, retry_initial_backoff: 100ms }\n",
    );
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, yaml).unwrap();
    let gateway = start_capturing(wasmgate().args(["run", "--config", config.to_str().unwrap()]));
    let main = gateway.listener("main");
    let answers = |name: &str| {
        let (status, answer) = get(main, "/", "");
        status == 200
            && header(&answer, name) == Some("versioned")
            && ["x-v1", "x-v2", "x-v3"]
                .iter()
                .all(|other| *other == name || header(&answer, other).is_none())
    };
    assert!(answers("x-v1"));

    // A new version whose URL answers 404, then one whose sha256 is wrong: the first version
    // answers as before, and each failure is logged once, with the plugin, the URL, the reason
    // and what the gateway did.
    let wrong_sha = format!("  sha256: {}\n", "0".repeat(64));
    for (url, extra, reason) in [
        (modules.url("/v2.wasm"), "", "404"),
        (modules.url("/v1.wasm"), wrong_sha.as_str(), "0000000000"),
    ] {
        reload_with(
            &gateway,
            &manifest_file,
            &manifest("versioned", &url, "x-v2", extra),
        );
        assert!(answers("x-v1"), "the earlier version serves");
        assert_eq!(
            plugin_state(gateway.admin, "versioned"),
            ("outdated".into(), Some(sha.clone()))
        );
        let logs = gateway.stderr.lock().clone();
        let lines = lines_with(
            &logs,
            &["cannot load the plugin's new version", &url, reason],
        );
        assert_eq!(lines.len(), 1, "one line for {url}:\n{logs}");
        assert!(
            lines[0].contains("versioned")
                && lines[0].contains("the earlier version keeps serving"),
            "{}",
            lines[0]
        );
    }

    // The server fails outright on a URL that worked before: the copy fetched from it then
    // serves, with the new plugin configuration.
    modules.set("/v1.wasm", 503, b"down");
    reload_with(
        &gateway,
        &manifest_file,
        &manifest(
            "versioned",
            &modules.url("/v1.wasm"),
            "x-v3",
            "  imagePullPolicy: Always\n",
        ),
    );
    assert!(answers("x-v3"), "the cached copy serves the new version");
    assert_eq!(
        plugin_state(gateway.admin, "versioned"),
        ("loaded".into(), Some(sha.clone()))
    );
    let logs = gateway.stderr.lock().clone();
    let lines = lines_with(
        &logs,
        &[
            "cannot refresh the module",
            "versioned",
            &modules.url("/v1.wasm"),
            "503",
            "serving the copy fetched before",
        ],
    );
    assert_eq!(lines.len(), 1, "{logs}");
    // The 404 and checksum failures were not logged again by the later reloads.
    assert_eq!(
        lines_with(&logs, &["cannot load the plugin's new version"]).len(),
        2,
        "{logs}"
    );
}

#[test]
fn a_password_in_a_module_url_is_in_no_log_admin_page_or_metric() {
    let modules = ModuleServer::start();
    let wasm = std::fs::read(plugin("add_header")).unwrap();
    let sha = sha256_hex(&wasm);
    modules.set("/ok.wasm", 200, &wasm);
    let secret = "hunter2-secret";
    let with_password = |path: &str| {
        modules
            .url(path)
            .replace("http://", &format!("http://module-user:{secret}@"))
    };
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins.d");
    std::fs::create_dir(&plugins).unwrap();
    // From WasmPlugins (one fetch fails, one works) and from the configuration itself.
    std::fs::write(
        plugins.join("p.yaml"),
        manifest(
            "manifest-missing",
            &with_password("/missing.wasm"),
            "x-missing",
            "  failStrategy: FAIL_OPEN\n",
        ) + &manifest("fetched", &with_password("/ok.wasm"), "x-fetched", ""),
    )
    .unwrap();
    let filter = format!(
        "      - name: config-missing\n        failure_policy: FAIL_OPEN\n        configuration: '{{\"name\": \"x-config\", \"value\": \"config\"}}'\n        vm_config: {{ code: {{ remote: {{ http_uri: {{ uri: \"{}\" }}, sha256: \"{sha}\" }} }} }}\n",
        with_password("/also-missing.wasm")
    );
    let yaml = gateway_yaml(
        upstream(Duration::ZERO),
        &listener("main", &filter),
        "plugins_dir: plugins.d\nmodule_cache: { dir: cache }\nmodule_fetch: { timeout: 2s, attempt_timeout: 1s, max_attempts: 1, retry_initial_backoff: 100ms }\n",
    );
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, yaml).unwrap();
    let gateway = start_capturing(wasmgate().args(["run", "--config", config.to_str().unwrap()]));
    let (status, answer) = get(gateway.listener("main"), "/", "");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(header(&answer, "x-fetched"), Some("fetched"), "{answer}");
    // Let a background retry or two log as well.
    assert!(eventually(Duration::from_secs(10), || metric(
        gateway.admin,
        "wasm_remote_fetch_count{result=\"download_failure\"}"
    ) >= 4));

    let (_, plugins) = get(gateway.admin, "/plugins", "");
    let (_, dump) = get(gateway.admin, "/config_dump", "");
    let (_, stats) = get(gateway.admin, "/stats/prometheus", "");
    let logs = gateway.stderr.lock().clone();
    for (place, text) in [
        ("/plugins", &plugins),
        ("/config_dump", &dump),
        ("/stats/prometheus", &stats),
        ("the log", &logs),
    ] {
        assert!(!text.contains(secret), "the password is in {place}: {text}");
    }
    // The URLs are still shown, user name included.
    let redacted = |path: &str| {
        modules
            .url(path)
            .replace("http://", "http://module-user:***@")
    };
    for path in ["/missing.wasm", "/ok.wasm", "/also-missing.wasm"] {
        assert!(plugins.contains(&redacted(path)), "{path}: {plugins}");
    }
    assert!(
        dump.contains(&redacted("/also-missing.wasm")),
        "the configuration's own URL: {dump}"
    );
    for path in ["/missing.wasm", "/also-missing.wasm"] {
        let lines = lines_with(
            &logs,
            &[
                "cannot load the plugin's module",
                &redacted(path),
                "404",
                "FAIL_OPEN",
            ],
        );
        assert_eq!(lines.len(), 1, "{path}:\n{logs}");
    }
    assert_eq!(
        lines_with(&logs, &["fetched a module", &redacted("/ok.wasm")]).len(),
        1,
        "{logs}"
    );
}

/// Sets `last_used` of every module in the cache's index to the Unix epoch's first second, as if
/// nothing had read them for decades.
fn age_every_module(cache: &Path) {
    let path = cache.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for entry in index["modules"].as_object_mut().unwrap().values_mut() {
        entry["last_used"] = serde_json::json!(1);
    }
    replace_file(&path, &serde_json::to_string(&index).unwrap());
}

/// `last_used` of a module in the cache's index; `None` once it is gone.
fn last_used(cache: &Path, sha256: &str) -> Option<u64> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cache.join("index.json")).unwrap()).unwrap();
    index["modules"][sha256]["last_used"].as_u64()
}

#[test]
fn the_purge_keeps_modules_in_use_so_a_restart_still_needs_no_network() {
    let modules = ModuleServer::start();
    let wasm = std::fs::read(plugin("add_header")).unwrap();
    let sha = sha256_hex(&wasm);
    let mut unused = wasm.clone();
    unused.extend_from_slice(b"\x00\x05\x04test");
    let unused_sha = sha256_hex(&unused);
    modules.set("/serving.wasm", 200, &wasm);
    modules.set("/unused.wasm", 200, &unused);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    ok(run(&[
        "plugin",
        "pull",
        &modules.url("/unused.wasm"),
        "--cache-dir",
        cache.to_str().unwrap(),
    ]));
    let plugins = dir.path().join("plugins.d");
    std::fs::create_dir(&plugins).unwrap();
    std::fs::write(
        plugins.join("p.yaml"),
        manifest("serving", &modules.url("/serving.wasm"), "x-serving", ""),
    )
    .unwrap();
    let yaml = gateway_yaml(
        upstream(Duration::ZERO),
        &listener("main", "      []\n"),
        "plugins_dir: plugins.d\nmodule_cache: { dir: cache, expiry: 1s, purge_interval: 1s }\n",
    );
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, yaml).unwrap();
    let serves = |gateway: &Running| {
        let (status, answer) = get(gateway.listener("main"), "/", "");
        status == 200 && header(&answer, "x-serving") == Some("serving")
    };
    let compiled = || {
        std::fs::read_dir(cache.join("modules"))
            .unwrap()
            .flatten()
            .map(|f| f.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(&format!("{sha}-")) && name.ends_with(".cwasm"))
            .count()
    };
    let gateway = start(&["run", "--config", config.to_str().unwrap()]);
    assert!(serves(&gateway));
    assert_eq!(compiled(), 1, "the compiled module is beside the module");

    // Both modules look unused for decades. The next purge removes the one nothing serves and
    // keeps the serving one, marking it used.
    age_every_module(&cache);
    assert!(
        eventually(Duration::from_secs(10), || last_used(&cache, &sha)
            != Some(1)),
        "a purge ran"
    );
    assert!(
        last_used(&cache, &sha).is_some(),
        "the serving module was kept"
    );
    assert_eq!(last_used(&cache, &unused_sha), None, "the unused one went");
    assert!(cache.join(format!("modules/{sha}.wasm")).is_file());
    assert!(!cache.join(format!("modules/{unused_sha}.wasm")).exists());
    assert_eq!(compiled(), 1, "the compiled module stays with its module");
    assert!(eventually(Duration::from_secs(5), || metric(
        gateway.admin,
        "wasm_cache_entries"
    ) == 1));
    assert!(serves(&gateway));

    // Restarted with the module server down, the gateway serves from its cache.
    drop(gateway);
    modules.set("/serving.wasm", 503, b"down");
    let gateway = start(&["run", "--config", config.to_str().unwrap()]);
    assert!(serves(&gateway));
    assert_eq!(
        metric(gateway.admin, "wasm_cache_lookup_count{hit=\"true\"}"),
        1
    );
}

#[test]
fn plugin_cache_prune_removes_unused_modules_or_all_of_them() {
    let modules = ModuleServer::start();
    let wasm = std::fs::read(plugin("add_header")).unwrap();
    let mut other = wasm.clone();
    other.extend_from_slice(b"\x00\x05\x04test");
    modules.set("/a.wasm", 200, &wasm);
    modules.set("/b.wasm", 200, &other);
    let (a, b) = (sha256_hex(&wasm), sha256_hex(&other));
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let cache_dir = cache.to_str().unwrap();
    let cache_cmd = |args: &[&str]| {
        let mut all = vec!["plugin", "cache"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--cache-dir", cache_dir]);
        run(&all)
    };
    for path in ["/a.wasm", "/b.wasm"] {
        ok(run(&[
            "plugin",
            "pull",
            &modules.url(path),
            "--cache-dir",
            cache_dir,
        ]));
    }
    // A compiled artefact as the gateway's runtime names them.
    let compiled = cache.join(format!("modules/{a}-0123456789abcdef.cwasm"));
    std::fs::write(&compiled, b"compiled").unwrap();

    let kept = ok(cache_cmd(&["prune", "--unused-for", "1h"]));
    assert!(kept.contains("0 module(s) removed"), "{kept}");
    let listed = ok(cache_cmd(&["ls"]));
    assert!(listed.contains(&a) && listed.contains(&b), "{listed}");
    let refused = cache_cmd(&["prune", "--unused-for", "soon"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--unused-for"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // Aged: both are past an hour; one is read again first, so only the other goes.
    age_every_module(&cache);
    let pulled = ok(run(&[
        "plugin",
        "pull",
        &modules.url("/b.wasm"),
        "--cache-dir",
        cache_dir,
    ]));
    assert!(pulled.contains("(from the cache)"), "{pulled}");
    let pruned = ok(cache_cmd(&["prune", "--unused-for", "1h"]));
    assert!(
        pruned.contains(&format!("removed {a}")) && pruned.contains("1 module(s) removed"),
        "{pruned}"
    );
    assert!(!compiled.exists(), "its compiled artefact went with it");
    let listed = ok(cache_cmd(&["ls"]));
    assert!(!listed.contains(&a) && listed.contains(&b), "{listed}");

    // Without --unused-for, everything goes.
    let pruned = ok(cache_cmd(&["prune"]));
    assert!(
        pruned.contains(&format!("removed {b}")) && pruned.contains("1 module(s) removed"),
        "{pruned}"
    );
    assert!(ok(cache_cmd(&["ls"])).contains("is empty"));
}

#[test]
fn a_pull_secret_that_arrives_later_is_used_at_once() {
    let io = tokio();
    let (user, password) = ("late-user", "late-pass");
    let locked = io.block_on(TestRegistry::start(Mode::Htpasswd {
        username: user.into(),
        password: password.into(),
    }));
    let wasm = plugin("add_header");
    let reference = format!("oci://{}/private/late:v1", locked.address);
    ok(wasmgate()
        .args(["plugin", "push", wasm.to_str().unwrap(), &reference])
        .args(["--insecure-registry", &locked.address, "--username", user])
        .env("WASMGATE_REGISTRY_PASSWORD", password)
        .output()
        .unwrap());
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    let plugins = dir.path().join("plugins.d");
    std::fs::create_dir(&plugins).unwrap();
    std::fs::write(
        plugins.join("p.yaml"),
        manifest(
            "late",
            &reference,
            "x-late",
            "  imagePullSecret: late-secret\n",
        ),
    )
    .unwrap();
    // The background retry is an hour away: only the reload the secret causes can load it.
    let yaml = gateway_yaml(
        upstream(Duration::ZERO),
        &listener("main", "      []\n"),
        &format!(
            "plugins_dir: plugins.d\npull_secrets_dir: secrets\ninsecure_registries: [\"{}\"]\nmodule_cache: {{ dir: cache }}\nmodule_fetch: {{ retry_initial_backoff: 1h }}\n",
            locked.address
        ),
    );
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, yaml).unwrap();
    let gateway = start_capturing(wasmgate().args(["run", "--config", config.to_str().unwrap()]));
    let main = gateway.listener("main");
    let (status, answer) = get(main, "/", "");
    assert_eq!(status, 403, "FAIL_CLOSE without its module: {answer}");

    replace_file(
        &secrets.join("late-secret"),
        &format!(
            r#"{{"auths": {{"{}": {{"username": "{user}", "password": "{password}"}}}}}}"#,
            locked.address
        ),
    );
    assert!(
        eventually(Duration::from_secs(10), || {
            let (status, answer) = get(main, "/", "");
            status == 200 && header(&answer, "x-late") == Some("late")
        }),
        "the plugin loaded once its secret arrived; log:\n{}",
        gateway.stderr.lock()
    );
    let logs = gateway.stderr.lock().clone();
    assert_eq!(
        lines_with(&logs, &["cannot load the plugin's module", "late-secret"]).len(),
        1,
        "the failure was logged once: {logs}"
    );
    assert!(!logs.contains(password), "{logs}");
}
