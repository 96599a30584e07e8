//! The Proxy-Wasm ABI as a host sees it, independent of any Wasm engine and any proxy.
//!
//! - [`types`]: statuses, buffer/map/stream/peer/metric kinds, ABI versions.
//! - [`pairs`]: the header-pair wire format that maps cross the boundary in.
//! - [`HeaderMap`]: the header and trailer maps a host keeps per stream.
//! - [`property`]: property values and their wire encodings (Envoy's attribute encodings).
//! - [`Host`]: what an embedder (the gateway, a test harness) implements for the calls that need a proxy.
#![forbid(unsafe_code)]

mod header_map;
pub mod host;
pub mod pairs;
pub mod property;
pub mod types;

pub use header_map::HeaderMap;
pub use host::{
    GrpcCallRequest, GrpcStreamRequest, Host, HttpCallRequest, LocalResponse, LogRecord, StreamInfo,
};
pub use property::PropertyValue;
pub use types::*;
