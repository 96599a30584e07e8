//! The gateway's side of the ABI: a [`Host`] per VM that records what the plugin asked for. The
//! filter chain reads these effects after each callback (Envoy too defers them until the VM call
//! returns), and starts outbound calls.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use wasmgate_abi::{
    GrpcCallRequest, GrpcStreamRequest, Host, HttpCallRequest, LocalResponse, LogRecord, Status,
    StreamType,
};

#[derive(Default)]
pub(crate) struct Effects {
    pub continued: HashSet<(u32, StreamType)>,
    pub local_replies: HashMap<u32, LocalResponse>,
    /// `proxy_close_stream` calls: the context and the stream (TCP plugins close `Downstream` or
    /// `Upstream`).
    pub closed: HashSet<(u32, StreamType)>,
    pub http_calls: Vec<(u32, HttpCallRequest)>,
    pub grpc_calls: Vec<(u32, GrpcCallRequest)>,
    pub grpc_streams: Vec<(u32, GrpcStreamRequest)>,
    /// In the order the plugin asked: messages (with end of stream), half-closes, cancels.
    pub grpc_stream_ops: Vec<GrpcStreamOp>,
}

pub(crate) enum GrpcStreamOp {
    Send {
        token: u32,
        message: Vec<u8>,
        end_of_stream: bool,
    },
    Close(u32),
    Cancel(u32),
}

impl GatewayHost {
    fn known_cluster(&self, upstream: &[u8]) -> bool {
        std::str::from_utf8(upstream).is_ok_and(|name| self.clusters.contains(name))
    }
}

/// The cluster names `proxy_http_call` and `proxy_grpc_call` accept, process-wide; a reload that
/// changes the clusters replaces them.
#[derive(Default)]
pub(crate) struct ClusterNames(parking_lot::RwLock<Arc<HashSet<String>>>);

impl ClusterNames {
    pub fn new(names: impl IntoIterator<Item = String>) -> Self {
        Self(parking_lot::RwLock::new(Arc::new(
            names.into_iter().collect(),
        )))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.read().contains(name)
    }

    pub fn replace(&self, names: impl IntoIterator<Item = String>) {
        *self.0.write() = Arc::new(names.into_iter().collect());
    }
}

/// Shared between a VM's host and the worker that drives the VM. Both live on one worker thread,
/// so the lock is never contended; it is there because a `Host` must be `Send`.
///
/// Most callbacks ask for nothing, so the worker first looks at a flag kept beside the lock: it
/// says whether anything was left queued when the lock was last released, and lets the hot path
/// skip the lock (and the look into half a dozen empty collections) after every callback.
#[derive(Default, Clone)]
pub(crate) struct SharedEffects(Arc<EffectsCell>);

#[derive(Default)]
pub(crate) struct EffectsCell {
    queued: AtomicBool,
    effects: Mutex<Effects>,
}

impl SharedEffects {
    pub fn lock(&self) -> EffectsGuard<'_> {
        EffectsGuard {
            effects: self.0.effects.lock(),
            queued: &self.0.queued,
        }
    }

    /// False when nothing is queued: no lock needed.
    pub fn any_queued(&self) -> bool {
        self.0.queued.load(Ordering::Relaxed)
    }
}

pub(crate) struct EffectsGuard<'a> {
    effects: parking_lot::MutexGuard<'a, Effects>,
    queued: &'a AtomicBool,
}

impl std::ops::Deref for EffectsGuard<'_> {
    type Target = Effects;
    fn deref(&self) -> &Effects {
        &self.effects
    }
}

impl std::ops::DerefMut for EffectsGuard<'_> {
    fn deref_mut(&mut self) -> &mut Effects {
        &mut self.effects
    }
}

impl Drop for EffectsGuard<'_> {
    fn drop(&mut self) {
        // Still under the lock, so a writer on another thread could not slip between.
        self.queued
            .store(!self.effects.is_empty(), Ordering::Relaxed);
    }
}

impl Effects {
    fn is_empty(&self) -> bool {
        self.continued.is_empty()
            && self.local_replies.is_empty()
            && self.closed.is_empty()
            && self.http_calls.is_empty()
            && self.grpc_calls.is_empty()
            && self.grpc_streams.is_empty()
            && self.grpc_stream_ops.is_empty()
    }
}

pub(crate) struct GatewayHost {
    pub effects: SharedEffects,
    pub clusters: Arc<ClusterNames>,
    pub plugin: String,
}

impl Host for GatewayHost {
    fn log(&mut self, _record: &LogRecord) {}

    fn http_call(
        &mut self,
        _context_id: u32,
        token: u32,
        call: HttpCallRequest,
    ) -> Result<(), Status> {
        if !self.clusters.contains(&call.upstream) {
            tracing::debug!(plugin = %self.plugin, cluster = %call.upstream, "http_call to an unknown cluster");
            return Err(Status::BadArgument);
        }
        self.effects.lock().http_calls.push((token, call));
        Ok(())
    }

    fn grpc_call(
        &mut self,
        _context_id: u32,
        token: u32,
        call: GrpcCallRequest,
    ) -> Result<(), Status> {
        // Envoy takes a cluster name or a serialized GrpcService; a cluster name is what we know.
        let known =
            std::str::from_utf8(&call.upstream).is_ok_and(|name| self.clusters.contains(name));
        if !known {
            tracing::debug!(plugin = %self.plugin, "grpc_call to an unknown cluster");
            return Err(Status::ParseFailure);
        }
        self.effects.lock().grpc_calls.push((token, call));
        Ok(())
    }

    fn grpc_stream(
        &mut self,
        _context_id: u32,
        token: u32,
        call: GrpcStreamRequest,
    ) -> Result<(), Status> {
        if !self.known_cluster(&call.upstream) {
            tracing::debug!(plugin = %self.plugin, "grpc_stream to an unknown cluster");
            return Err(Status::ParseFailure);
        }
        self.effects.lock().grpc_streams.push((token, call));
        Ok(())
    }

    fn grpc_send(&mut self, token: u32, message: Vec<u8>, end_of_stream: bool) -> Status {
        self.effects
            .lock()
            .grpc_stream_ops
            .push(GrpcStreamOp::Send {
                token,
                message,
                end_of_stream,
            });
        Status::Ok
    }

    fn grpc_cancel(&mut self, token: u32) -> Status {
        self.effects
            .lock()
            .grpc_stream_ops
            .push(GrpcStreamOp::Cancel(token));
        Status::Ok
    }

    fn grpc_close(&mut self, token: u32) -> Status {
        self.effects
            .lock()
            .grpc_stream_ops
            .push(GrpcStreamOp::Close(token));
        Status::Ok
    }

    fn continue_stream(&mut self, context_id: u32, stream: StreamType) -> Status {
        // Every stream type, UPSTREAM included: Envoy answers UNIMPLEMENTED to that one, which
        // makes the Rust SDK's `resume_upstream` trap.
        self.effects.lock().continued.insert((context_id, stream));
        Status::Ok
    }

    fn close_stream(&mut self, context_id: u32, stream: StreamType) -> Status {
        self.effects.lock().closed.insert((context_id, stream));
        Status::Ok
    }

    fn send_local_response(&mut self, context_id: u32, response: LocalResponse) -> Status {
        self.effects
            .lock()
            .local_replies
            .insert(context_id, response);
        Status::Ok
    }

    fn clear_route_cache(&mut self, _context_id: u32) -> Status {
        // Routes are chosen again after the request headers pass the chain, so there is no cache.
        Status::Ok
    }
}
