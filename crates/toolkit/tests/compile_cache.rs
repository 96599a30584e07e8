//! The compile cache: once per process by sha256, and across runtimes (runs) through `.cwasm`
//! files in the cache folder, which are only written for modules the host accepts and are ignored
//! when unusable.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{plugin, rust_plugin, vm_config};
use wasmgate_runtime::{CompiledModule, LoadError, Runtime, RuntimeConfig};
use wasmgate_toolkit::harness::{Harness, Message, RecordingHost};

fn minimal() -> Vec<u8> {
    rust_plugin("test_minimal")
}

fn runtime_on(dir: &Path) -> Arc<Runtime> {
    Runtime::new(RuntimeConfig {
        cache_dir: Some(dir.to_path_buf()),
        ..Default::default()
    })
    .expect("runtime starts")
}

/// Every file in the cache folder, sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    files
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

/// The one cache entry for `module`: named `<sha256>-<engine key>.cwasm`.
fn cache_file(dir: &Path, module: &CompiledModule) -> PathBuf {
    let entries: Vec<PathBuf> = files(dir)
        .into_iter()
        .filter(|p| file_name(p).starts_with(module.sha256()))
        .collect();
    assert_eq!(
        entries.len(),
        1,
        "one cache entry for {}: {:?}",
        module.sha256(),
        files(dir)
    );
    let path = entries.into_iter().next().unwrap();
    let name = file_name(&path);
    assert!(name.ends_with(".cwasm"), "{name}");
    assert_eq!(
        name.as_bytes()[64],
        b'-',
        "{name}: the sha256, then the engine key"
    );
    path
}

/// Runs one request through `module` and checks test_minimal's header on both sides.
fn check_runs(runtime: Arc<Runtime>, module: &Arc<CompiledModule>) {
    let mut h = Harness::new(
        runtime,
        module,
        vm_config("cache"),
        plugin("minimal", ""),
        RecordingHost::default(),
    )
    .expect("plugin starts");
    let exchange = h
        .exchange(Message::request("GET", "/"), &mut |_: &Message| {
            Message::response(200)
        })
        .unwrap();
    let sent = exchange.upstream_request.expect("request reached upstream");
    assert_eq!(sent.headers.get_str("x-minimal"), Some("1"));
    let response = exchange.response.expect("a response");
    assert_eq!(response.headers.get_str("x-minimal"), Some("1"));
    assert_eq!(h.vm.context_ids(), vec![h.root]);
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[test]
fn same_bytes_load_once_per_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime_on(dir.path());
    let wasm = minimal();
    let first = runtime.load(&wasm).unwrap();
    assert!(
        !first.from_disk_cache(),
        "an empty cache folder has nothing to offer"
    );
    let second = runtime.load(&wasm).unwrap();
    assert!(Arc::ptr_eq(&first, &second), "the same compiled module");
    assert_eq!(first.size(), wasm.len());
    assert!(is_sha256_hex(first.sha256()), "{}", first.sha256());

    // The entry was written, atomically: no temporary file is left behind.
    let entry = cache_file(dir.path(), &first);
    assert_eq!(files(dir.path()), vec![entry.clone()]);
    assert!(std::fs::metadata(&entry).unwrap().len() > 0);
    check_runs(runtime, &first);
}

#[test]
fn a_second_runtime_loads_from_the_disk_cache() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = minimal();
    let compiled = runtime_on(dir.path()).load(&wasm).unwrap();
    assert!(!compiled.from_disk_cache());
    let entry = cache_file(dir.path(), &compiled);

    let runtime = runtime_on(dir.path());
    let cached = runtime.load(&wasm).unwrap();
    assert!(
        cached.from_disk_cache(),
        "compiled code came from {entry:?}"
    );
    assert!(
        !Arc::ptr_eq(&compiled, &cached),
        "a new runtime, a new module"
    );
    assert_eq!(cached.sha256(), compiled.sha256());
    assert_eq!(cached.abi_version(), compiled.abi_version());
    assert_eq!(cached.info().callbacks, compiled.info().callbacks);
    assert_eq!(cached.info().imports, compiled.info().imports);
    assert_eq!(
        files(dir.path()),
        vec![entry],
        "loading from the cache writes nothing new"
    );
    check_runs(runtime, &cached);
}

#[test]
fn a_garbage_cache_entry_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = minimal();
    let compiled = runtime_on(dir.path()).load(&wasm).unwrap();
    let entry = cache_file(dir.path(), &compiled);
    std::fs::write(&entry, b"this is not compiled code at all").unwrap();

    let runtime = runtime_on(dir.path());
    let module = runtime.load(&wasm).expect("falls back to compiling");
    assert!(!module.from_disk_cache());
    check_runs(runtime, &module);

    // The unusable entry was replaced by a good one, which the next run uses.
    let again = runtime_on(dir.path()).load(&wasm).unwrap();
    assert!(again.from_disk_cache());
    assert_eq!(cache_file(dir.path(), &again), entry);
}

#[test]
fn a_truncated_cache_entry_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = minimal();
    let compiled = runtime_on(dir.path()).load(&wasm).unwrap();
    let entry = cache_file(dir.path(), &compiled);
    let bytes = std::fs::read(&entry).unwrap();
    for keep in [bytes.len() / 2, 64, 0] {
        std::fs::write(&entry, &bytes[..keep]).unwrap();
        let runtime = runtime_on(dir.path());
        let module = runtime
            .load(&wasm)
            .unwrap_or_else(|e| panic!("cache entry cut to {keep} bytes: {e}"));
        assert!(!module.from_disk_cache(), "cut to {keep} bytes");
        check_runs(runtime, &module);
        assert_eq!(
            std::fs::read(&entry).unwrap().len(),
            bytes.len(),
            "the entry was written again whole"
        );
    }
}

#[test]
fn refused_modules_leave_no_cache_entry() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime_on(dir.path());
    let no_marker = wat::parse_str(
        r#"(module (memory (export "memory") 1)
             (func (export "malloc") (param i32) (result i32) (i32.const 0)))"#,
    )
    .unwrap();
    let error = runtime.load(&no_marker).err().expect("no ABI marker");
    assert!(matches!(error, LoadError::NoAbiMarker), "{error:?}");

    let unknown_import = wat::parse_str(
        r#"(module (import "env" "proxy_frobnicate" (func))
             (memory (export "memory") 1)
             (func (export "malloc") (param i32) (result i32) (i32.const 0))
             (func (export "proxy_abi_version_0_2_1")))"#,
    )
    .unwrap();
    let error = runtime.load(&unknown_import).err().expect("unknown import");
    assert!(matches!(error, LoadError::UnknownImports(_)), "{error:?}");

    let error = runtime.load(b"\0asm\x01\0\0\0garbage").err().unwrap();
    assert!(matches!(error, LoadError::Invalid(_)), "{error:?}");

    assert_eq!(
        files(dir.path()),
        Vec::<PathBuf>::new(),
        "nothing refused was cached"
    );

    // Refused again by a later load, not served from any cache.
    assert!(matches!(
        runtime.load(&no_marker),
        Err(LoadError::NoAbiMarker)
    ));

    // An accepted module next to them is cached as usual.
    let accepted = runtime.load(&minimal()).unwrap();
    assert_eq!(files(dir.path()), vec![cache_file(dir.path(), &accepted)]);
}

#[test]
fn sha256_names_the_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime_on(dir.path());
    let minimal = runtime.load(&minimal()).unwrap();
    let other = runtime.load(&rust_plugin("add_header")).unwrap();
    for module in [&minimal, &other] {
        assert!(is_sha256_hex(module.sha256()), "{}", module.sha256());
    }
    assert_ne!(minimal.sha256(), other.sha256());
    // The same bytes give the same digest in another runtime.
    let again = runtime_on(dir.path())
        .load(&rust_plugin("test_minimal"))
        .unwrap();
    assert_eq!(again.sha256(), minimal.sha256());
    // An appended custom section changes the bytes (not the code), and so the digest.
    let mut changed = rust_plugin("test_minimal");
    changed.extend_from_slice(&[0, 2, 1, b'x']);
    let changed = runtime.load(&changed).unwrap();
    assert_ne!(changed.sha256(), minimal.sha256());
    assert!(!Arc::ptr_eq(&changed, &minimal));
    assert_eq!(files(dir.path()).len(), 3, "{:?}", files(dir.path()));
}

#[test]
fn runtimes_sharing_a_folder_load_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = Arc::new(minimal());
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let dir = dir.path().to_path_buf();
            let wasm = wasm.clone();
            std::thread::spawn(move || {
                let runtime = runtime_on(&dir);
                let module = runtime.load(&wasm).expect("loads");
                check_runs(runtime, &module);
                module.sha256().to_owned()
            })
        })
        .collect();
    let digests: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(digests.iter().all(|d| d == &digests[0]));
    // Whatever the interleaving, one whole entry is left, and it is usable.
    let runtime = runtime_on(dir.path());
    let module = runtime.load(&wasm).unwrap();
    assert!(module.from_disk_cache(), "{:?}", files(dir.path()));
    assert_eq!(files(dir.path()), vec![cache_file(dir.path(), &module)]);
    check_runs(runtime, &module);
}
