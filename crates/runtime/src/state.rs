//! What a VM's `Store` holds: contexts, the stream data the embedder hands in, callout state, and
//! the handles host functions need (memory, allocator, the embedder's [`Host`]).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};

use wasmgate_abi::{HeaderMap, Host, LogLevel, MapType, StreamInfo};
use wasmtime::{Memory, TypedFunc};

use crate::guard::{Capabilities, LogLevels, MemoryLimiter};
use crate::shared::{Inbox, Shared};

/// A plugin: one root context in a VM, with its name, root id and configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PluginConfig {
    /// Shown in logs and as the `plugin_name` property.
    pub name: String,
    /// Chooses the guest's root context (`plugin_root_id`); often empty.
    pub root_id: String,
    /// What `proxy_on_configure` reads (buffer PLUGIN_CONFIGURATION).
    pub configuration: Vec<u8>,
}

/// A header or trailer map that the gateway and every plugin of one stream share, as Envoy's
/// filters share one map per stream: an edit one plugin makes is what the next plugin, the router
/// and a later `on_log` see, and no callback copies the map in or out.
///
/// The lock is never contended (a stream lives on one worker thread); it is there because a VM,
/// and so what it holds, must be `Send`. Host functions take it with `try_lock`: a re-entrant call
/// (a guest allocator calling back into a map function) gets a status instead of a deadlock.
#[derive(Debug, Clone, Default)]
pub struct SharedHeaders(Arc<Mutex<HeaderMap>>);

impl SharedHeaders {
    pub fn new(map: HeaderMap) -> Self {
        Self(Arc::new(Mutex::new(map)))
    }

    /// Never hold the guard across a call into a VM: the plugin's host calls would find the map
    /// locked.
    pub fn lock(&self) -> MutexGuard<'_, HeaderMap> {
        self.0.lock()
    }

    pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, HeaderMap>> {
        self.0.try_lock()
    }

    /// A copy of the map as it is now.
    pub fn snapshot(&self) -> HeaderMap {
        self.0.lock().clone()
    }

    /// Whether `other` is this same map (not an equal one).
    pub fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl From<HeaderMap> for SharedHeaders {
    fn from(map: HeaderMap) -> Self {
        Self::new(map)
    }
}

/// Per-stream data the embedder hands to the VM before a callback and reads back after it.
///
/// `None` means "not available in this stream (yet)". The plugin reaches a map only inside its
/// window (see `MapWindows`); an absent map, like a closed one, reads as empty pairs and answers
/// BAD_ARGUMENT to everything else, as Envoy does.
#[derive(Debug, Clone, Default)]
pub struct StreamData {
    pub request_headers: Option<SharedHeaders>,
    pub request_trailers: Option<SharedHeaders>,
    pub response_headers: Option<SharedHeaders>,
    pub response_trailers: Option<SharedHeaders>,
    pub request_body: Option<Vec<u8>>,
    pub response_body: Option<Vec<u8>>,
    pub downstream_data: Option<Vec<u8>>,
    pub upstream_data: Option<Vec<u8>>,
    pub info: StreamInfo,
}

/// The stream maps a plugin may use at this moment, opened as Envoy opens them: a map is
/// readable and writable during its own callback, and stays so while the stream is paused from
/// it; a continue of the stream (of either direction, as in Envoy) closes the request's maps;
/// `on_log` reads the request headers and the response headers and trailers. Outside its window
/// a map answers BAD_ARGUMENT, and its pairs read as empty.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct MapWindows {
    open: u8,
}

impl MapWindows {
    /// Every map open: for [`crate::Vm::call_export`], which reaches host functions outside any
    /// callback on purpose (tests and fuzzing).
    pub const ALL: Self = Self { open: u8::MAX };

    fn bit(map: MapType) -> u8 {
        match map {
            MapType::HttpRequestHeaders => 1,
            MapType::HttpRequestTrailers => 2,
            MapType::HttpResponseHeaders => 4,
            MapType::HttpResponseTrailers => 8,
            _ => 0,
        }
    }

    pub fn open(&mut self, map: MapType) {
        self.open |= Self::bit(map);
    }

    pub fn close(&mut self, map: MapType) {
        self.open &= !Self::bit(map);
    }

    pub fn close_request(&mut self) {
        self.close(MapType::HttpRequestHeaders);
        self.close(MapType::HttpRequestTrailers);
    }

    pub fn writable(&self, map: MapType) -> bool {
        self.open & Self::bit(map) != 0
    }

    /// `logging`: `on_log` is running.
    pub fn readable(&self, map: MapType, logging: bool) -> bool {
        self.writable(map)
            || (logging
                && matches!(
                    map,
                    MapType::HttpRequestHeaders
                        | MapType::HttpResponseHeaders
                        | MapType::HttpResponseTrailers
                ))
    }
}

pub(crate) struct Context {
    pub root: u32,
    pub plugin: Arc<PluginConfig>,
    pub stream: StreamData,
    pub windows: MapWindows,
    /// Properties the guest set (`proxy_set_property`), read back by `proxy_get_property`.
    pub filter_state: HashMap<Vec<u8>, Vec<u8>>,
    /// `proxy_on_done` returned false; `proxy_done` completes the context.
    pub awaiting_done: bool,
}

impl Context {
    pub fn is_root(&self, id: u32) -> bool {
        self.root == id
    }
}

/// Which callback is running, for the buffers and maps that only exist inside one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Idle,
    Start,
    VmStart,
    Configure,
    Stream,
    HttpCallResponse,
    GrpcInitialMetadata,
    GrpcMessage,
    GrpcTrailingMetadata,
    GrpcClose,
    ForeignFunction,
    Log,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CalloutKind {
    Http,
    Grpc,
}

/// An answer to an outbound call, visible to the guest during its callback.
#[derive(Debug, Default)]
pub(crate) struct Callout {
    pub headers: Option<HeaderMap>,
    pub body: Option<Vec<u8>>,
    pub trailers: Option<HeaderMap>,
}

/// The log level guests see through `proxy_get_log_level`, shared by every VM of a runtime and
/// changed at run time (admin `/logging`).
#[derive(Debug)]
pub struct LogLevelCell(AtomicU32);

impl LogLevelCell {
    pub fn new(level: LogLevel) -> Self {
        Self(AtomicU32::new(level as u32))
    }

    pub fn get(&self) -> LogLevel {
        LogLevel::from_raw(self.0.load(Ordering::Relaxed)).unwrap_or(LogLevel::Info)
    }

    pub fn set(&self, level: LogLevel) {
        self.0.store(level as u32, Ordering::Relaxed);
    }
}

pub struct VmState {
    pub(crate) vm_id: String,
    pub(crate) vm_configuration: Vec<u8>,
    /// `KEY=VALUE` entries the guest sees through WASI `environ_*`: the plugin's own, never the host's.
    pub(crate) environment: Vec<Vec<u8>>,
    pub(crate) host: Box<dyn Host>,
    pub(crate) shared: Arc<Shared>,
    /// The level of the plugin this VM runs (its first plugin names it), read on every host call.
    pub(crate) log_level: Arc<LogLevelCell>,
    pub(crate) log_levels: Arc<LogLevels>,
    /// The capability allow-list; `None` allows everything.
    pub(crate) allowed: Option<Arc<Capabilities>>,
    /// Host functions refused so far (each is logged once).
    pub(crate) refused: Vec<&'static str>,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) max_http_calls: usize,
    /// Whether the `max_http_calls` breach was logged (once until calls drain).
    pub(crate) callouts_full: bool,
    pub(crate) inbox: Arc<Inbox>,

    pub(crate) memory: Option<Memory>,
    pub(crate) allocator: Option<TypedFunc<u32, u32>>,

    /// Boxed: a context is about a kilobyte (its `StreamInfo` most of it), and each insert and
    /// removal would otherwise copy it whole.
    pub(crate) contexts: FastMap<u32, Box<Context>>,
    pub(crate) next_context_id: u32,
    /// The context of the running callback, and the one host calls act on (`proxy_set_effective_context`).
    pub(crate) current: u32,
    pub(crate) effective: u32,
    pub(crate) phase: Phase,

    pub(crate) next_token: u32,
    pub(crate) callouts: FastMap<u32, (CalloutKind, u32)>,
    pub(crate) callout: Callout,
    pub(crate) grpc_message: Option<Vec<u8>>,
    pub(crate) call_status: (u32, Vec<u8>),
    pub(crate) foreign_arguments: Option<Vec<u8>>,
    pub(crate) tick_periods: FastMap<u32, Duration>,
    /// Contexts whose `proxy_done` arrived; finished once the running callback returns.
    pub(crate) done: Vec<u32>,
    /// Set by WASI `proc_exit`, which ends the VM.
    pub(crate) exit_code: Option<i32>,
}

impl VmState {
    pub(crate) fn context(&self, id: u32) -> Option<&Context> {
        self.contexts.get(&id).map(|c| &**c)
    }

    pub(crate) fn effective_context(&self) -> Option<&Context> {
        self.contexts.get(&self.effective).map(|c| &**c)
    }

    pub(crate) fn effective_context_mut(&mut self) -> Option<&mut Context> {
        self.contexts.get_mut(&self.effective).map(|c| &mut **c)
    }

    /// The plugin the effective context belongs to, for logs and properties.
    pub(crate) fn plugin_name(&self) -> &str {
        self.effective_context()
            .map(|c| c.plugin.name.as_str())
            .unwrap_or("")
    }

    pub(crate) fn allocate_token(&mut self, kind: CalloutKind, context: u32) -> u32 {
        loop {
            self.next_token = self.next_token.wrapping_add(1).max(1);
            if !self.callouts.contains_key(&self.next_token) {
                self.callouts.insert(self.next_token, (kind, context));
                return self.next_token;
            }
        }
    }
}

/// A map for keys the host chooses (context ids, tokens, callback names), looked up several times
/// per callback: a multiply-rotate hash instead of SipHash. The guest may look up any key but never
/// chooses what is inserted, so there is no collision flooding to defend against.
pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

#[derive(Default, Clone, Copy)]
pub(crate) struct FastHasher(u64);

impl FastHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(n.into());
    }

    fn write_u32(&mut self, n: u32) {
        self.add(n.into());
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::FastMap;

    #[test]
    fn fast_maps_find_what_they_hold() {
        let mut ids: FastMap<u32, u32> = FastMap::default();
        for id in 0..1000 {
            ids.insert(id, id * 2);
        }
        assert!((0..1000).all(|id| ids.get(&id) == Some(&(id * 2))));
        assert_eq!(ids.get(&1000), None);
        let mut names: FastMap<&str, u32> = FastMap::default();
        names.insert("proxy_on_request_headers", 1);
        names.insert("proxy_on_response_headers", 2);
        assert_eq!(names.get("proxy_on_response_headers"), Some(&2));
        assert_eq!(names.get("proxy_on_request_header"), None);
    }
}
