//! A VM: one instance of a module in its own `Store`, with its root contexts (plugins) and stream
//! contexts, driven through the callbacks in the order Envoy uses.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use wasmgate_abi::{AbiVersion, Action, HeaderMap, Host, LogLevel, MapType, PeerType, StreamInfo};
use wasmtime::{Func, Instance, Store, TypedFunc, Val, WasmBacktrace, WasmParams, WasmResults};

use crate::engine::Runtime;
use crate::error::VmError;
use crate::guard::{Capabilities, Joined, MemoryLimiter, TraceArgs, export_allowed};
use crate::imports::wasi::ProcExit;
use crate::module::{CALLBACKS, CallbackId, CompiledModule, callback};
use crate::shared::Inbox;
use crate::state::{
    Callout, CalloutKind, Context, FastMap, MapWindows, Phase, PluginConfig, StreamData, VmState,
};

/// What a VM is started with, shared by the plugins it runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmConfig {
    /// Scopes shared data and queues, as Envoy's `vm_id` does.
    pub vm_id: String,
    /// What `proxy_on_vm_start` reads (buffer VM_CONFIGURATION).
    pub configuration: Vec<u8>,
    /// The plugin's environment (WASI `environ_*`); the host's own is never exposed.
    pub environment: Vec<(String, String)>,
    /// Envoy's `capability_restriction_config`: the host functions and callbacks the plugin may
    /// use, by name. `None` allows all. A refused host function answers INTERNAL_FAILURE (WASI:
    /// NOTCAPABLE) and a refused callback is treated as not exported, as in Envoy.
    pub capabilities: Option<Capabilities>,
}

/// The answer to an outbound HTTP call, handed back with [`Vm::on_http_call_response`].
#[derive(Debug, Clone)]
pub enum CallOutcome {
    Response {
        headers: HeaderMap,
        body: Vec<u8>,
        trailers: HeaderMap,
    },
    /// The call failed before a response (reset, timeout, refused). The guest sees zero headers
    /// and `proxy_get_status` answers BROKEN_CONNECTION with this message, as in Envoy.
    Failure { message: String },
}

/// An exported callback, and its typed handle once it has been called (a `TypedFunc<P, R>`).
struct Callback {
    func: Func,
    typed: Option<Box<dyn Any + Send + Sync>>,
}

pub struct Vm {
    store: Store<VmState>,
    instance: Instance,
    module: Arc<CompiledModule>,
    /// Indexed by [`CallbackId`]; `None` where the module does not export it (or may not).
    callbacks: Vec<Option<Callback>>,
    main: Option<Func>,
    roots: HashMap<String, u32>,
    failed: Option<String>,
    /// Each call into the guest may run this many epoch ticks (see `RuntimeConfig::callback_time_limit`).
    deadline_ticks: u64,
    time_limit: std::time::Duration,
    stack_limit: usize,
}

impl Vm {
    /// Instantiates `module` and runs its start-up code (`_initialize` then `main`, or `_start`).
    pub fn new(
        runtime: &Runtime,
        module: &Arc<CompiledModule>,
        config: VmConfig,
        host: Box<dyn Host>,
    ) -> Result<Self, VmError> {
        let state = VmState {
            vm_id: config.vm_id.clone(),
            vm_configuration: config.configuration,
            environment: config
                .environment
                .iter()
                .map(|(k, v)| format!("{k}={v}").into_bytes())
                .collect(),
            host,
            shared: runtime.shared.clone(),
            log_level: runtime.log_levels.cell(&config.vm_id),
            log_levels: runtime.log_levels.clone(),
            allowed: config.capabilities.clone().map(Arc::new),
            refused: Vec::new(),
            limiter: MemoryLimiter {
                max_bytes: runtime.config().max_memory_bytes,
                plugin: config.vm_id.clone(),
                breached: None,
            },
            max_http_calls: runtime.config().max_http_calls,
            callouts_full: false,
            inbox: Arc::new(Inbox::default()),
            memory: None,
            allocator: None,
            contexts: FastMap::default(),
            next_context_id: 0,
            current: 0,
            effective: 0,
            phase: Phase::Idle,
            next_token: 0,
            callouts: FastMap::default(),
            callout: Callout::default(),
            grpc_message: None,
            call_status: (0, Vec::new()),
            foreign_arguments: None,
            tick_periods: FastMap::default(),
            done: Vec::new(),
            exit_code: None,
        };
        let mut store = Store::new(runtime.engine(), state);
        store.limiter(|state| &mut state.limiter);
        let deadline_ticks = runtime.callback_deadline_ticks();
        // Instantiation runs the module's start function: it gets the limit too.
        store.set_epoch_deadline(deadline_ticks);
        let instance = module
            .pre
            .instantiate(&mut store)
            .map_err(|e| VmError::Instantiate {
                plugin: config.vm_id.clone(),
                message: format!("{:#}", e.root_cause()),
            })?;
        let memory = instance.get_memory(&mut store, "memory");
        let allocator = instance
            .get_typed_func::<u32, u32>(&mut store, "proxy_on_memory_allocate")
            .or_else(|_| instance.get_typed_func::<u32, u32>(&mut store, "malloc"))
            .ok();
        let callbacks = CALLBACKS
            .iter()
            .map(|(name, ..)| {
                let exported = module.info.callbacks.iter().any(|c| c == name)
                    && export_allowed(config.capabilities.as_ref(), name);
                let func = exported.then(|| instance.get_func(&mut store, name))??;
                Some(Callback { func, typed: None })
            })
            .collect();
        let main = instance
            .get_typed_func::<(u32, u32), u32>(&mut store, "main")
            .ok()
            .map(|f| *f.func());
        let state = store.data_mut();
        state.memory = memory;
        state.allocator = allocator;
        let mut vm = Self {
            store,
            instance,
            module: module.clone(),
            callbacks,
            main,
            roots: HashMap::new(),
            failed: None,
            deadline_ticks,
            time_limit: runtime.callback_time_limit(),
            stack_limit: runtime.config().max_stack_bytes,
        };
        vm.run_start_functions()?;
        Ok(vm)
    }

    fn run_start_functions(&mut self) -> Result<(), VmError> {
        if self.exports(callback!("_initialize")) {
            self.invoke::<(), ()>(callback!("_initialize"), 0, Phase::Start, ())?;
            if let Some(main) = self.main {
                let main = main
                    .typed::<(u32, u32), u32>(&self.store)
                    .expect("checked at instantiation");
                self.store.set_epoch_deadline(self.deadline_ticks);
                main.call(&mut self.store, (0, 0))
                    .map_err(|e| self.trap("main", 0, e))?;
            }
        } else if self.exports(callback!("_start")) {
            match self.invoke::<(), ()>(callback!("_start"), 0, Phase::Start, ()) {
                // A command module's `_start` may end with proc_exit(0): that is a clean start.
                Err(VmError::Trap { .. }) if self.store.data().exit_code == Some(0) => {
                    self.failed = None;
                    self.store.data_mut().exit_code = None;
                }
                other => other.map(drop)?,
            }
        }
        Ok(())
    }

    pub fn module(&self) -> &Arc<CompiledModule> {
        &self.module
    }

    pub fn vm_id(&self) -> &str {
        &self.store.data().vm_id
    }

    /// Why the VM stopped serving, if a trap ended it.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    // === plugins (root contexts) ===

    /// Starts a plugin in this VM: a root context, then `proxy_on_vm_start` and `proxy_on_configure`.
    /// A false answer from either rejects the plugin, and its root context is removed.
    pub fn start_plugin(&mut self, plugin: PluginConfig) -> Result<u32, VmError> {
        if self.roots.contains_key(&plugin.root_id) {
            return Err(VmError::DuplicateRootId {
                plugin: plugin.name,
                root_id: plugin.root_id,
            });
        }
        if self.roots.is_empty() {
            // The VM's first plugin names its log level and its limit breaches.
            let state = self.store.data_mut();
            state.log_level = state.log_levels.cell(&plugin.name);
            state.limiter.plugin = plugin.name.clone();
        }
        let root_id = plugin.root_id.clone();
        let id = self.new_context_id();
        self.store.data_mut().contexts.insert(
            id,
            Box::new(Context {
                root: id,
                plugin: Arc::new(plugin),
                stream: StreamData::default(),
                windows: MapWindows::default(),
                filter_state: HashMap::new(),
                awaiting_done: false,
            }),
        );
        let result = self.configure_new_root(id);
        match result {
            Ok(()) => {
                self.roots.insert(root_id, id);
                Ok(id)
            }
            Err(error) => {
                self.store.data_mut().contexts.remove(&id);
                self.store.data_mut().tick_periods.remove(&id);
                Err(error)
            }
        }
    }

    fn configure_new_root(&mut self, id: u32) -> Result<(), VmError> {
        self.invoke::<(u32, u32), ()>(
            callback!("proxy_on_context_create"),
            id,
            Phase::Other,
            (id, 0),
        )?;
        let vm_config_len = self.store.data().vm_configuration.len() as u32;
        if self.invoke::<(u32, u32), u32>(
            callback!("proxy_on_vm_start"),
            id,
            Phase::VmStart,
            (id, vm_config_len),
        )? == Some(0)
        {
            return Err(self.rejected(id, "proxy_on_vm_start", "VM configuration"));
        }
        self.configure(id)
    }

    fn configure(&mut self, id: u32) -> Result<(), VmError> {
        let config_len = self.context(id)?.plugin.configuration.len() as u32;
        if self.invoke::<(u32, u32), u32>(
            callback!("proxy_on_configure"),
            id,
            Phase::Configure,
            (id, config_len),
        )? == Some(0)
        {
            return Err(self.rejected(id, "proxy_on_configure", "configuration"));
        }
        Ok(())
    }

    fn rejected(&self, id: u32, callback: &'static str, what: &'static str) -> VmError {
        VmError::Rejected {
            plugin: self.plugin_name(id),
            callback,
            what,
        }
    }

    /// Hands a running plugin a new configuration through `proxy_on_configure`. On a false answer the
    /// old configuration stays recorded and the error says so.
    pub fn reconfigure(&mut self, root: u32, configuration: Vec<u8>) -> Result<(), VmError> {
        let context = self.context_mut(root)?;
        let old = context.plugin.clone();
        context.plugin = Arc::new(PluginConfig {
            configuration,
            ..(*old).clone()
        });
        let result = self.configure(root);
        if result.is_err()
            && let Ok(context) = self.context_mut(root)
        {
            context.plugin = old;
        }
        result
    }

    /// The root context of the plugin with `root_id`.
    pub fn root_context(&self, root_id: &str) -> Option<u32> {
        self.roots.get(root_id).copied()
    }

    /// Stops a plugin: `proxy_on_done`, then `proxy_on_delete` at once, or after the plugin calls
    /// `proxy_done` if `proxy_on_done` answered false. Returns whether the context is gone.
    pub fn stop_plugin(&mut self, root: u32) -> Result<bool, VmError> {
        self.context(root)?;
        let done = self
            .invoke::<u32, u32>(callback!("proxy_on_done"), root, Phase::Other, root)?
            .unwrap_or(1);
        if done == 0 {
            self.context_mut(root)?.awaiting_done = true;
            return Ok(false);
        }
        self.delete_context(root)?;
        Ok(true)
    }

    fn delete_context(&mut self, id: u32) -> Result<(), VmError> {
        let result = self.invoke::<u32, ()>(callback!("proxy_on_delete"), id, Phase::Other, id);
        let state = self.store.data_mut();
        if let Some(context) = state.contexts.remove(&id)
            && context.is_root(id)
        {
            state.tick_periods.remove(&id);
            self.roots.retain(|_, root| *root != id);
        }
        result.map(drop)
    }

    // === stream contexts ===

    /// Creates a stream (HTTP or TCP) context under a plugin.
    pub fn create_stream(&mut self, root: u32) -> Result<u32, VmError> {
        self.create_stream_with(root, StreamInfo::default())
    }

    /// Creates a stream context that knows its connection and route from the start, so that
    /// `proxy_on_context_create` can read them as in Envoy.
    pub fn create_stream_with(&mut self, root: u32, info: StreamInfo) -> Result<u32, VmError> {
        let plugin = self.context(root)?.plugin.clone();
        let id = self.new_context_id();
        self.store.data_mut().contexts.insert(
            id,
            Box::new(Context {
                root,
                plugin,
                stream: StreamData {
                    info,
                    ..StreamData::default()
                },
                windows: MapWindows::default(),
                filter_state: HashMap::new(),
                awaiting_done: false,
            }),
        );
        if let Err(error) = self.invoke::<(u32, u32), ()>(
            callback!("proxy_on_context_create"),
            id,
            Phase::Other,
            (id, root),
        ) {
            self.store.data_mut().contexts.remove(&id);
            return Err(error);
        }
        Ok(id)
    }

    /// The stream's maps, buffers and facts, which the embedder fills before a callback and reads after.
    pub fn stream(&self, context: u32) -> Option<&StreamData> {
        self.store.data().context(context).map(|c| &c.stream)
    }

    pub fn stream_mut(&mut self, context: u32) -> Option<&mut StreamData> {
        self.store
            .data_mut()
            .contexts
            .get_mut(&context)
            .map(|c| &mut c.stream)
    }

    pub fn on_request_headers(
        &mut self,
        context: u32,
        end_of_stream: bool,
    ) -> Result<Action, VmError> {
        let count = self.open_map(context, MapType::HttpRequestHeaders)?;
        self.headers_callback(
            callback!("proxy_on_request_headers"),
            context,
            MapType::HttpRequestHeaders,
            count,
            end_of_stream,
        )
    }

    pub fn on_request_body(
        &mut self,
        context: u32,
        end_of_stream: bool,
    ) -> Result<Action, VmError> {
        let size = self
            .stream_or_err(context)?
            .request_body
            .as_ref()
            .map_or(0, Vec::len) as u32;
        self.action(
            callback!("proxy_on_request_body"),
            context,
            (context, size, end_of_stream as u32),
        )
    }

    pub fn on_request_trailers(&mut self, context: u32) -> Result<Action, VmError> {
        let count = self.open_map(context, MapType::HttpRequestTrailers)?;
        self.map_callback(
            callback!("proxy_on_request_trailers"),
            context,
            MapType::HttpRequestTrailers,
            (context, count),
        )
    }

    pub fn on_response_headers(
        &mut self,
        context: u32,
        end_of_stream: bool,
    ) -> Result<Action, VmError> {
        let count = self.open_map(context, MapType::HttpResponseHeaders)?;
        self.headers_callback(
            callback!("proxy_on_response_headers"),
            context,
            MapType::HttpResponseHeaders,
            count,
            end_of_stream,
        )
    }

    pub fn on_response_body(
        &mut self,
        context: u32,
        end_of_stream: bool,
    ) -> Result<Action, VmError> {
        let size = self
            .stream_or_err(context)?
            .response_body
            .as_ref()
            .map_or(0, Vec::len) as u32;
        self.action(
            callback!("proxy_on_response_body"),
            context,
            (context, size, end_of_stream as u32),
        )
    }

    pub fn on_response_trailers(&mut self, context: u32) -> Result<Action, VmError> {
        let count = self.open_map(context, MapType::HttpResponseTrailers)?;
        self.map_callback(
            callback!("proxy_on_response_trailers"),
            context,
            MapType::HttpResponseTrailers,
            (context, count),
        )
    }

    pub fn on_new_connection(&mut self, context: u32) -> Result<Action, VmError> {
        self.stream_or_err(context)?;
        self.action(callback!("proxy_on_new_connection"), context, context)
    }

    pub fn on_downstream_data(
        &mut self,
        context: u32,
        end_of_stream: bool,
    ) -> Result<Action, VmError> {
        let size = self
            .stream_or_err(context)?
            .downstream_data
            .as_ref()
            .map_or(0, Vec::len) as u32;
        self.action(
            callback!("proxy_on_downstream_data"),
            context,
            (context, size, end_of_stream as u32),
        )
    }

    pub fn on_upstream_data(
        &mut self,
        context: u32,
        end_of_stream: bool,
    ) -> Result<Action, VmError> {
        let size = self
            .stream_or_err(context)?
            .upstream_data
            .as_ref()
            .map_or(0, Vec::len) as u32;
        self.action(
            callback!("proxy_on_upstream_data"),
            context,
            (context, size, end_of_stream as u32),
        )
    }

    pub fn on_downstream_connection_close(
        &mut self,
        context: u32,
        peer: PeerType,
    ) -> Result<(), VmError> {
        self.stream_or_err(context)?;
        let params = (context, peer as u32);
        self.invoke::<(u32, u32), ()>(
            callback!("proxy_on_downstream_connection_close"),
            context,
            Phase::Stream,
            params,
        )
        .map(drop)
    }

    pub fn on_upstream_connection_close(
        &mut self,
        context: u32,
        peer: PeerType,
    ) -> Result<(), VmError> {
        self.stream_or_err(context)?;
        let params = (context, peer as u32);
        self.invoke::<(u32, u32), ()>(
            callback!("proxy_on_upstream_connection_close"),
            context,
            Phase::Stream,
            params,
        )
        .map(drop)
    }

    /// Ends an HTTP stream in Envoy's order: `proxy_on_log`, `proxy_on_done`, `proxy_on_delete`.
    /// The context is gone afterwards even if a callback trapped.
    pub fn finish_http_stream(&mut self, context: u32) -> Result<(), VmError> {
        self.finish_stream(
            context,
            [callback!("proxy_on_log"), callback!("proxy_on_done")],
        )
    }

    /// Ends a TCP stream in Envoy's order: `proxy_on_done`, `proxy_on_log`, `proxy_on_delete`.
    pub fn finish_tcp_stream(&mut self, context: u32) -> Result<(), VmError> {
        self.finish_stream(
            context,
            [callback!("proxy_on_done"), callback!("proxy_on_log")],
        )
    }

    fn finish_stream(&mut self, context: u32, order: [CallbackId; 2]) -> Result<(), VmError> {
        if self.context(context)?.is_root(context) {
            return Err(VmError::UnknownContext(context));
        }
        let mut result = Ok(());
        for callback in order {
            let outcome = if callback == callback!("proxy_on_done") {
                self.invoke::<u32, u32>(callback, context, Phase::Other, context)
                    .map(drop)
            } else {
                // `on_log` reads the maps as the stream ended (see `MapWindows`).
                let phase = if callback == callback!("proxy_on_log") {
                    Phase::Log
                } else {
                    Phase::Other
                };
                self.invoke::<u32, ()>(callback, context, phase, context)
                    .map(drop)
            };
            if let Err(error) = outcome {
                result = Err(error);
                break;
            }
        }
        if result.is_ok() {
            // Removes the context whatever `proxy_on_delete` does.
            return self.delete_context(context);
        }
        self.store.data_mut().contexts.remove(&context);
        result
    }

    // === timers, queues, callouts ===

    pub fn tick_period(&self, root: u32) -> Option<Duration> {
        self.store.data().tick_periods.get(&root).copied()
    }

    /// Every root context with a tick period, for the embedder's timers.
    pub fn tick_periods(&self) -> Vec<(u32, Duration)> {
        let mut periods: Vec<_> = self
            .store
            .data()
            .tick_periods
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        periods.sort();
        periods
    }

    pub fn on_tick(&mut self, root: u32) -> Result<(), VmError> {
        self.context(root)?;
        self.invoke::<u32, ()>(callback!("proxy_on_tick"), root, Phase::Other, root)
            .map(drop)
    }

    /// Whether a queue this VM registered has messages waiting for `proxy_on_queue_ready`.
    pub fn has_queue_events(&self) -> bool {
        self.store.data().inbox.has_pending()
    }

    /// Called (from any thread) when a queue this VM owns gets a message, so the embedder can wake
    /// the VM's worker and call [`Vm::deliver_queue_ready`].
    pub fn set_queue_waker(&self, waker: Arc<dyn Fn() + Send + Sync>) {
        self.store.data().inbox.set_waker(waker);
    }

    /// Delivers `proxy_on_queue_ready` for every queue with new messages. Returns how many.
    pub fn deliver_queue_ready(&mut self) -> Result<usize, VmError> {
        let ready = self.store.data().inbox.take();
        let mut delivered = 0;
        for (root, queue) in ready {
            if self.context(root).is_err() {
                continue;
            }
            self.invoke::<(u32, u32), ()>(
                callback!("proxy_on_queue_ready"),
                root,
                Phase::Other,
                (root, queue),
            )?;
            delivered += 1;
        }
        Ok(delivered)
    }

    /// Delivers the answer to `proxy_http_call` `token` to the plugin that made it.
    pub fn on_http_call_response(
        &mut self,
        token: u32,
        outcome: CallOutcome,
    ) -> Result<(), VmError> {
        let root = match self.store.data_mut().callouts.remove(&token) {
            Some((CalloutKind::Http, root)) => root,
            Some(other) => {
                self.store.data_mut().callouts.insert(token, other);
                return Err(VmError::UnknownToken(token));
            }
            None => return Err(VmError::UnknownToken(token)),
        };
        let (callout, status, counts) = match outcome {
            CallOutcome::Response {
                headers,
                body,
                trailers,
            } => {
                let counts = (
                    headers.len() as u32,
                    body.len() as u32,
                    trailers.len() as u32,
                );
                (
                    Callout {
                        headers: Some(headers),
                        body: Some(body),
                        trailers: Some(trailers),
                    },
                    (0, Vec::new()),
                    counts,
                )
            }
            CallOutcome::Failure { message } => (
                Callout::default(),
                (
                    wasmgate_abi::Status::BrokenConnection as u32,
                    message.into_bytes(),
                ),
                (0, 0, 0),
            ),
        };
        let state = self.store.data_mut();
        state.callout = callout;
        state.call_status = status;
        let params = (root, token, counts.0, counts.1, counts.2);
        let result = self.invoke::<(u32, u32, u32, u32, u32), ()>(
            callback!("proxy_on_http_call_response"),
            root,
            Phase::HttpCallResponse,
            params,
        );
        self.store.data_mut().callout = Callout::default();
        result.map(drop)
    }

    fn grpc_root(&self, token: u32) -> Result<u32, VmError> {
        match self.store.data().callouts.get(&token) {
            Some((CalloutKind::Grpc, root)) => Ok(*root),
            _ => Err(VmError::UnknownToken(token)),
        }
    }

    pub fn on_grpc_receive_initial_metadata(
        &mut self,
        token: u32,
        metadata: HeaderMap,
    ) -> Result<(), VmError> {
        let root = self.grpc_root(token)?;
        let count = metadata.len() as u32;
        self.store.data_mut().callout = Callout {
            headers: Some(metadata),
            ..Default::default()
        };
        let result = self.invoke::<(u32, u32, u32), ()>(
            callback!("proxy_on_grpc_receive_initial_metadata"),
            root,
            Phase::GrpcInitialMetadata,
            (root, token, count),
        );
        self.store.data_mut().callout = Callout::default();
        result.map(drop)
    }

    pub fn on_grpc_receive(&mut self, token: u32, message: Vec<u8>) -> Result<(), VmError> {
        let root = self.grpc_root(token)?;
        let size = message.len() as u32;
        self.store.data_mut().grpc_message = Some(message);
        let result = self.invoke::<(u32, u32, u32), ()>(
            callback!("proxy_on_grpc_receive"),
            root,
            Phase::GrpcMessage,
            (root, token, size),
        );
        self.store.data_mut().grpc_message = None;
        result.map(drop)
    }

    pub fn on_grpc_receive_trailing_metadata(
        &mut self,
        token: u32,
        metadata: HeaderMap,
    ) -> Result<(), VmError> {
        let root = self.grpc_root(token)?;
        let count = metadata.len() as u32;
        self.store.data_mut().callout = Callout {
            trailers: Some(metadata),
            ..Default::default()
        };
        let result = self.invoke::<(u32, u32, u32), ()>(
            callback!("proxy_on_grpc_receive_trailing_metadata"),
            root,
            Phase::GrpcTrailingMetadata,
            (root, token, count),
        );
        self.store.data_mut().callout = Callout::default();
        result.map(drop)
    }

    /// Forgets a unary gRPC call whose answer was delivered with [`Vm::on_grpc_receive`]: as in
    /// Envoy, a successful unary call gets no `proxy_on_grpc_close`.
    pub fn end_grpc_call(&mut self, token: u32) {
        if let Some((CalloutKind::Grpc, _)) = self.store.data().callouts.get(&token) {
            self.store.data_mut().callouts.remove(&token);
        }
    }

    /// Ends gRPC call `token` with a gRPC status; `proxy_get_status` answers it during the callback.
    pub fn on_grpc_close(
        &mut self,
        token: u32,
        grpc_status: u32,
        message: &str,
    ) -> Result<(), VmError> {
        let root = self.grpc_root(token)?;
        let state = self.store.data_mut();
        state.callouts.remove(&token);
        state.call_status = (grpc_status, message.as_bytes().to_vec());
        self.invoke::<(u32, u32, u32), ()>(
            callback!("proxy_on_grpc_close"),
            root,
            Phase::GrpcClose,
            (root, token, grpc_status),
        )
        .map(drop)
    }

    /// `proxy_on_foreign_function`, with the arguments readable as buffer CALL_DATA.
    pub fn on_foreign_function(
        &mut self,
        root: u32,
        function_id: u32,
        arguments: Vec<u8>,
    ) -> Result<(), VmError> {
        self.context(root)?;
        let size = arguments.len() as u32;
        self.store.data_mut().foreign_arguments = Some(arguments);
        let result = self.invoke::<(u32, u32, u32), ()>(
            callback!("proxy_on_foreign_function"),
            root,
            Phase::ForeignFunction,
            (root, function_id, size),
        );
        self.store.data_mut().foreign_arguments = None;
        result.map(drop)
    }

    /// Ids of the live contexts, roots included, in creation order.
    pub fn context_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.store.data().contexts.keys().copied().collect();
        ids.sort();
        ids
    }

    /// Calls any export taking and returning i32s, with `context` as the current context. This
    /// reaches the host functions through a real instance for tests and fuzzing (hand-written
    /// modules export trampolines); the data path uses the typed callbacks above.
    #[doc(hidden)]
    pub fn call_export(
        &mut self,
        context: u32,
        name: &str,
        args: &[i32],
    ) -> Result<Vec<i32>, VmError> {
        let func = self
            .instance
            .get_func(&mut self.store, name)
            .ok_or_else(|| VmError::MissingExport(name.to_owned()))?;
        let params: Vec<Val> = args.iter().map(|a| Val::I32(*a)).collect();
        let mut results = vec![Val::I32(0); func.ty(&self.store).results().len()];
        let mut windows = MapWindows::ALL;
        self.windows(context, |w| std::mem::swap(w, &mut windows));
        let state = self.store.data_mut();
        state.current = context;
        state.effective = context;
        state.phase = Phase::Stream;
        self.store.set_epoch_deadline(self.deadline_ticks);
        let result = func.call(&mut self.store, &params, &mut results);
        self.store.data_mut().phase = Phase::Idle;
        self.windows(context, |w| *w = windows);
        result.map_err(|e| self.trap("an exported function", context, e))?;
        self.complete_done()?;
        Ok(results
            .iter()
            .map(|v| v.i32().unwrap_or_default())
            .collect())
    }

    // === internals ===

    /// The last context id this VM handed out.
    pub fn last_context_id(&self) -> u32 {
        self.store.data().next_context_id
    }

    /// Makes this VM's context ids start after `last`. A VM that replaces a failed one
    /// (FAIL_RELOAD) must not hand out ids that streams of the old VM still hold: their calls
    /// would land on a stranger's context.
    pub fn continue_context_ids_after(&mut self, last: u32) {
        let state = self.store.data_mut();
        state.next_context_id = state.next_context_id.max(last);
    }

    fn new_context_id(&mut self) -> u32 {
        let state = self.store.data_mut();
        state.next_context_id += 1;
        state.next_context_id
    }

    fn context(&self, id: u32) -> Result<&Context, VmError> {
        self.store
            .data()
            .context(id)
            .ok_or(VmError::UnknownContext(id))
    }

    fn context_mut(&mut self, id: u32) -> Result<&mut Context, VmError> {
        self.store
            .data_mut()
            .contexts
            .get_mut(&id)
            .map(|c| &mut **c)
            .ok_or(VmError::UnknownContext(id))
    }

    fn stream_or_err(&self, id: u32) -> Result<&StreamData, VmError> {
        let context = self.context(id)?;
        if context.is_root(id) {
            return Err(VmError::UnknownContext(id));
        }
        Ok(&context.stream)
    }

    fn plugin_name(&self, context: u32) -> String {
        let state = self.store.data();
        match state.context(context) {
            Some(context) => context.plugin.name.clone(),
            None => state.vm_id.clone(),
        }
    }

    fn headers_callback(
        &mut self,
        callback: CallbackId,
        context: u32,
        map: MapType,
        count: u32,
        eos: bool,
    ) -> Result<Action, VmError> {
        if self.module.abi_version() == AbiVersion::V0_1_0 {
            self.map_callback(callback, context, map, (context, count))
        } else {
            self.map_callback(callback, context, map, (context, count, eos as u32))
        }
    }

    /// A callback on `map` (opened by [`Self::open_map`]); a plugin that pauses keeps it open
    /// until the stream continues (see [`MapWindows`]).
    fn map_callback<P: WasmParams + TraceArgs + 'static>(
        &mut self,
        callback: CallbackId,
        context: u32,
        map: MapType,
        params: P,
    ) -> Result<Action, VmError> {
        let action = self.action(callback, context, params)?;
        if action.is_continue() {
            self.windows(context, |windows| windows.close(map));
        }
        Ok(action)
    }

    /// Opens `map` to the plugin for the callback about to run on it; returns its field count.
    fn open_map(&mut self, context: u32, map: MapType) -> Result<u32, VmError> {
        let stream = match self.store.data_mut().contexts.get_mut(&context) {
            Some(found) if !found.is_root(context) => {
                found.windows.open(map);
                &found.stream
            }
            _ => return Err(VmError::UnknownContext(context)),
        };
        let slot = match map {
            MapType::HttpRequestHeaders => &stream.request_headers,
            MapType::HttpRequestTrailers => &stream.request_trailers,
            MapType::HttpResponseHeaders => &stream.response_headers,
            _ => &stream.response_trailers,
        };
        Ok(slot.as_ref().map_or(0, |map| map.lock().len()) as u32)
    }

    fn windows(&mut self, context: u32, change: impl FnOnce(&mut MapWindows)) {
        if let Some(context) = self.store.data_mut().contexts.get_mut(&context) {
            change(&mut context.windows);
        }
    }

    fn action<P: WasmParams + TraceArgs + 'static>(
        &mut self,
        callback: CallbackId,
        context: u32,
        params: P,
    ) -> Result<Action, VmError> {
        let raw = self.invoke::<P, u32>(callback, context, Phase::Stream, params)?;
        Ok(raw.map_or(Action::Continue, Action::from_raw))
    }

    fn exports(&self, callback: CallbackId) -> bool {
        self.callbacks[callback.index()].is_some()
    }

    /// Calls an exported callback with `context` current. `Ok(None)` when the module does not export it.
    fn invoke<P: WasmParams + TraceArgs + 'static, R: WasmResults + std::fmt::Debug + 'static>(
        &mut self,
        callback: CallbackId,
        context: u32,
        phase: Phase,
        params: P,
    ) -> Result<Option<R>, VmError> {
        if let Some(reason) = &self.failed {
            return Err(VmError::Failed {
                plugin: self.plugin_name(context),
                reason: reason.clone(),
            });
        }
        let name = callback.name();
        let Some(exported) = &mut self.callbacks[callback.index()] else {
            return Ok(None);
        };
        // The signature check runs once per callback and VM; later calls borrow the typed handle
        // (a clone would clone its registered type too, on every call).
        if !exported
            .typed
            .as_ref()
            .is_some_and(|typed| typed.is::<TypedFunc<P, R>>())
        {
            match exported.func.typed::<P, R>(&self.store) {
                Ok(typed) => exported.typed = Some(Box::new(typed)),
                Err(error) => return Err(self.trap(name, context, error)),
            }
        }
        let Some(typed) = self.callbacks[callback.index()]
            .as_ref()
            .and_then(|exported| exported.typed.as_ref())
            .and_then(|typed| typed.downcast_ref::<TypedFunc<P, R>>())
        else {
            unreachable!("the typed handle was stored above")
        };
        let _span = self.callback_span(name, context).entered();
        let traced = self.store.data().log_level.get() == LogLevel::Trace;
        if traced {
            let plugin = self.plugin_name(context);
            tracing::trace!(target: crate::LOG_TARGET, plugin, context_id = context,
                "[host->vm] {name}({})", Joined(&params.trace_args()));
        }
        let state = self.store.data_mut();
        state.current = context;
        state.effective = context;
        state.phase = phase;
        state.limiter.breached = None;
        self.store.set_epoch_deadline(self.deadline_ticks);
        let result = typed.call(&mut self.store, params);
        self.store.data_mut().phase = Phase::Idle;
        if traced && let Ok(value) = &result {
            let plugin = self.plugin_name(context);
            tracing::trace!(target: crate::LOG_TARGET, plugin, context_id = context,
                "[host<-vm] {name} return: {value:?}");
        }
        match result {
            Ok(value) => {
                self.complete_done()?;
                Ok(Some(value))
            }
            Err(error) => Err(self.trap(name, context, error)),
        }
    }

    /// The span a callback runs in: a trace-level item of the `wasm` logger, so it exists when the
    /// plugins' level (`/logging?wasm=trace`) is trace and `tracing` lets it through. Otherwise it is
    /// `Span::none()`, and nothing is formatted or allocated: with a fmt subscriber an enabled span
    /// costs several thousand instructions, paid on each of the half-dozen callbacks of a request.
    fn callback_span(&self, callback: &'static str, context: u32) -> tracing::Span {
        let state = self.store.data();
        if state.log_level.get() != LogLevel::Trace {
            return tracing::Span::none();
        }
        let plugin = state
            .context(context)
            .map_or(state.vm_id.as_str(), |c| c.plugin.name.as_str());
        tracing::trace_span!(
            target: crate::LOG_TARGET,
            "callback",
            plugin = %plugin,
            context_id = context,
            callback
        )
    }

    /// Finishes root contexts whose `proxy_done` arrived during the last callback.
    fn complete_done(&mut self) -> Result<(), VmError> {
        if self.store.data().done.is_empty() {
            return Ok(());
        }
        let done = std::mem::take(&mut self.store.data_mut().done);
        for id in done {
            self.delete_context(id)?;
        }
        Ok(())
    }

    /// Records a trap: the VM serves no more callbacks, as in Envoy.
    fn trap(&mut self, callback: &'static str, context: u32, error: wasmtime::Error) -> VmError {
        let plugin = self.plugin_name(context);
        let backtrace = error
            .downcast_ref::<WasmBacktrace>()
            .map(|bt| bt.to_string())
            .filter(|bt| !bt.is_empty());
        let message = match error.downcast_ref::<ProcExit>() {
            Some(exit) => exit.to_string(),
            None if error.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::Interrupt) => {
                format!(
                    "stopped after running longer than the {:?} callback time limit \
                     (plugin_limits.callback_time_limit)",
                    self.time_limit
                )
            }
            None if error.downcast_ref::<wasmtime::Trap>()
                == Some(&wasmtime::Trap::StackOverflow) =>
            {
                format!(
                    "call stack exhausted: the plugin used more than its {} bytes of stack \
                     (plugin_limits.max_stack_bytes)",
                    self.stack_limit
                )
            }
            None => match self.store.data_mut().limiter.breached.take() {
                // The allocator found no memory and aborted: say why, not just "unreachable".
                Some(wanted) => format!(
                    "{}, after its memory reached the limit of {} bytes \
                     (plugin_limits.max_memory_bytes; it asked for {wanted})",
                    error.root_cause(),
                    self.store.data().limiter.max_bytes
                ),
                None => error.root_cause().to_string(),
            },
        };
        tracing::error!(
            target: crate::LOG_TARGET,
            plugin,
            context_id = context,
            callback,
            "plugin trapped: {message}{}",
            backtrace.as_deref().map(|bt| format!("\nProxy-Wasm plugin in-VM backtrace:\n{bt}")).unwrap_or_default()
        );
        self.failed = Some(format!("trap in {callback}: {message}"));
        VmError::Trap {
            plugin,
            callback,
            message,
            backtrace,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn vms_can_move_between_threads() {
        fn assert_send<T: Send>() {}
        assert_send::<super::Vm>();
    }
}
