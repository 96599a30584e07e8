//! The mirror against RECORDED API server responses, not a real API server (none can run here: see
//! `fixtures/README.md`). A small HTTP/1.1 server on 127.0.0.1 answers the list and watch requests
//! `kube`'s watcher makes with the fixtures, and the tests push watch events through the open watch
//! streams and look at the mirror folders.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use wasmgate_kube::{KubeHandle, KubeSource};

const NS: &str = "wasmgate";
const ROOT: &str = "istio-system";
const PLUGINS_NS: &str = "/apis/extensions.istio.io/v1alpha1/namespaces/wasmgate/wasmplugins";
const PLUGINS_ROOT: &str = "/apis/extensions.istio.io/v1alpha1/namespaces/istio-system/wasmplugins";
const SECRETS_NS: &str = "/api/v1/namespaces/wasmgate/secrets";
const DEADLINE: Duration = Duration::from_secs(20);

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn fixture_json(name: &str) -> serde_json::Value {
    serde_json::from_str(&fixture(name)).unwrap()
}

/// A watch event fixture as the API server streams it: one line.
fn event_line(name: &str) -> String {
    fixture_json(name).to_string()
}

/// What the fake API server answers, and what it was asked.
#[derive(Default)]
struct ServerState {
    /// Path -> (status, JSON body) for list requests.
    lists: HashMap<String, (u16, String)>,
    /// Path -> the open watch streams.
    watches: HashMap<String, Vec<mpsc::UnboundedSender<String>>>,
    /// Every request target (`/path?query`), in order.
    requests: Vec<String>,
}

/// An API server of recorded responses.
struct FakeApiServer {
    port: u16,
    state: Arc<Mutex<ServerState>>,
    /// HTTPS: the CA file its certificate chains to, and the bearer token it requires.
    tls: Option<(PathBuf, String)>,
    _pki: Option<tempfile::TempDir>,
    _runtime: tokio::runtime::Runtime,
}

/// How a connection is served: the bearer token required, if any.
#[derive(Clone)]
struct Access {
    state: Arc<Mutex<ServerState>>,
    token: Option<String>,
}

impl FakeApiServer {
    fn start(lists: &[(&str, u16, &str)]) -> FakeApiServer {
        Self::start_with(lists, false)
    }

    /// HTTPS with a certificate from a test CA, and a bearer token, as a cluster's API server
    /// and a service account.
    fn start_tls(lists: &[(&str, u16, &str)]) -> FakeApiServer {
        Self::start_with(lists, true)
    }

    fn start_with(lists: &[(&str, u16, &str)], tls: bool) -> FakeApiServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let state = Arc::new(Mutex::new(ServerState::default()));
        for (path, status, file) in lists {
            state
                .lock()
                .unwrap()
                .lists
                .insert((*path).to_owned(), (*status, fixture(file)));
        }
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (acceptor, pki, tls) = if tls {
            let (acceptor, dir, ca_file) = test_pki();
            let token = "eyJhbGciOiJSUzI1NiJ9.recorded-service-account-token".to_owned();
            (Some(acceptor), Some(dir), Some((ca_file, token)))
        } else {
            (None, None, None)
        };
        let access = Access {
            state: state.clone(),
            token: tls.as_ref().map(|(_, token)| token.clone()),
        };
        runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let access = access.clone();
                match &acceptor {
                    Some(acceptor) => {
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                serve(stream, access).await;
                            }
                        });
                    }
                    None => {
                        tokio::spawn(serve(stream, access));
                    }
                }
            }
        });
        FakeApiServer {
            port,
            state,
            tls,
            _pki: pki,
            _runtime: runtime,
        }
    }

    fn set_list(&self, path: &str, file: &str) {
        self.state
            .lock()
            .unwrap()
            .lists
            .insert(path.to_owned(), (200, fixture(file)));
    }

    fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    fn open_watches(&self, path: &str) -> usize {
        let mut state = self.state.lock().unwrap();
        let watches = state.watches.entry(path.to_owned()).or_default();
        watches.retain(|w| !w.is_closed());
        watches.len()
    }

    /// Sends one line on every open watch of `path` (waiting for one to be open).
    fn push(&self, path: &str, line: &str) {
        wait_for(&format!("a watch on {path}"), || {
            self.open_watches(path) > 0
        });
        let state = self.state.lock().unwrap();
        for watch in &state.watches[path] {
            let _ = watch.send(line.to_owned());
        }
    }

    /// Ends the watch streams of `path`, as the API server does after an ERROR event.
    fn close_watches(&self, path: &str) {
        self.state.lock().unwrap().watches.remove(path);
    }

    fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let (server, ca, user) = match &self.tls {
            Some((ca_file, token)) => (
                format!("https://127.0.0.1:{}", self.port),
                format!("\n    certificate-authority: {}", ca_file.display()),
                format!("\n    token: {token}"),
            ),
            None => (
                format!("http://127.0.0.1:{}", self.port),
                String::new(),
                " {}".to_owned(),
            ),
        };
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: recorded\n  cluster:\n    server: \
             {server}{ca}\ncontexts:\n- name: recorded\n  context:\n    cluster: recorded\n    \
             user: nobody\n    namespace: {NS}\ncurrent-context: recorded\nusers:\n- name: nobody\n  \
             user:{user}\n"
        );
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// A test CA and a certificate for 127.0.0.1 it signed: the acceptor, the folder of the files, and
/// the CA file.
fn test_pki() -> (tokio_rustls::TlsAcceptor, tempfile::TempDir, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "recorded kubernetes CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let chain = vec![cert.der().clone(), ca.der().clone()];
    let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    (
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        dir,
        ca_file,
    )
}

/// One connection: HTTP/1.1 requests one after another (kube's client keeps connections alive).
async fn serve<S>(stream: S, access: Access)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let state = access.state;
    let (read, mut write) = tokio::io::split(stream);
    let mut read = BufReader::new(read);
    loop {
        let mut request_line = String::new();
        if read.read_line(&mut request_line).await.unwrap_or(0) == 0 {
            return;
        }
        let mut authorized = access.token.is_none();
        loop {
            let mut header = String::new();
            if read.read_line(&mut header).await.unwrap_or(0) == 0 {
                return;
            }
            if header == "\r\n" || header == "\n" {
                break;
            }
            if let (Some(token), Some((name, value))) = (&access.token, header.split_once(':'))
                && name.eq_ignore_ascii_case("authorization")
                && value.trim() == format!("Bearer {token}")
            {
                authorized = true;
            }
        }
        let target = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("/")
            .to_owned();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let watch = query
            .split('&')
            .any(|p| p == "watch=true" || p == "watch=1");
        let mut events = None;
        let (status, body) = {
            let mut state = state.lock().unwrap();
            state.requests.push(target.clone());
            match state.lists.get(path) {
                _ if !authorized => (401, unauthorized()),
                Some((200, _)) if watch => {
                    let (sender, receiver) = mpsc::unbounded_channel();
                    state
                        .watches
                        .entry(path.to_owned())
                        .or_default()
                        .push(sender);
                    events = Some(receiver);
                    (200, String::new())
                }
                Some((status, body)) => (*status, body.clone()),
                None => (404, not_found(path)),
            }
        };
        let written = match events {
            Some(mut events) => {
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                            Transfer-Encoding: chunked\r\n\r\n";
                let mut ok = write.write_all(head.as_bytes()).await.is_ok();
                while ok && let Some(line) = events.recv().await {
                    let chunk = format!("{:x}\r\n{line}\n\r\n", line.len() + 1);
                    ok = write.write_all(chunk.as_bytes()).await.is_ok();
                }
                ok && write.write_all(b"0\r\n\r\n").await.is_ok()
            }
            None => {
                let reason = if status == 200 { "OK" } else { "Error" };
                let response = format!(
                    "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                write.write_all(response.as_bytes()).await.is_ok()
            }
        };
        if !written {
            return;
        }
    }
}

fn unauthorized() -> String {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "Unauthorized", "reason": "Unauthorized", "code": 401
    })
    .to_string()
}

fn not_found(path: &str) -> String {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("the server could not find the requested resource ({path})"),
        "reason": "NotFound", "details": {}, "code": 404
    })
    .to_string()
}

/// Polls `condition` until it holds; panics after [`DEADLINE`].
fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn standard_server() -> FakeApiServer {
    FakeApiServer::start(&[
        (PLUGINS_NS, 200, "wasmplugins-wasmgate.json"),
        (PLUGINS_ROOT, 200, "wasmplugins-istio-system.json"),
        (SECRETS_NS, 200, "secrets-wasmgate.json"),
    ])
}

fn start(server: &FakeApiServer, dir: &Path, root_namespace: &str) -> KubeHandle {
    KubeSource {
        namespace: NS.to_owned(),
        root_namespace: root_namespace.to_owned(),
        kubeconfig: Some(server.kubeconfig(dir)),
        mirror_dir: dir.join("mirror"),
    }
    .start()
    .unwrap()
}

fn manifest(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap()
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn initial_sync_mirrors_both_namespaces_and_the_pull_secrets() {
    let server = standard_server();
    let dir = tempfile::tempdir().unwrap();
    // Left by an earlier run: objects deleted since, a namespace no longer watched, a torn write.
    let plugins = dir.path().join("mirror/plugins");
    let secrets = dir.path().join("mirror/secrets");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::create_dir_all(&secrets).unwrap();
    for stale in [
        "wasmgate.deleted-meanwhile.yaml",
        "istio-system.old.yaml",
        "other-ns.plugin.yaml",
        ".wasmgate.openid-connect.yaml.tmp",
    ] {
        std::fs::write(plugins.join(stale), "stale").unwrap();
    }
    std::fs::write(secrets.join("revoked-secret"), "{}").unwrap();
    std::fs::write(secrets.join(".revoked-secret.tmp"), "{}").unwrap();

    let handle = start(&server, dir.path(), ROOT);
    assert_eq!(handle.plugins_dir(), plugins);
    assert_eq!(handle.secrets_dir(), secrets);
    assert!(
        handle.wait_synced(DEADLINE),
        "the initial lists were not mirrored"
    );

    assert_eq!(
        files(&plugins),
        [
            "istio-system.basic-auth.yaml",
            "wasmgate.openid-connect.yaml"
        ]
    );
    assert_eq!(
        files(&secrets),
        ["legacy-registry", "private-registry-pull-secret"]
    );

    // The manifest: apiVersion, kind, the metadata the gateway uses, and spec as served.
    let listed = &fixture_json("wasmplugins-wasmgate.json")["items"][0];
    let written = manifest(&plugins.join("wasmgate.openid-connect.yaml"));
    assert_eq!(
        written,
        serde_json::json!({
            "apiVersion": "extensions.istio.io/v1alpha1",
            "kind": "WasmPlugin",
            "metadata": {
                "name": "openid-connect",
                "namespace": "wasmgate",
                "labels": { "app.kubernetes.io/part-of": "wasmgate" },
                "creationTimestamp": "2025-03-14T09:26:53Z",
                "resourceVersion": "48213",
            },
            "spec": listed["spec"],
        })
    );
    let root = manifest(&plugins.join("istio-system.basic-auth.yaml"));
    assert_eq!(
        root["spec"],
        fixture_json("wasmplugins-istio-system.json")["items"][0]["spec"]
    );
    assert_eq!(root["metadata"]["namespace"], "istio-system");

    // The Secrets, decoded, readable by the gateway's user only; the Opaque one is not there.
    for (name, decoded) in [
        (
            "private-registry-pull-secret",
            "decoded-private-registry-pull-secret.json",
        ),
        ("legacy-registry", "decoded-legacy-registry.json"),
    ] {
        let path = secrets.join(name);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), fixture(decoded));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name}");
    }
    let mode = std::fs::metadata(&secrets).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);

    // What the watcher asked: a list, then a watch from the list's resourceVersion.
    let requests = server.requests();
    for path in [PLUGINS_NS, PLUGINS_ROOT, SECRETS_NS] {
        let of_path: Vec<&String> = requests
            .iter()
            .filter(|r| r.split('?').next() == Some(path))
            .collect();
        assert!(!of_path.is_empty(), "{path}: {requests:?}");
        assert!(!of_path[0].contains("watch="), "{}", of_path[0]);
        assert!(of_path[0].contains("limit=500"), "{}", of_path[0]);
        wait_for("the watch request", || {
            server
                .requests()
                .iter()
                .any(|r| r.starts_with(&format!("{path}?")) && r.contains("watch=true"))
        });
    }
    let watch = server
        .requests()
        .into_iter()
        .find(|r| r.starts_with(&format!("{PLUGINS_NS}?")) && r.contains("watch=true"))
        .unwrap();
    assert!(watch.contains("resourceVersion=48250"), "{watch}");
    assert!(watch.contains("allowWatchBookmarks=true"), "{watch}");
    assert!(watch.contains("timeoutSeconds="), "{watch}");

    // The gateway's own loader takes the mirrored manifests through its validation.
    let loaded = wasmgate_config::load_wasm_plugins(&plugins).unwrap();
    let mut names: Vec<String> = loaded
        .iter()
        .map(|p| {
            format!(
                "{}/{}",
                p.metadata.namespace.as_deref().unwrap_or(""),
                p.metadata.name
            )
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["istio-system/basic-auth", "wasmgate/openid-connect"]
    );
    handle.stop();
}

#[test]
fn watch_events_add_rewrite_and_remove_files() {
    let server = standard_server();
    let dir = tempfile::tempdir().unwrap();
    let handle = start(&server, dir.path(), ROOT);
    assert!(handle.wait_synced(DEADLINE));
    let plugins = handle.plugins_dir();
    let secrets = handle.secrets_dir();

    // ADDED
    server.push(PLUGINS_NS, &event_line("watch-wasmplugin-added.json"));
    let added = plugins.join("wasmgate.header-tagger.yaml");
    wait_for("the added plugin", || added.exists());
    assert_eq!(
        manifest(&added)["spec"],
        fixture_json("watch-wasmplugin-added.json")["object"]["spec"]
    );

    // MODIFIED: the file is replaced (a new inode: written beside, then renamed over).
    let openid = plugins.join("wasmgate.openid-connect.yaml");
    let inode = std::fs::metadata(&openid).unwrap().ino();
    server.push(PLUGINS_NS, &event_line("watch-wasmplugin-modified.json"));
    wait_for("the modified plugin", || {
        manifest(&openid)["metadata"]["resourceVersion"] == "48261"
    });
    let modified = manifest(&openid);
    assert_eq!(
        modified["spec"]["pluginConfig"]["openid_realm"],
        "ingress-v2"
    );
    assert_ne!(std::fs::metadata(&openid).unwrap().ino(), inode);

    // A bookmark changes nothing; DELETED in the root namespace removes its file.
    server.push(PLUGINS_ROOT, &event_line("watch-wasmplugin-bookmark.json"));
    server.push(PLUGINS_ROOT, &event_line("watch-wasmplugin-deleted.json"));
    let deleted = plugins.join("istio-system.basic-auth.yaml");
    wait_for("the deleted plugin's file to go", || !deleted.exists());

    // Secrets: ADDED decoded at 0600, DELETED removed.
    server.push(SECRETS_NS, &event_line("watch-secret-added.json"));
    let ghcr = secrets.join("ghcr-pull-secret");
    wait_for("the added secret", || ghcr.exists());
    assert_eq!(
        std::fs::read_to_string(&ghcr).unwrap(),
        fixture("decoded-ghcr-pull-secret.json")
    );
    assert_eq!(
        std::fs::metadata(&ghcr).unwrap().permissions().mode() & 0o777,
        0o600
    );
    server.push(SECRETS_NS, &event_line("watch-secret-deleted.json"));
    let private = secrets.join("private-registry-pull-secret");
    wait_for("the deleted secret's file to go", || !private.exists());

    // No temporary file is left behind.
    assert_eq!(
        files(&plugins),
        [
            "wasmgate.header-tagger.yaml",
            "wasmgate.openid-connect.yaml"
        ]
    );
    assert_eq!(files(&secrets), ["ghcr-pull-secret", "legacy-registry"]);
    handle.stop();
}

#[test]
fn garbage_on_the_watch_stream_is_survived() {
    let server = standard_server();
    let dir = tempfile::tempdir().unwrap();
    let handle = start(&server, dir.path(), ROOT);
    assert!(handle.wait_synced(DEADLINE));
    let plugins = handle.plugins_dir();
    let secrets = handle.secrets_dir();

    // Each error makes the watcher back off (0.8 s, then 1.6 s, ...): two per stream at most.
    server.push(PLUGINS_NS, "this is not JSON");
    server.push(
        PLUGINS_NS,
        r#"{"type":"SURPRISE","object":{"kind":"WasmPlugin"}}"#,
    );
    // Valid, but a name that is no file name: not mirrored, and nothing written outside the folder.
    server.push(
        PLUGINS_NS,
        r#"{"type":"ADDED","object":{"apiVersion":"extensions.istio.io/v1alpha1","kind":"WasmPlugin","metadata":{"name":"../../escape","namespace":"wasmgate","resourceVersion":"48300"},"spec":{"url":"oci://x/y"}}}"#,
    );
    server.push(PLUGINS_ROOT, r#"{"type":"ADDED"}"#);
    server.push(PLUGINS_ROOT, r#"{"type":"ADDED","object":"a string"}"#);
    server.push(SECRETS_NS, r#"{"type":"MODIFIED","object":{"data":42}}"#);
    server.push(SECRETS_NS, "{\"type\":\"ADDED\",\"object\":{\"metadata\"");

    // The watchers live on: later events still arrive.
    server.push(PLUGINS_NS, &event_line("watch-wasmplugin-added.json"));
    let added = plugins.join("wasmgate.header-tagger.yaml");
    wait_for("an event after the garbage", || added.exists());
    server.push(SECRETS_NS, &event_line("watch-secret-added.json"));
    wait_for("a secret after the garbage", || {
        secrets.join("ghcr-pull-secret").exists()
    });
    assert_eq!(
        files(&plugins),
        [
            "istio-system.basic-auth.yaml",
            "wasmgate.header-tagger.yaml",
            "wasmgate.openid-connect.yaml"
        ]
    );
    assert!(!dir.path().join("escape").exists());
    handle.stop();
}

#[test]
fn an_expired_watch_relists_and_removes_what_went_meanwhile() {
    let server = standard_server();
    let dir = tempfile::tempdir().unwrap();
    let handle = start(&server, dir.path(), ROOT);
    assert!(handle.wait_synced(DEADLINE));
    let plugins = handle.plugins_dir();
    server.push(PLUGINS_NS, &event_line("watch-wasmplugin-added.json"));
    server.push(PLUGINS_NS, &event_line("watch-wasmplugin-modified.json"));
    let openid = plugins.join("wasmgate.openid-connect.yaml");
    wait_for("the events", || {
        plugins.join("wasmgate.header-tagger.yaml").exists()
            && manifest(&openid)["metadata"]["resourceVersion"] == "48261"
    });
    let inode = std::fs::metadata(&openid).unwrap().ino();

    // header-tagger is deleted while the watch is gone; the re-list no longer has it.
    server.set_list(PLUGINS_NS, "wasmplugins-wasmgate-relist.json");
    let lists_before = server
        .requests()
        .iter()
        .filter(|r| r.starts_with(&format!("{PLUGINS_NS}?")) && !r.contains("watch="))
        .count();
    server.push(PLUGINS_NS, &event_line("watch-expired.json"));
    server.close_watches(PLUGINS_NS);
    wait_for("the re-list to remove header-tagger", || {
        !plugins.join("wasmgate.header-tagger.yaml").exists()
    });
    let lists_after = server
        .requests()
        .iter()
        .filter(|r| r.starts_with(&format!("{PLUGINS_NS}?")) && !r.contains("watch="))
        .count();
    assert_eq!(lists_after, lists_before + 1);
    // openid-connect came back unchanged: its file was not rewritten.
    assert_eq!(std::fs::metadata(&openid).unwrap().ino(), inode);
    assert_eq!(
        files(&plugins),
        [
            "istio-system.basic-auth.yaml",
            "wasmgate.openid-connect.yaml"
        ]
    );
    handle.stop();
}

#[test]
fn a_restart_with_the_same_cluster_rewrites_nothing() {
    let server = standard_server();
    let dir = tempfile::tempdir().unwrap();
    let handle = start(&server, dir.path(), ROOT);
    assert!(handle.wait_synced(DEADLINE));
    let plugins = handle.plugins_dir();
    let secrets = handle.secrets_dir();
    let inodes = |dir: &Path| -> Vec<u64> {
        files(dir)
            .iter()
            .map(|f| std::fs::metadata(dir.join(f)).unwrap().ino())
            .collect()
    };
    let before = (inodes(&plugins), inodes(&secrets));
    handle.stop();

    let handle = start(&server, dir.path(), ROOT);
    assert!(handle.wait_synced(DEADLINE));
    assert_eq!((inodes(&plugins), inodes(&secrets)), before);
    handle.stop();
}

#[test]
fn the_root_namespace_equal_to_the_gateways_is_watched_once() {
    let server = standard_server();
    let dir = tempfile::tempdir().unwrap();
    let handle = start(&server, dir.path(), NS);
    assert!(handle.wait_synced(DEADLINE));
    assert_eq!(
        files(&handle.plugins_dir()),
        ["wasmgate.openid-connect.yaml"]
    );
    wait_for("the watches", || {
        server.open_watches(PLUGINS_NS) == 1 && server.open_watches(SECRETS_NS) == 1
    });
    let requests = server.requests();
    let plugin_lists = requests
        .iter()
        .filter(|r| r.starts_with(&format!("{PLUGINS_NS}?")) && !r.contains("watch="))
        .count();
    assert_eq!(plugin_lists, 1, "{requests:?}");
    assert!(!requests.iter().any(|r| r.contains(ROOT)), "{requests:?}");
    handle.stop();
}

#[test]
fn wait_synced_is_false_while_a_list_is_refused() {
    // RBAC refuses the Secrets: the plugins are mirrored, but the mirror is not synced.
    let server = FakeApiServer::start(&[
        (PLUGINS_NS, 200, "wasmplugins-wasmgate.json"),
        (PLUGINS_ROOT, 200, "wasmplugins-istio-system.json"),
        (SECRETS_NS, 403, "forbidden.json"),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let handle = start(&server, dir.path(), ROOT);
    let plugins = handle.plugins_dir();
    wait_for("the plugins", || files(&plugins).len() == 2);
    wait_for("a second try at the secrets", || {
        server
            .requests()
            .iter()
            .filter(|r| r.starts_with(&format!("{SECRETS_NS}?")))
            .count()
            >= 2
    });
    assert!(!handle.wait_synced(Duration::from_millis(200)));
    handle.stop();
}

#[test]
fn no_api_server_is_not_synced_and_stops_cleanly() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: \
             http://127.0.0.1:{port}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: \
             u\ncurrent-context: c\nusers:\n- name: u\n  user: {{}}\n"
        ),
    )
    .unwrap();
    let handle = KubeSource {
        // Empty: the kubeconfig context's namespace, here none, so "default".
        namespace: String::new(),
        root_namespace: ROOT.to_owned(),
        kubeconfig: Some(kubeconfig),
        mirror_dir: dir.path().join("mirror"),
    }
    .start()
    .unwrap();
    assert!(handle.plugins_dir().is_dir());
    assert!(handle.secrets_dir().is_dir());
    assert!(!handle.wait_synced(Duration::from_millis(300)));
    handle.stop();
}

#[test]
fn https_with_a_cluster_ca_and_a_bearer_token() {
    // As in a cluster: the API server's certificate from the cluster CA, a service account token.
    let server = FakeApiServer::start_tls(&[
        (PLUGINS_NS, 200, "wasmplugins-wasmgate.json"),
        (PLUGINS_ROOT, 200, "wasmplugins-istio-system.json"),
        (SECRETS_NS, 200, "secrets-wasmgate.json"),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let handle = start(&server, dir.path(), ROOT);
    assert!(handle.wait_synced(DEADLINE), "{:?}", server.requests());
    assert_eq!(
        files(&handle.plugins_dir()),
        [
            "istio-system.basic-auth.yaml",
            "wasmgate.openid-connect.yaml"
        ]
    );
    server.push(PLUGINS_NS, &event_line("watch-wasmplugin-added.json"));
    let added = handle.plugins_dir().join("wasmgate.header-tagger.yaml");
    wait_for("an event over TLS", || added.exists());
    handle.stop();
}
