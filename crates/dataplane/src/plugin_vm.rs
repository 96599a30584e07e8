//! What an HTTP filter plugin ([`crate::chain::Plugin`]) and a network plugin
//! ([`crate::tcp::NetworkPlugin`]) share on a worker: one VM per plugin, as Envoy runs one per
//! worker; the effects its host queues, read after each callback; FAIL_RELOAD's rebuilds; the
//! outbound calls it makes, started by the worker; its timer and its queue deliveries.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use wasmgate_abi::{GrpcCallRequest, HttpCallRequest};
use wasmgate_runtime::{CallOutcome, Runtime, Vm, VmError};

use crate::health::VmHealth;
use crate::host::{ClusterNames, GatewayHost, SharedEffects};
use crate::spec::FilterSpec;
use crate::stats::GatewayStats;
use crate::upstream::UpstreamsCell;

pub(crate) struct PluginVm {
    pub spec: FilterSpec,
    pub vm: RefCell<Vm>,
    pub root: Cell<u32>,
    pub effects: SharedEffects,
    /// Woken when a callout answers, for streams waiting on a paused plugin.
    pub notify: Notify,
    pub upstreams: Rc<UpstreamsCell>,
    runtime: Arc<Runtime>,
    clusters: Arc<ClusterNames>,
    stats: Arc<GatewayStats>,
    health: VmHealth,
    /// "plugin" or "network plugin", for log lines.
    kind: &'static str,
}

/// A kind of plugin built on [`PluginVm`].
pub(crate) trait WorkerPlugin: 'static {
    fn core(&self) -> &PluginVm;

    /// Starts the outbound calls the plugin queued during its last callback.
    fn dispatch_calls(self: &Rc<Self>);
}

impl PluginVm {
    pub fn start(
        spec: FilterSpec,
        runtime: Arc<Runtime>,
        clusters: Arc<ClusterNames>,
        upstreams: Rc<UpstreamsCell>,
        stats: Arc<GatewayStats>,
        kind: &'static str,
    ) -> Result<Self, VmError> {
        let effects = SharedEffects::default();
        let (vm, root) = Self::build_vm(&spec, &runtime, &clusters, &effects, 0)?;
        stats.vm_started(&spec.name, 1);
        let health = VmHealth::new(&spec, stats.clone());
        Ok(Self {
            spec,
            vm: RefCell::new(vm),
            root: Cell::new(root),
            effects,
            notify: Notify::new(),
            upstreams,
            runtime,
            clusters,
            stats,
            health,
            kind,
        })
    }

    /// A VM whose host queues its effects in `effects`, handing out context ids after
    /// `last_context_id`.
    fn build_vm(
        spec: &FilterSpec,
        runtime: &Arc<Runtime>,
        clusters: &Arc<ClusterNames>,
        effects: &SharedEffects,
        last_context_id: u32,
    ) -> Result<(Vm, u32), VmError> {
        let host = GatewayHost {
            effects: effects.clone(),
            clusters: clusters.clone(),
            plugin: spec.name.clone(),
        };
        let mut vm = Vm::new(runtime, &spec.module, spec.vm.clone(), Box::new(host))?;
        vm.continue_context_ids_after(last_context_id);
        let root = vm.start_plugin(spec.plugin.clone())?;
        Ok((vm, root))
    }

    /// Why the VM failed, if it did (counted once per failure in the plugin's health).
    pub fn failure(&self) -> Option<String> {
        let failure = self.vm.borrow().failure().map(str::to_owned);
        if let Some(reason) = &failure {
            self.health.failed(reason);
        }
        failure
    }

    /// FAIL_RELOAD: a fresh VM unless the backoff since the last rebuild still runs.
    pub fn try_reload(&self) -> bool {
        if !self.health.may_rebuild() {
            return false;
        }
        let ok = self.reload();
        self.health.rebuilt(ok);
        ok
    }

    /// A fresh VM for this plugin. Streams and connections still on the old VM have lost their
    /// contexts.
    fn reload(&self) -> bool {
        // The new VM's host queues into the effects the chain reads, and its context ids follow
        // the old VM's, so streams still holding old ids never reach a new stream's context.
        let last_context_id = self.vm.borrow().last_context_id();
        match Self::build_vm(
            &self.spec,
            &self.runtime,
            &self.clusters,
            &self.effects,
            last_context_id,
        ) {
            Ok((vm, root)) => {
                *self.vm.borrow_mut() = vm;
                self.root.set(root);
                tracing::warn!(plugin = %self.spec.name, "reloaded the {}'s VM after a failure", self.kind);
                true
            }
            Err(error) => {
                tracing::error!(plugin = %self.spec.name, "reloading the {}'s VM failed: {error}", self.kind);
                false
            }
        }
    }

    pub fn tick_period(&self) -> Option<Duration> {
        self.vm.borrow().tick_period(self.root.get())
    }

    pub fn set_queue_waker(&self, waker: Arc<dyn Fn() + Send + Sync>) {
        self.vm.borrow().set_queue_waker(waker);
    }
}

impl Drop for PluginVm {
    fn drop(&mut self) {
        self.stats.vm_started(&self.spec.name, -1);
    }
}

/// Starts the plugin's unary gRPC calls and HTTP calls; each answer goes to the VM, then whatever
/// the plugin asked for meanwhile is started, and waiting streams are woken.
pub(crate) fn spawn_unary_calls<P: WorkerPlugin>(
    plugin: &Rc<P>,
    grpc_calls: Vec<(u32, GrpcCallRequest)>,
    http_calls: Vec<(u32, HttpCallRequest)>,
) {
    for (token, call) in grpc_calls {
        let plugin = plugin.clone();
        tokio::task::spawn_local(async move {
            let core = plugin.core();
            let outcome = core.upstreams.current().grpc_call(&call).await;
            let result = {
                let mut vm = core.vm.borrow_mut();
                match outcome {
                    Ok(message) => {
                        let delivered = vm.on_grpc_receive(token, message);
                        vm.end_grpc_call(token);
                        delivered
                    }
                    Err((status, message)) => vm.on_grpc_close(token, status, &message),
                }
            };
            if let Err(error) = result {
                tracing::warn!(plugin = %core.spec.name, "delivering a gRPC response: {error}");
            }
            plugin.dispatch_calls();
            plugin.core().notify.notify_waiters();
        });
    }
    for (token, call) in http_calls {
        let plugin = plugin.clone();
        tokio::task::spawn_local(async move {
            let core = plugin.core();
            let outcome = core.upstreams.current().http_call(&call).await;
            if let CallOutcome::Failure { message } = &outcome {
                tracing::debug!(plugin = %core.spec.name, cluster = %call.upstream, "http_call failed: {message}");
            }
            let result = core.vm.borrow_mut().on_http_call_response(token, outcome);
            if let Err(error) = result {
                tracing::warn!(plugin = %core.spec.name, "delivering an http_call response: {error}");
            }
            plugin.dispatch_calls();
            plugin.core().notify.notify_waiters();
        });
    }
}

/// The plugin's timer fired: `proxy_on_tick` on its root context (not on a failed VM).
pub(crate) fn tick<P: WorkerPlugin>(plugin: &Rc<P>) {
    deliver(plugin, "on_tick", |vm, root| vm.on_tick(root));
}

/// A queue the plugin registered has messages: `proxy_on_queue_ready`.
pub(crate) fn deliver_queue_ready<P: WorkerPlugin>(plugin: &Rc<P>) {
    deliver(plugin, "on_queue_ready", |vm, _| {
        vm.deliver_queue_ready().map(|_delivered| ())
    });
}

fn deliver<P: WorkerPlugin>(
    plugin: &Rc<P>,
    what: &str,
    call: impl FnOnce(&mut Vm, u32) -> Result<(), VmError>,
) {
    let core = plugin.core();
    if core.failure().is_some() {
        return;
    }
    let result = call(&mut core.vm.borrow_mut(), core.root.get());
    if let Err(error) = result {
        tracing::warn!(plugin = %core.spec.name, "{what}: {error}");
    }
    plugin.dispatch_calls();
    core.notify.notify_waiters();
}
