//! Tools for plugin authors. Today: [`harness`], which drives a real module through an HTTP
//! exchange in-process, with a [`RecordingHost`](harness::RecordingHost) standing in for the proxy.
#![forbid(unsafe_code)]

pub mod harness;
