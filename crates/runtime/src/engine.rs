//! The process-wide runtime: one wasmtime `Engine`, the compile cache (in memory and on disk), and
//! the state every VM shares.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use wasmgate_abi::LogLevel;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, Module, PoolingAllocationConfig};

use crate::error::LoadError;
use crate::guard::LogLevels;
use crate::imports;
use crate::module::{self, CompiledModule};
use crate::shared::Shared;

/// Engine settings. Defaults suit a gateway with a few dozen plugins on a handful of workers.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where compiled modules are kept between runs. `None` compiles in memory only.
    pub cache_dir: Option<PathBuf>,
    /// How many VMs may be alive at once (slots of the pooling allocator).
    pub max_vms: u32,
    /// Largest linear memory a VM may grow to (`plugin_limits.max_memory_bytes`): growth past it
    /// fails, as `memory.grow` fails, and the breach is logged with the plugin and the limit.
    pub max_memory_bytes: usize,
    /// The guest stack a callback may use (`plugin_limits.max_stack_bytes`); deeper recursion
    /// traps. Worker threads must have this much stack to spare beyond their own needs.
    pub max_stack_bytes: usize,
    /// Outbound calls (`proxy_http_call`, `proxy_grpc_call`, gRPC streams) one VM may have in
    /// flight (`plugin_limits.max_http_calls`); one more answers INTERNAL_FAILURE.
    pub max_http_calls: usize,
    /// Messages one shared queue may hold (`plugin_limits.max_queue_length`); enqueueing onto a
    /// full queue answers INTERNAL_FAILURE.
    pub max_queue_length: usize,
    /// The level guests see from `proxy_get_log_level` and below which their lines are dropped.
    pub log_level: LogLevel,
    /// The longest one callback (or a VM's start-up code) may run before it is stopped and
    /// handled as a trap: a plugin stuck in a loop cannot hold a worker. Zero: no limit.
    pub callback_time_limit: std::time::Duration,
}

/// How often the engine's epoch advances: the granularity of `callback_time_limit`.
pub(crate) const EPOCH_TICK: std::time::Duration = std::time::Duration::from_millis(10);

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            max_vms: 256,
            max_memory_bytes: 256 << 20,
            max_stack_bytes: 512 << 10,
            max_http_calls: 1024,
            max_queue_length: crate::shared::DEFAULT_MAX_QUEUE_LENGTH,
            log_level: LogLevel::Info,
            callback_time_limit: std::time::Duration::from_secs(2),
        }
    }
}

pub struct Runtime {
    engine: Engine,
    config: RuntimeConfig,
    /// Identifies the engine build and settings, so a cached artefact is only reused by an engine
    /// that can run it.
    engine_key: String,
    pub(crate) shared: Arc<Shared>,
    pub(crate) log_levels: Arc<LogLevels>,
    modules: Mutex<HashMap<String, Arc<CompiledModule>>>,
    /// The epoch ticker thread runs while this lives.
    _ticker: Arc<()>,
}

impl Runtime {
    pub fn new(config: RuntimeConfig) -> Result<Arc<Self>, LoadError> {
        let engine = Self::build_engine(&config, true).or_else(|pooling_error| {
            // The pooling allocator reserves address space up front; some sandboxes refuse that.
            tracing::warn!(
                "pooling allocator unavailable ({pooling_error}); allocating VMs on demand"
            );
            Self::build_engine(&config, false)
        })?;
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine_key = format!("{:016x}", hasher.finish());
        if let Some(dir) = &config.cache_dir {
            std::fs::create_dir_all(dir).map_err(|e| {
                LoadError::Engine(format!(
                    "cannot create the compile cache folder {}: {e}",
                    dir.display()
                ))
            })?;
        }
        let ticker = Arc::new(());
        Self::start_epoch_ticker(&engine, &ticker)?;
        Ok(Arc::new(Self {
            _ticker: ticker,
            engine,
            log_levels: Arc::new(LogLevels::new(config.log_level)),
            shared: Arc::new(Shared::new(config.max_queue_length)),
            config,
            engine_key,
            modules: Mutex::new(HashMap::new()),
        }))
    }

    /// Advances the engine's epoch every [`EPOCH_TICK`] until the runtime is dropped; each VM
    /// traps when its callback's deadline (in ticks) passes.
    fn start_epoch_ticker(engine: &Engine, alive: &Arc<()>) -> Result<(), LoadError> {
        let engine = engine.clone();
        let alive = Arc::downgrade(alive);
        std::thread::Builder::new()
            .name("wasmgate-epoch".into())
            .spawn(move || {
                while alive.strong_count() > 0 {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .map(drop)
            .map_err(|e| LoadError::Engine(format!("cannot start the epoch ticker: {e}")))
    }

    /// The deadline, in epoch ticks, a callback gets (practically never without a limit; wasmtime
    /// adds it to the current epoch, so not `u64::MAX`).
    pub(crate) fn callback_deadline_ticks(&self) -> u64 {
        let limit = self.config.callback_time_limit;
        if limit.is_zero() {
            u64::MAX >> 1
        } else {
            // +1: the current tick may be about to end.
            (limit.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64 + 1
        }
    }

    pub fn callback_time_limit(&self) -> std::time::Duration {
        self.config.callback_time_limit
    }

    fn build_engine(config: &RuntimeConfig, pooling: bool) -> Result<Engine, LoadError> {
        let mut wasm = Config::new();
        // Loops and calls check the epoch, so a callback can be stopped at its deadline.
        wasm.epoch_interruption(true);
        wasm.wasm_backtrace_max_frames(std::num::NonZeroUsize::new(64));
        // File and line in trap backtraces where the module carries DWARF.
        wasm.wasm_backtrace_details(wasmtime::WasmBacktraceDetails::Enable);
        wasm.max_wasm_stack(config.max_stack_bytes);
        wasm.cranelift_opt_level(wasmtime::OptLevel::Speed);
        if pooling {
            let mut pool = PoolingAllocationConfig::default();
            pool.total_core_instances(config.max_vms)
                .total_memories(config.max_vms)
                .total_tables(config.max_vms)
                .max_memory_size(config.max_memory_bytes)
                // Guests differ in how many functions and globals they have; allow big SDK builds.
                .max_core_instance_size(4 << 20);
            wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        }
        // Copy-on-write images make each instantiation map the initial memory instead of copying it.
        wasm.memory_init_cow(true);
        Engine::new(&wasm).map_err(|e| LoadError::Engine(format!("{e:#}")))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The plugins' default log level.
    pub fn log_level(&self) -> LogLevel {
        self.log_levels.default_level()
    }

    /// Sets every plugin's level (Envoy's `wasm` logger); `trace` turns on the host/VM trace.
    pub fn set_log_level(&self, level: LogLevel) {
        self.log_levels.set_all(level);
    }

    /// Sets one plugin's level, so the trace can be turned on for one plugin only.
    pub fn set_plugin_log_level(&self, plugin: &str, level: LogLevel) {
        self.log_levels.set_plugin(plugin, level);
    }

    /// Plugins whose level differs from the default.
    pub fn plugin_log_levels(&self) -> Vec<(String, LogLevel)> {
        self.log_levels.overrides()
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// Compiles (or finds) a module: once per process by sha256, and from the disk cache when a
    /// previous run compiled it with the same engine.
    pub fn load(&self, bytes: &[u8]) -> Result<Arc<CompiledModule>, LoadError> {
        let sha256 = hex::encode(Sha256::digest(bytes));
        if let Some(module) = self.modules.lock().get(&sha256) {
            return Ok(module.clone());
        }
        if !bytes.starts_with(b"\0asm") {
            return Err(LoadError::Invalid(
                "it does not start with the \\0asm magic".into(),
            ));
        }
        // Validation first: a module the ABI refuses is not worth compiling or caching.
        wasmtime::Module::validate(&self.engine, bytes)
            .map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
        let (module, from_disk_cache) = self.compile(bytes, &sha256)?;
        // Imports first: a module importing its memory is better told so than that it exports none.
        let linker = imports::linker_for(&self.engine, &module)?;
        let info = module::inspect(&module)?;
        let pre = linker
            .instantiate_pre(&module)
            .map_err(|e| LoadError::Link(format!("{e:#}")))?;
        // Only modules the host accepts are worth keeping compiled.
        if let (false, Some(path)) = (from_disk_cache, self.cache_path(&sha256))
            && let Err(error) = write_atomically(&path, module.serialize())
        {
            tracing::warn!(path = %path.display(), "could not write the compile cache: {error}");
        }
        let compiled = Arc::new(CompiledModule {
            pre,
            info,
            sha256: sha256.clone(),
            size: bytes.len(),
            from_disk_cache,
        });
        Ok(self
            .modules
            .lock()
            .entry(sha256)
            .or_insert(compiled)
            .clone())
    }

    fn cache_path(&self, sha256: &str) -> Option<PathBuf> {
        let dir = self.config.cache_dir.as_ref()?;
        Some(dir.join(format!("{sha256}-{}.cwasm", self.engine_key)))
    }

    fn compile(&self, bytes: &[u8], sha256: &str) -> Result<(Module, bool), LoadError> {
        let cache_path = self.cache_path(sha256);
        if let Some(path) = &cache_path
            && let Some(module) = self.deserialize(path)
        {
            return Ok((module, true));
        }
        let module =
            Module::new(&self.engine, bytes).map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        Ok((module, false))
    }

    fn deserialize(&self, path: &Path) -> Option<Module> {
        if !path.exists() {
            return None;
        }
        // SAFETY: wasmtime requires that the file holds code produced by `Module::serialize` of a
        // compatible engine, since it maps it as executable. The cache folder is ours: files there
        // are written only by `compile` above (atomically, so never half-written), and their names
        // carry the engine's compatibility hash. wasmtime also checks its own version and settings
        // header before using the code, and any error falls back to compiling.
        #[allow(unsafe_code)]
        let result = unsafe { Module::deserialize_file(&self.engine, path) };
        match result {
            Ok(module) => Some(module),
            Err(error) => {
                tracing::warn!(path = %path.display(), "ignoring an unusable compile cache entry: {error:#}");
                let _ = std::fs::remove_file(path);
                None
            }
        }
    }
}

fn write_atomically(path: &Path, bytes: wasmtime::Result<Vec<u8>>) -> std::io::Result<()> {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let bytes = bytes.map_err(std::io::Error::other)?;
    // Unique per process and write, so runtimes sharing the folder never share a temporary file.
    let unique = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp.{}.{unique}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
