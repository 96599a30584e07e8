use thiserror::Error;

/// Why a module could not be loaded. Each variant names what is wrong so an operator can act.
#[derive(Debug, Error)]
pub enum LoadError {
    #[error("not a WebAssembly module: {0}")]
    Invalid(String),
    #[error(
        "module exports no Proxy-Wasm ABI marker: expected one of proxy_abi_version_0_2_1, \
         proxy_abi_version_0_2_0 or proxy_abi_version_0_1_0"
    )]
    NoAbiMarker,
    #[error("module imports {} that no Proxy-Wasm host defines: {}", if .0.len() == 1 { "a function" } else { "functions" }, .0.join(", "))]
    UnknownImports(Vec<String>),
    #[error("module imports {kind} {name}: Proxy-Wasm modules must define their own")]
    UnsupportedImport { kind: &'static str, name: String },
    #[error("module import {name} has type {found}, but the host defines it as {expected}")]
    ImportTypeMismatch {
        name: String,
        found: String,
        expected: String,
    },
    #[error("module export {name} has type {found}, expected {expected}")]
    ExportTypeMismatch {
        name: String,
        found: String,
        expected: String,
    },
    #[error("module exports no memory named \"memory\"")]
    NoMemory,
    #[error("module exports no allocator: neither proxy_on_memory_allocate nor malloc")]
    NoAllocator,
    #[error("compiling the module failed: {0}")]
    Compile(String),
    #[error("linking the module failed: {0}")]
    Link(String),
    #[error("setting up the engine failed: {0}")]
    Engine(String),
}

/// A VM-level failure: a trap, a rejected start-up, or use of a VM that already failed.
#[derive(Debug, Error)]
pub enum VmError {
    #[error("plugin {plugin}: instantiating the module failed: {message}")]
    Instantiate { plugin: String, message: String },
    #[error("plugin {plugin}: {callback} returned false; the plugin rejected its {what}")]
    Rejected {
        plugin: String,
        callback: &'static str,
        what: &'static str,
    },
    #[error("plugin {plugin}: trap in {callback}: {message}")]
    Trap {
        plugin: String,
        callback: &'static str,
        message: String,
        backtrace: Option<String>,
    },
    #[error("plugin {plugin}: the VM failed earlier ({reason}) and serves no more callbacks")]
    Failed { plugin: String, reason: String },
    #[error("the module exports no function {0}")]
    MissingExport(String),
    #[error("unknown context id {0}")]
    UnknownContext(u32),
    #[error("unknown callout token {0}")]
    UnknownToken(u32),
    #[error("plugin {plugin}: a plugin with root id {root_id:?} is already running in this VM")]
    DuplicateRootId { plugin: String, root_id: String },
}

impl VmError {
    pub fn is_trap(&self) -> bool {
        matches!(self, VmError::Trap { .. })
    }
}
