//! Tools for plugin authors: [`harness`], which drives a real module through an HTTP exchange
//! in-process, with a [`RecordingHost`](harness::RecordingHost) standing in for the proxy, and
//! [`cases`], the declared requests and expectations `wasmgate plugin test` runs on it.
#![forbid(unsafe_code)]

pub mod cases;
pub mod harness;
