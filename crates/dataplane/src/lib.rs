//! The data plane: listeners, routes, clusters, and the Proxy-Wasm filter chain run per worker.
//!
//! It serves a ready [`GatewaySpec`]: modules compiled, configuration validated. It never reads
//! files or manifests; that is the control side's job.

mod admin;
mod body;
mod chain;
mod convert;
mod health;
mod host;
mod idle;
mod plugin_vm;
mod proxy;
mod server;
mod spec;
mod stats;
mod tcp;
mod tls;
mod upstream;

pub use admin::{AdminHandle, AdminState, LogFilterSetter, MetricFilter, start_admin};
pub use body::GatewayBody;
pub use server::{BoundListener, GatewayHandle, ListenerRouting, StartError, start};
pub use spec::{
    ClusterSpec, FailurePolicy, FilterSpec, GatewaySpec, Limits, ListenerSpec, PathMatch,
    RouteAction, RouteSpec, SniRoute, TcpProxySpec, TlsFiles, UpstreamTls,
};
pub use stats::GatewayStats;
pub use upstream::send_once;
