//! A module checked against the ABI and linked once: its version, its callbacks, and an
//! `InstancePre` that makes each VM a cheap instantiation.

use std::collections::HashMap;

use wasmgate_abi::AbiVersion;
use wasmtime::{ExternType, FuncType, InstancePre, Module, ValType};

use crate::error::LoadError;
use crate::state::VmState;

/// Callbacks the host calls, with their parameter count and whether they return a value.
/// Every parameter and result is an i32.
pub const CALLBACKS: &[(&str, usize, bool)] = &[
    ("proxy_on_memory_allocate", 1, true),
    ("malloc", 1, true),
    ("proxy_on_context_create", 2, false),
    ("proxy_on_vm_start", 2, true),
    ("proxy_on_configure", 2, true),
    ("proxy_on_tick", 1, false),
    ("proxy_on_queue_ready", 2, false),
    ("proxy_on_foreign_function", 3, false),
    ("proxy_on_done", 1, true),
    ("proxy_on_log", 1, false),
    ("proxy_on_delete", 1, false),
    ("proxy_on_new_connection", 1, true),
    ("proxy_on_downstream_data", 3, true),
    ("proxy_on_upstream_data", 3, true),
    ("proxy_on_downstream_connection_close", 2, false),
    ("proxy_on_upstream_connection_close", 2, false),
    ("proxy_on_request_headers", 3, true),
    ("proxy_on_request_body", 3, true),
    ("proxy_on_request_trailers", 2, true),
    ("proxy_on_response_headers", 3, true),
    ("proxy_on_response_body", 3, true),
    ("proxy_on_response_trailers", 2, true),
    ("proxy_on_http_call_response", 5, false),
    ("proxy_on_grpc_receive_initial_metadata", 3, false),
    ("proxy_on_grpc_receive", 3, false),
    ("proxy_on_grpc_receive_trailing_metadata", 3, false),
    ("proxy_on_grpc_close", 3, false),
    ("_initialize", 0, false),
    ("_start", 0, false),
];

/// A callback by its place in [`CALLBACKS`], so that the data path finds it by index instead of
/// hashing its name on every call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CallbackId(usize);

impl CallbackId {
    /// Meant for const contexts (see `callback!`), where an unknown name fails the build.
    pub(crate) const fn of(name: &str) -> Self {
        let mut index = 0;
        while index < CALLBACKS.len() {
            if same_bytes(CALLBACKS[index].0.as_bytes(), name.as_bytes()) {
                return Self(index);
            }
            index += 1;
        }
        panic!("not a callback the host calls")
    }

    pub(crate) fn name(self) -> &'static str {
        CALLBACKS[self.0].0
    }

    pub(crate) fn index(self) -> usize {
        self.0
    }
}

const fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The [`CallbackId`] of a callback name, resolved at compile time.
macro_rules! callback {
    ($name:literal) => {{
        const ID: $crate::module::CallbackId = $crate::module::CallbackId::of($name);
        ID
    }};
}
pub(crate) use callback;

/// What a module exports, as the host sees it.
#[derive(Debug, Clone)]
pub struct ModuleInfo {
    pub abi_version: AbiVersion,
    /// The exported Proxy-Wasm callbacks and start functions, sorted.
    pub callbacks: Vec<String>,
    /// Imported functions as `module.name`.
    pub imports: Vec<String>,
}

/// A module compiled for this process's engine and linked against the host.
pub struct CompiledModule {
    pub(crate) pre: InstancePre<VmState>,
    pub(crate) info: ModuleInfo,
    pub(crate) sha256: String,
    pub(crate) size: usize,
    pub(crate) from_disk_cache: bool,
}

impl CompiledModule {
    pub fn info(&self) -> &ModuleInfo {
        &self.info
    }

    pub fn abi_version(&self) -> AbiVersion {
        self.info.abi_version
    }

    /// Lower-case hex sha256 of the module's bytes.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Whether compiled code came from the on-disk cache rather than a fresh compilation.
    pub fn from_disk_cache(&self) -> bool {
        self.from_disk_cache
    }
}

fn describe(ty: &FuncType) -> String {
    let list = |types: Vec<ValType>| {
        types
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "({}) -> ({})",
        list(ty.params().collect()),
        list(ty.results().collect())
    )
}

fn expected(params: usize, result: bool) -> String {
    format!(
        "({}) -> ({})",
        vec!["i32"; params].join(", "),
        if result { "i32" } else { "" }
    )
}

/// Checks the module's exports against the ABI: the marker, memory, an allocator, and the type of
/// every callback it exports.
pub(crate) fn inspect(module: &Module) -> Result<ModuleInfo, LoadError> {
    let mut abi_version = None;
    let mut funcs: HashMap<String, FuncType> = HashMap::new();
    let mut has_memory = false;
    for export in module.exports() {
        match export.ty() {
            ExternType::Func(ty) => {
                if let Some(version) = AbiVersion::from_marker(export.name()) {
                    abi_version = abi_version.max(Some(version));
                }
                funcs.insert(export.name().to_owned(), ty);
            }
            ExternType::Memory(_) if export.name() == "memory" => has_memory = true,
            _ => {}
        }
    }
    let abi_version = abi_version.ok_or(LoadError::NoAbiMarker)?;
    if !has_memory {
        return Err(LoadError::NoMemory);
    }
    if !funcs.contains_key("proxy_on_memory_allocate") && !funcs.contains_key("malloc") {
        return Err(LoadError::NoAllocator);
    }
    let mut callbacks = Vec::new();
    for &(name, mut params, result) in CALLBACKS {
        let Some(ty) = funcs.get(name) else { continue };
        if abi_version == AbiVersion::V0_1_0
            && matches!(
                name,
                "proxy_on_request_headers" | "proxy_on_response_headers"
            )
        {
            params = 2; // 0.1.0 has no end_of_stream argument.
        }
        let ok = ty.params().len() == params
            && ty.params().all(|t| matches!(t, ValType::I32))
            && ty
                .results()
                .map(|t| matches!(t, ValType::I32))
                .collect::<Vec<_>>()
                == if result { vec![true] } else { vec![] };
        if !ok {
            return Err(LoadError::ExportTypeMismatch {
                name: name.to_owned(),
                found: describe(ty),
                expected: expected(params, result),
            });
        }
        callbacks.push(name.to_owned());
    }
    callbacks.sort();
    let imports = module
        .imports()
        .map(|i| format!("{}.{}", i.module(), i.name()))
        .collect();
    Ok(ModuleInfo {
        abi_version,
        callbacks,
        imports,
    })
}
