//! The Proxy-Wasm host on wasmtime.
//!
//! A [`Runtime`] owns the engine, the compile cache and the process-wide shared state. It turns
//! module bytes into a [`CompiledModule`] (checked against the ABI, linked once), from which each
//! worker instantiates a [`Vm`]. A VM runs one or more plugins (root contexts) and their stream
//! contexts; host calls that need a proxy go to the embedder's [`Host`](wasmgate_abi::Host).
//!
//! `unsafe` is allowed in this crate only where wasmtime requires it, each use with its reason.

/// The `tracing` target of plugin logs and of the host/VM trace. Not a prefix of any crate's name:
/// `tracing` filters match targets by prefix, so a filter that lets every plugin line through
/// (`wasm::plugin=trace`) must not also turn on the gateway's own debug and trace events.
pub const LOG_TARGET: &str = "wasm::plugin";

mod engine;
mod error;
mod guard;
mod imports;
mod memory;
mod module;
mod properties;
pub mod shared;
mod state;
mod vm;

pub use engine::{Runtime, RuntimeConfig};
pub use error::{LoadError, VmError};
pub use guard::Capabilities;
pub use imports::wasi::ProcExit;
pub use imports::{host_functions, is_wasi_stub};
pub use module::{CALLBACKS, CompiledModule, ModuleInfo};
pub use state::{PluginConfig, SharedHeaders, StreamData};
pub use vm::{CallOutcome, Vm, VmConfig};
pub use wasmgate_abi as abi;
