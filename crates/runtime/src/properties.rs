//! The runtime's own answers to `proxy_get_property`, with Envoy's attribute names and encodings
//! (reference §3.4), computed from the stream's maps and the embedder's [`StreamInfo`].

use std::net::SocketAddr;
use std::time::SystemTime;

use wasmgate_abi::{HeaderMap, PropertyValue, StreamInfo};

use parking_lot::MutexGuard;

use crate::state::{Context, SharedHeaders, VmState};

/// Splits a guest's property path: segments joined by NUL, no trailing NUL.
pub(crate) fn split_path(path: &[u8]) -> Vec<&[u8]> {
    path.split(|b| *b == 0).collect()
}

/// Resolves `path` for `context`; `None` answers NOT_FOUND.
pub(crate) fn resolve(state: &VmState, context: &Context, path: &[&[u8]]) -> Option<PropertyValue> {
    let (head, rest) = path.split_first()?;
    let value = match *head {
        b"plugin_name" => PropertyValue::string(context.plugin.name.clone()),
        b"plugin_root_id" => PropertyValue::string(context.plugin.root_id.clone()),
        b"plugin_vm_id" => PropertyValue::string(state.vm_id.clone()),
        b"connection_id" => PropertyValue::UInt(context.stream.info.connection_id?),
        b"request" => return request(context, rest),
        b"response" => return response(context, rest),
        b"source" => return address(context.stream.info.source, rest),
        b"destination" => return address(context.stream.info.destination, rest),
        b"connection" => return connection(&context.stream.info, rest),
        b"upstream" => return upstream(&context.stream.info, rest),
        b"xds" => return xds(&context.stream.info, rest),
        _ => return None,
    };
    rest.is_empty().then_some(value)
}

fn string(value: &Option<String>) -> Option<PropertyValue> {
    value.as_ref().map(|v| PropertyValue::string(v.clone()))
}

fn header(map: Option<&HeaderMap>, name: &str) -> Option<PropertyValue> {
    map?.get(name).map(|v| PropertyValue::Bytes(v.to_vec()))
}

/// A header map as Envoy's attribute map: one entry per name, repeated values comma-joined.
fn header_map(map: &HeaderMap) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for (k, v) in map.iter() {
        match out.iter_mut().find(|(key, _)| key == k) {
            Some((_, joined)) => {
                joined.push(b',');
                joined.extend_from_slice(v);
            }
            None => out.push((k.to_vec(), v.to_vec())),
        }
    }
    out
}

/// A map attribute, or one of its entries when the path goes one level deeper.
fn map_or_entry(map: Option<&HeaderMap>, rest: &[&[u8]]) -> Option<PropertyValue> {
    let entries = header_map(map?);
    match rest {
        [] => Some(PropertyValue::Map(entries)),
        [key] => entries
            .into_iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| PropertyValue::Bytes(v)),
        _ => None,
    }
}

fn request(context: &Context, rest: &[&[u8]]) -> Option<PropertyValue> {
    let stream = &context.stream;
    let guard = locked(&stream.request_headers);
    let headers = guard.as_deref();
    let path = || headers?.get(":path").map(<[u8]>::to_vec);
    let (name, deeper) = rest.split_first()?;
    if *name == b"headers" {
        return map_or_entry(headers, deeper);
    }
    if !deeper.is_empty() {
        return None;
    }
    match *name {
        b"path" => path().map(PropertyValue::Bytes),
        b"url_path" => {
            let path = path()?;
            let end = path.iter().position(|b| *b == b'?').unwrap_or(path.len());
            Some(PropertyValue::Bytes(path[..end].to_vec()))
        }
        b"query" => {
            let path = path()?;
            let start = path
                .iter()
                .position(|b| *b == b'?')
                .map(|i| i + 1)
                .unwrap_or(path.len());
            Some(PropertyValue::Bytes(path[start..].to_vec()))
        }
        b"host" => header(headers, ":authority").or_else(|| header(headers, "host")),
        b"scheme" => header(headers, ":scheme"),
        b"method" => header(headers, ":method"),
        b"referer" => header(headers, "referer"),
        b"useragent" => header(headers, "user-agent"),
        b"id" => header(headers, "x-request-id"),
        b"protocol" => string(&stream.info.protocol),
        b"time" => stream.info.start_time.map(PropertyValue::Timestamp),
        b"duration" => {
            let start = stream.info.start_time?;
            Some(PropertyValue::Duration(
                SystemTime::now().duration_since(start).unwrap_or_default(),
            ))
        }
        b"size" => stream
            .info
            .request_size
            .or_else(|| content_length(headers))
            .map(|v| PropertyValue::Int(v as i64)),
        b"total_size" => stream
            .info
            .request_total_size
            .map(|v| PropertyValue::Int(v as i64)),
        b"headers_bytes" => headers.map(|h| PropertyValue::Int(headers_bytes(h))),
        _ => None,
    }
}

/// A stream map for reading; `None` when absent (or, never in practice, locked by the caller).
fn locked(slot: &Option<SharedHeaders>) -> Option<MutexGuard<'_, HeaderMap>> {
    slot.as_ref()?.try_lock()
}

fn content_length(headers: Option<&HeaderMap>) -> Option<u64> {
    headers?.get_str("content-length")?.trim().parse().ok()
}

fn headers_bytes(map: &HeaderMap) -> i64 {
    map.iter().map(|(k, v)| (k.len() + v.len()) as i64).sum()
}

fn response(context: &Context, rest: &[&[u8]]) -> Option<PropertyValue> {
    let stream = &context.stream;
    let guard = locked(&stream.response_headers);
    let headers = guard.as_deref();
    let trailers_guard = locked(&stream.response_trailers);
    let trailers = trailers_guard.as_deref();
    let (name, deeper) = rest.split_first()?;
    match *name {
        b"headers" => return map_or_entry(headers, deeper),
        b"trailers" => return map_or_entry(trailers, deeper),
        _ if !deeper.is_empty() => return None,
        _ => {}
    }
    match *name {
        b"code" => {
            let code: i64 = headers?.get_str(":status")?.parse().ok()?;
            Some(PropertyValue::Int(code))
        }
        b"grpc_status" => {
            let from = |map: Option<&HeaderMap>| -> Option<i64> {
                map?.get_str("grpc-status")?.parse().ok()
            };
            from(trailers)
                .or_else(|| from(headers))
                .map(PropertyValue::Int)
        }
        b"code_details" => string(&stream.info.response_code_details),
        b"flags" => stream
            .info
            .response_flags
            .map(|v| PropertyValue::Int(v as i64)),
        b"size" => stream
            .info
            .response_size
            .or_else(|| content_length(headers))
            .map(|v| PropertyValue::Int(v as i64)),
        b"total_size" => stream
            .info
            .response_total_size
            .map(|v| PropertyValue::Int(v as i64)),
        b"headers_bytes" => headers.map(|h| PropertyValue::Int(headers_bytes(h))),
        _ => None,
    }
}

fn address(addr: Option<SocketAddr>, rest: &[&[u8]]) -> Option<PropertyValue> {
    let addr = addr?;
    match rest {
        [b"address"] => Some(PropertyValue::string(addr.to_string())),
        [b"port"] => Some(PropertyValue::Int(addr.port() as i64)),
        _ => None,
    }
}

fn connection(info: &StreamInfo, rest: &[&[u8]]) -> Option<PropertyValue> {
    match rest {
        [b"id"] => info.connection_id.map(PropertyValue::UInt),
        [b"mtls"] => Some(PropertyValue::Bool(info.mtls)),
        [b"requested_server_name"] => string(&info.requested_server_name),
        [b"tls_version"] => string(&info.tls_version),
        _ => None,
    }
}

fn upstream(info: &StreamInfo, rest: &[&[u8]]) -> Option<PropertyValue> {
    match rest {
        [b"address"] => info
            .upstream_address
            .map(|a| PropertyValue::string(a.to_string())),
        [b"port"] => info
            .upstream_address
            .map(|a| PropertyValue::Int(a.port() as i64)),
        [b"local_address"] => info
            .upstream_local_address
            .map(|a| PropertyValue::string(a.to_string())),
        [b"tls_version"] => string(&info.upstream_tls_version),
        [b"request_attempt_count"] => info.upstream_request_attempt_count.map(PropertyValue::UInt),
        _ => None,
    }
}

fn xds(info: &StreamInfo, rest: &[&[u8]]) -> Option<PropertyValue> {
    match rest {
        [b"cluster_name"] => string(&info.cluster_name),
        [b"route_name"] => string(&info.route_name),
        [b"virtual_host_name"] => string(&info.virtual_host_name),
        [b"filter_chain_name"] => string(&info.filter_chain_name),
        [b"listener_direction"] => info.listener_direction.map(PropertyValue::Int),
        [b"node", b"id"] => string(&info.node_id),
        _ => None,
    }
}
