//! Shared by the integration tests: the test plugins (built from source by `scripts/test.sh`) and
//! runtimes that share one compile cache so each module compiles once per test run.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use wasmgate_runtime::{PluginConfig, Runtime, RuntimeConfig, VmConfig};
use wasmgate_toolkit::harness::{Harness, RecordingHost};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read_plugin(path: PathBuf) -> Vec<u8> {
    std::fs::read(&path).unwrap_or_else(|error| {
        panic!(
            "test plugin {} is missing ({error}). Build the test plugins with scripts/build-plugins.sh \
             (scripts/test.sh does it for you).",
            path.display()
        )
    })
}

/// A Rust SDK plugin from `plugins/`, by crate name with underscores.
pub fn rust_plugin(name: &str) -> Vec<u8> {
    read_plugin(repo_root().join(format!("plugins/target/wasm32-wasip1/release/{name}.wasm")))
}

/// The AssemblyScript SDK plugin.
pub fn assemblyscript_plugin() -> Vec<u8> {
    read_plugin(repo_root().join("plugins/test-assemblyscript/build/plugin.wasm"))
}

/// A fresh runtime (its own shared data and metrics) over the common compile cache.
pub fn runtime() -> Arc<Runtime> {
    let cache_dir = repo_root().join("target/wasmgate-test-cache");
    Runtime::new(RuntimeConfig {
        cache_dir: Some(cache_dir),
        log_level: wasmgate_abi::LogLevel::Trace,
        ..Default::default()
    })
    .expect("runtime starts")
}

pub fn plugin(name: &str, configuration: &str) -> PluginConfig {
    PluginConfig {
        name: name.into(),
        root_id: String::new(),
        configuration: configuration.as_bytes().to_vec(),
    }
}

pub fn vm_config(vm_id: &str) -> VmConfig {
    VmConfig {
        vm_id: vm_id.into(),
        ..Default::default()
    }
}

pub fn harness(wasm: &[u8], configuration: &str) -> Harness {
    Harness::load(
        runtime(),
        wasm,
        vm_config("test"),
        plugin("test", configuration),
        RecordingHost::new(vec!["upstream_cluster".into()]),
    )
    .expect("plugin starts")
}
