//! Kubernetes as the source of WasmPlugins and image pull Secrets.
//!
//! The gateway already validates and hot-reloads a folder of WasmPlugin manifests (`plugins_dir`) and
//! a folder of dockerconfigjson files (`pull_secrets_dir`). This crate mirrors the cluster into two
//! such folders, so objects from Kubernetes go through exactly the same validation and reload path as
//! files an operator writes by hand:
//!
//! - `<mirror>/plugins/<namespace>.<name>.yaml`: every `extensions.istio.io/v1alpha1` WasmPlugin in
//!   the gateway's namespace and in the root namespace, as a manifest (`apiVersion`, `kind`,
//!   `metadata` with name, namespace, labels, creationTimestamp and resourceVersion, and `spec` as
//!   the API server returned it);
//! - `<mirror>/secrets/<name>`: the decoded `.dockerconfigjson` (or `.dockercfg`) of every Secret of
//!   type `kubernetes.io/dockerconfigjson` (or `kubernetes.io/dockercfg`) in the gateway's
//!   namespace, mode 0600.
//!
//! Files are replaced atomically (a temporary file whose name does not end in `.yaml`, then a
//! rename) and only when their content changes; deleted objects lose their file; files of objects
//! that no longer exist (from an earlier run, or missed while disconnected) are removed when a list
//! completes. The watching is `kube`'s runtime watcher (list, then watch from the list's
//! resourceVersion, re-list when the version expires) with its default backoff, on a thread of its
//! own with its own Tokio runtime.

use std::collections::HashSet;
use std::fmt::Debug;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, Resource, ResourceExt as _};
use serde::de::DeserializeOwned;

/// Istio's WasmPlugin API, as its CRD defines it.
pub const WASM_PLUGIN_GROUP: &str = "extensions.istio.io";
pub const WASM_PLUGIN_VERSION: &str = "v1alpha1";
pub const WASM_PLUGIN_KIND: &str = "WasmPlugin";
pub const WASM_PLUGIN_PLURAL: &str = "wasmplugins";

/// The Secret types whose registry credentials are mirrored, and the data key of each.
const PULL_SECRET_TYPES: [(&str, &str); 2] = [
    ("kubernetes.io/dockerconfigjson", ".dockerconfigjson"),
    ("kubernetes.io/dockercfg", ".dockercfg"),
];

const PLUGINS_FOLDER: &str = "plugins";
const SECRETS_FOLDER: &str = "secrets";
const HEADER: &str =
    "# Mirrored from the Kubernetes API by Wasmgate; edits here are overwritten.\n";

/// Where and what to watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeSource {
    /// The gateway's namespace: its WasmPlugins and pull Secrets are mirrored. Empty: the client
    /// configuration's namespace (in a cluster, the pod's own, from its service account).
    pub namespace: String,
    /// Istio's root namespace (`istio-system` by default): its WasmPlugins apply to every workload.
    /// Empty, or equal to `namespace`: only `namespace` is watched.
    pub root_namespace: String,
    /// A kubeconfig file; without it the in-cluster service account, or `KUBECONFIG` /
    /// `~/.kube/config`, in that order of what is found (`kube::Config::infer`).
    pub kubeconfig: Option<PathBuf>,
    /// The folder that receives `plugins/` and `secrets/`. It belongs to the mirror: files in it
    /// that do not stand for a watched object are removed.
    pub mirror_dir: PathBuf,
}

/// Why the mirror could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "no Kubernetes client configuration: not running in a cluster (no service account token) \
         and no usable kubeconfig (KUBECONFIG or ~/.kube/config); set kubernetes.kubeconfig to a \
         kubeconfig file, or run the gateway in a pod with a service account ({0})"
    )]
    NoConfig(String),
    #[error("kubeconfig {path}: {reason}; check the file, or leave kubernetes.kubeconfig unset")]
    Kubeconfig { path: PathBuf, reason: String },
    #[error("cannot create the Kubernetes client: {0}")]
    Client(String),
    #[error(
        "invalid namespace {0:?}: a Kubernetes namespace is a DNS label (lower-case letters, digits \
         and '-', at most 63 characters)"
    )]
    Namespace(String),
    #[error("the mirror folder {path}: {source}")]
    MirrorDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the Kubernetes watcher thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The running mirror. Dropping it stops the watching without waiting; [`KubeHandle::stop`] waits.
pub struct KubeHandle {
    plugins_dir: PathBuf,
    secrets_dir: PathBuf,
    sync: Arc<SyncState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Debug for KubeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeHandle")
            .field("plugins_dir", &self.plugins_dir)
            .field("secrets_dir", &self.secrets_dir)
            .finish_non_exhaustive()
    }
}

impl KubeSource {
    /// Loads the client configuration, creates the mirror folders and starts watching on a thread
    /// of its own; returns at once. Use [`KubeHandle::wait_synced`] before the first load.
    pub fn start(self) -> Result<KubeHandle, KubeError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(KubeError::Thread)?;
        let (client, default_namespace) = runtime.block_on(client(self.kubeconfig.as_deref()))?;

        let namespace = if self.namespace.is_empty() {
            default_namespace
        } else {
            self.namespace
        };
        check_namespace(&namespace)?;
        let mut plugin_namespaces = vec![namespace.clone()];
        if !self.root_namespace.is_empty() && self.root_namespace != namespace {
            check_namespace(&self.root_namespace)?;
            plugin_namespaces.push(self.root_namespace);
        }

        let plugins_dir = self.mirror_dir.join(PLUGINS_FOLDER);
        let secrets_dir = self.mirror_dir.join(SECRETS_FOLDER);
        prepare_folder(&plugins_dir, 0o755)?;
        prepare_folder(&secrets_dir, 0o700)?;
        // Files of namespaces no longer watched (an earlier configuration) and temporary files of an
        // interrupted write; the files of watched namespaces wait for their list to complete.
        remove_files(&plugins_dir, |name| {
            !plugin_namespaces
                .iter()
                .any(|ns| owns_plugin_file(ns, name))
        });
        remove_files(&secrets_dir, |name| name.starts_with('.'));

        // One watcher per namespace for WasmPlugins, one for Secrets.
        let sync = Arc::new(SyncState::new(plugin_namespaces.len() + 1));
        let resource = wasm_plugin_resource();
        let mut tasks: Vec<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>> = Vec::new();
        for ns in &plugin_namespaces {
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource);
            let folder = Folder {
                dir: plugins_dir.clone(),
                mode: 0o644,
                what: format!("WasmPlugins in namespace {ns}"),
                owns: Owns::PluginsOf(ns.clone()),
            };
            let resource = resource.clone();
            let namespace = ns.clone();
            let render = move |object: &DynamicObject| plugin_file(object, &resource, &namespace);
            tasks.push(Box::pin(mirror(api, folder, render, sync.clone())));
        }
        let api: Api<Secret> = Api::namespaced(client, &namespace);
        let folder = Folder {
            dir: secrets_dir.clone(),
            mode: 0o600,
            what: format!("Secrets in namespace {namespace}"),
            owns: Owns::Everything,
        };
        tasks.push(Box::pin(mirror(api, folder, secret_file, sync.clone())));

        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tracing::info!(
            "mirroring WasmPlugins of {} and pull Secrets of {namespace} into {}",
            plugin_namespaces.join(", "),
            self.mirror_dir.display()
        );
        let thread = std::thread::Builder::new()
            .name("wasmgate-kube".to_owned())
            .spawn(move || {
                runtime.block_on(async move {
                    let handles: Vec<_> = tasks.into_iter().map(tokio::spawn).collect();
                    // A dropped handle is a stop too.
                    let _ = stopped.await;
                    for handle in handles {
                        handle.abort();
                    }
                });
            })
            .map_err(KubeError::Thread)?;
        Ok(KubeHandle {
            plugins_dir,
            secrets_dir,
            sync,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl KubeHandle {
    /// The folder of WasmPlugin manifests: the gateway's `plugins_dir`.
    pub fn plugins_dir(&self) -> PathBuf {
        self.plugins_dir.clone()
    }

    /// The folder of dockerconfigjson files named after their Secrets: the gateway's
    /// `pull_secrets_dir`.
    pub fn secrets_dir(&self) -> PathBuf {
        self.secrets_dir.clone()
    }

    /// Blocks until the initial lists of all watched resources are mirrored (or timeout): the
    /// gateway calls this before its first load so it starts with the cluster's plugins. False on
    /// timeout; the mirror goes on trying and fills the folders when the API server answers.
    pub fn wait_synced(&self, timeout: Duration) -> bool {
        self.sync.wait(timeout)
    }

    /// Stops watching and waits for the watcher thread to end. The mirrored files stay.
    pub fn stop(mut self) {
        self.signal_stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for KubeHandle {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

/// The client, and the namespace its configuration names (the pod's own in a cluster).
async fn client(kubeconfig: Option<&Path>) -> Result<(Client, String), KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig_error = |reason: String| KubeError::Kubeconfig {
                path: path.to_owned(),
                reason,
            };
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| kubeconfig_error(error_chain(&e)))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| kubeconfig_error(error_chain(&e)))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| KubeError::NoConfig(error_chain(&e)))?,
    };
    let namespace = config.default_namespace.clone();
    // rustls needs a process-wide provider when more than one is compiled in; ring is the
    // gateway's. An error only says one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client::try_from(config).map_err(|e| KubeError::Client(error_chain(&e)))?;
    Ok((client, namespace))
}

/// An error with its sources, `a: b: c`.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn check_namespace(namespace: &str) -> Result<(), KubeError> {
    let valid = !namespace.is_empty()
        && namespace.len() <= 63
        && namespace
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !namespace.starts_with('-')
        && !namespace.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(KubeError::Namespace(namespace.to_owned()))
    }
}

/// The WasmPlugin resource, as Istio's CRD declares it.
fn wasm_plugin_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk(WASM_PLUGIN_GROUP, WASM_PLUGIN_VERSION, WASM_PLUGIN_KIND);
    ApiResource::from_gvk_with_plural(&gvk, WASM_PLUGIN_PLURAL)
}

fn prepare_folder(dir: &Path, mode: u32) -> Result<(), KubeError> {
    let error = |source| KubeError::MirrorDir {
        path: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(error)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(error)
}

/// Counts the watchers whose first list is not mirrored yet.
struct SyncState {
    pending: Mutex<usize>,
    changed: Condvar,
}

impl SyncState {
    fn new(watchers: usize) -> Self {
        SyncState {
            pending: Mutex::new(watchers),
            changed: Condvar::new(),
        }
    }

    fn one_synced(&self) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        *pending = pending.saturating_sub(1);
        self.changed.notify_all();
    }

    fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        while *pending > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            pending = self
                .changed
                .wait_timeout(pending, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

/// Which files of a folder a watcher answers for.
enum Owns {
    /// `<namespace>.<name>.yaml` (a namespace has no dot, so the first dot ends it).
    PluginsOf(String),
    /// Every file but temporary ones.
    Everything,
}

impl Owns {
    fn owns(&self, file: &str) -> bool {
        match self {
            Owns::PluginsOf(namespace) => owns_plugin_file(namespace, file),
            Owns::Everything => !file.starts_with('.'),
        }
    }
}

fn owns_plugin_file(namespace: &str, file: &str) -> bool {
    file.strip_prefix(namespace)
        .and_then(|rest| rest.strip_prefix('.'))
        .is_some_and(|rest| rest.len() > ".yaml".len() && rest.ends_with(".yaml"))
}

/// A mirror folder, as one watcher sees it.
struct Folder {
    dir: PathBuf,
    mode: u32,
    /// For logs: "WasmPlugins in namespace x".
    what: String,
    owns: Owns,
}

/// What an object becomes in its folder.
enum Rendered {
    /// This file, with these bytes.
    File(String, Vec<u8>),
    /// This file must not exist (a Secret of another type, or without its data).
    Absent(String),
    /// Nothing to do: the object cannot be mirrored (the reason was logged).
    Skip,
}

/// Watches one resource in one namespace and keeps its folder in step, for as long as it is polled.
async fn mirror<K, F>(api: Api<K>, folder: Folder, render: F, sync: Arc<SyncState>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    F: Fn(&K) -> Rendered,
{
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    // The files of the list in progress; None between lists.
    let mut listing: Option<HashSet<String>> = None;
    let mut synced = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => listing = Some(HashSet::new()),
            Ok(watcher::Event::InitApply(object)) => {
                let name = folder.apply(render(&object));
                if let (Some(listing), Some(name)) = (listing.as_mut(), name) {
                    listing.insert(name);
                }
            }
            Ok(watcher::Event::InitDone) => {
                let keep = listing.take().unwrap_or_default();
                remove_files(&folder.dir, |file| {
                    folder.owns.owns(file) && !keep.contains(file)
                });
                if !synced {
                    synced = true;
                    tracing::info!("{}: initial list mirrored", folder.what);
                    sync.one_synced();
                } else {
                    tracing::debug!("{}: list mirrored again", folder.what);
                }
            }
            Ok(watcher::Event::Apply(object)) => {
                folder.apply(render(&object));
            }
            Ok(watcher::Event::Delete(object)) => {
                let name = match render(&object) {
                    Rendered::File(name, _) | Rendered::Absent(name) => name,
                    Rendered::Skip => continue,
                };
                folder.remove(&name);
            }
            Err(error) => tracing::warn!("{}: {}", folder.what, watch_error_hint(&error)),
        }
    }
}

/// The watcher's error, with what to do about the usual ones.
fn watch_error_hint(error: &watcher::Error) -> String {
    let status = match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => Some(status.code),
        watcher::Error::WatchError(status) => Some(status.code),
        _ => None,
    };
    let hint = match status {
        Some(403) => {
            "; the gateway's service account lacks get/list/watch on it: see the Role in \
             deploy/kubernetes/wasmgate.yaml"
        }
        Some(404) => {
            "; for WasmPlugins, is Istio's WasmPlugin CRD installed? \
             (deploy/kubernetes/wasmplugin-crd.yaml)"
        }
        Some(401) => "; the credentials were refused",
        _ => "",
    };
    format!("{}{hint} (retrying)", error_chain(error))
}

impl Folder {
    /// Writes or removes an object's file; the file name, when the object has one.
    fn apply(&self, rendered: Rendered) -> Option<String> {
        match rendered {
            Rendered::File(name, contents) => {
                if let Err(e) = self.write(&name, &contents) {
                    tracing::error!("{}: cannot write {name}: {e}", self.what);
                }
                Some(name)
            }
            Rendered::Absent(name) => {
                self.remove(&name);
                None
            }
            Rendered::Skip => None,
        }
    }

    /// Replaces the file atomically, unless it holds these bytes already (with the folder's mode).
    fn write(&self, name: &str, contents: &[u8]) -> std::io::Result<()> {
        let path = self.dir.join(name);
        if let Ok(metadata) = std::fs::metadata(&path)
            && metadata.permissions().mode() & 0o777 == self.mode
            && metadata.len() == contents.len() as u64
            && std::fs::read(&path).is_ok_and(|old| old == contents)
        {
            return Ok(());
        }
        // A name the gateway never reads: hidden, and not ending in .yaml.
        let temporary = self.dir.join(format!(".{name}.tmp"));
        let result = (|| {
            let _ = std::fs::remove_file(&temporary);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(self.mode)
                .open(&temporary)?;
            file.write_all(contents)?;
            // The umask may have narrowed the mode given at creation.
            file.set_permissions(std::fs::Permissions::from_mode(self.mode))?;
            file.sync_all()?;
            drop(file);
            std::fs::rename(&temporary, &path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&temporary);
        } else {
            tracing::debug!("{}: wrote {name}", self.what);
        }
        result
    }

    fn remove(&self, name: &str) {
        match std::fs::remove_file(self.dir.join(name)) {
            Ok(()) => tracing::debug!("{}: removed {name}", self.what),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::error!("{}: cannot remove {name}: {e}", self.what),
        }
    }
}

/// Removes the files of `dir` whose names `condemned` picks (sub-folders are left alone).
fn remove_files(dir: &Path, condemned: impl Fn(&str) -> bool) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            tracing::error!("cannot read {}: {e}", dir.display());
            return;
        }
    };
    for entry in entries.filter_map(Result::ok) {
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if is_dir || !condemned(name) {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => tracing::info!("removed {}: no such object in the cluster", name),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::error!("cannot remove {}: {e}", entry.path().display()),
        }
    }
}

/// A name the API server accepts is a safe file name; anything else is refused here too.
fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// A WasmPlugin as a manifest the gateway reads: `<namespace>.<name>.yaml`.
fn plugin_file(object: &DynamicObject, resource: &ApiResource, namespace: &str) -> Rendered {
    let name = object.name_any();
    let object_namespace = object.metadata.namespace.as_deref().unwrap_or(namespace);
    if !safe_name(&name) || object_namespace != namespace {
        tracing::warn!(
            "WasmPlugin {object_namespace}/{name}: unexpected name or namespace, not mirrored"
        );
        return Rendered::Skip;
    }
    match plugin_manifest(object, resource, namespace) {
        Ok(text) => Rendered::File(format!("{namespace}.{name}.yaml"), text.into_bytes()),
        Err(e) => {
            tracing::warn!("WasmPlugin {namespace}/{name}: cannot write it as YAML: {e}");
            Rendered::Skip
        }
    }
}

/// The manifest text: `apiVersion`, `kind`, the metadata the gateway uses, and `spec` as the API
/// server returned it.
fn plugin_manifest(
    object: &DynamicObject,
    resource: &ApiResource,
    namespace: &str,
) -> Result<String, serde_yaml::Error> {
    let meta = &object.metadata;
    let mut metadata = serde_json::Map::new();
    metadata.insert("name".into(), object.name_any().into());
    metadata.insert(
        "namespace".into(),
        meta.namespace.as_deref().unwrap_or(namespace).into(),
    );
    if let Some(labels) = &meta.labels {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
            .collect();
        metadata.insert("labels".into(), serde_json::Value::Object(labels));
    }
    if let Some(created) = &meta.creation_timestamp
        && let Ok(created) = serde_json::to_value(created)
    {
        metadata.insert("creationTimestamp".into(), created);
    }
    if let Some(version) = &meta.resource_version {
        metadata.insert("resourceVersion".into(), version.as_str().into());
    }
    let mut manifest = serde_json::Map::new();
    let (api_version, kind) = match &object.types {
        Some(types) => (types.api_version.clone(), types.kind.clone()),
        None => (resource.api_version.clone(), resource.kind.clone()),
    };
    manifest.insert("apiVersion".into(), api_version.into());
    manifest.insert("kind".into(), kind.into());
    manifest.insert("metadata".into(), serde_json::Value::Object(metadata));
    if let Some(spec) = object.data.get("spec") {
        manifest.insert("spec".into(), spec.clone());
    }
    let yaml = serde_yaml::to_string(&serde_json::Value::Object(manifest))?;
    Ok(format!("{HEADER}{yaml}"))
}

/// A pull Secret as the dockerconfigjson file the gateway reads: `<name>`. Its contents are never
/// logged.
fn secret_file(secret: &Secret) -> Rendered {
    let name = secret.name_any();
    if !safe_name(&name) {
        tracing::warn!("Secret {name:?}: unexpected name, not mirrored");
        return Rendered::Skip;
    }
    let secret_type = secret.type_.as_deref().unwrap_or("Opaque");
    let Some((_, key)) = PULL_SECRET_TYPES.iter().find(|(t, _)| *t == secret_type) else {
        return Rendered::Absent(name);
    };
    match secret.data.as_ref().and_then(|data| data.get(*key)) {
        Some(bytes) => Rendered::File(name, bytes.0.clone()),
        None => {
            tracing::warn!("Secret {name} of type {secret_type} has no {key} data, not mirrored");
            Rendered::Absent(name)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_files_belong_to_their_namespace() {
        assert!(owns_plugin_file("ns", "ns.p.yaml"));
        assert!(owns_plugin_file("ns", "ns.my.plugin.yaml"));
        assert!(!owns_plugin_file("ns", "ns2.p.yaml"));
        assert!(!owns_plugin_file("ns", "ns..yaml"));
        assert!(!owns_plugin_file("ns", ".ns.p.yaml.tmp"));
        assert!(!owns_plugin_file("ns", "ns.p.yaml.tmp"));
        assert!(!Owns::Everything.owns(".s.tmp"));
        assert!(Owns::Everything.owns("s"));
    }

    #[test]
    fn namespaces_are_dns_labels() {
        assert!(check_namespace("istio-system").is_ok());
        for bad in ["", "a.b", "A", "-a", "a-", "../x", &"a".repeat(64)] {
            assert!(check_namespace(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_that_are_not_file_names_are_refused() {
        assert!(safe_name("my.plugin-1"));
        for bad in ["", ".", "..", ".hidden", "a/b", "A"] {
            assert!(!safe_name(bad), "{bad}");
        }
    }

    #[test]
    fn a_missing_kubeconfig_is_an_actionable_error() {
        let source = KubeSource {
            namespace: "ns".into(),
            root_namespace: "istio-system".into(),
            kubeconfig: Some("/no/such/kubeconfig".into()),
            mirror_dir: std::env::temp_dir().join("wasmgate-kube-never-created"),
        };
        let error = source.start().unwrap_err();
        let text = error.to_string();
        assert!(matches!(error, KubeError::Kubeconfig { .. }), "{text}");
        assert!(text.contains("/no/such/kubeconfig"), "{text}");
    }
}
