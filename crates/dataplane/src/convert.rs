//! Between hyper's typed messages and the Proxy-Wasm header maps plugins see, with Envoy's
//! pseudo-headers (`:method`, `:path`, `:authority`, `:scheme`, `:status`).

use http::header::{HeaderName, HeaderValue};
use http::{Request, Response, request, response};
use wasmgate_abi::HeaderMap;

use crate::body::GatewayBody;

/// Headers that describe one hop and are never forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "proxy-authenticate",
    "proxy-authorization",
];

pub(crate) fn request_map(parts: &request::Parts, scheme: &str) -> HeaderMap {
    let mut map = HeaderMap::new();
    map.add(":method", parts.method.as_str());
    map.add(
        ":path",
        parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/"),
    );
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    map.add(":authority", authority);
    map.add(":scheme", scheme);
    for (name, value) in &parts.headers {
        if name == http::header::HOST || is_hop_by_hop(name.as_str()) {
            continue;
        }
        map.add(name.as_str(), value.as_bytes());
    }
    map
}

pub(crate) fn response_map(parts: &response::Parts) -> HeaderMap {
    let mut map = HeaderMap::new();
    map.add(":status", parts.status.as_str());
    for (name, value) in &parts.headers {
        if !is_hop_by_hop(name.as_str()) {
            map.add(name.as_str(), value.as_bytes());
        }
    }
    map
}

/// A header map without pseudo-headers (trailers).
pub(crate) fn plain_map(headers: &http::HeaderMap) -> HeaderMap {
    headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_bytes()))
        .collect()
}

fn is_hop_by_hop(name: &str) -> bool {
    is_hop_by_hop_bytes(name.as_bytes())
}

/// Map keys are lower-case already (see [`HeaderMap::add`]).
fn is_hop_by_hop_bytes(name: &[u8]) -> bool {
    HOP_BY_HOP.iter().any(|hop| hop.as_bytes() == name)
}

/// Copies the regular fields of `map` into `headers`, dropping pseudo-headers and fields a plugin
/// made invalid (logged: a bad header must not break the stream).
pub(crate) fn fill_headers(map: &HeaderMap, headers: &mut http::HeaderMap) {
    for (name, value) in map.iter() {
        if name.starts_with(b":") || is_hop_by_hop_bytes(name) {
            continue;
        }
        match (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            (Ok(name), Ok(value)) => {
                headers.append(name, value);
            }
            _ => {
                tracing::debug!(name = %String::from_utf8_lossy(name), "dropping an invalid header field")
            }
        }
    }
}

pub(crate) fn request_from_map(
    map: &HeaderMap,
    body: GatewayBody,
) -> Result<Request<GatewayBody>, String> {
    let method = map.get_str(":method").ok_or(":method is missing")?;
    let path = map.get_str(":path").ok_or(":path is missing")?;
    let mut builder = Request::builder().method(method).uri(path);
    if let Some(authority) = map.get_str(":authority").filter(|a| !a.is_empty()) {
        builder = builder.header(http::header::HOST, authority);
    }
    let mut request = builder
        .body(body)
        .map_err(|e| format!("invalid request: {e}"))?;
    fill_headers(map, request.headers_mut());
    Ok(request)
}

pub(crate) fn response_from_map(map: &HeaderMap, body: GatewayBody) -> Response<GatewayBody> {
    let status = map
        .get_str(":status")
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| http::StatusCode::from_u16(s).ok())
        .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = Response::new(body);
    *response.status_mut() = status;
    fill_headers(map, response.headers_mut());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let request = Request::builder()
            .method("POST")
            .uri("/a?b=1")
            .header("host", "example.com")
            .header("connection", "keep-alive")
            .header("x-a", "1")
            .body(())
            .unwrap();
        let (parts, ()) = request.into_parts();
        let map = request_map(&parts, "http");
        assert_eq!(map.get_str(":authority"), Some("example.com"));
        assert_eq!(map.get_str(":path"), Some("/a?b=1"));
        assert!(map.get("connection").is_none());
        assert!(map.get("host").is_none());
        let mut edited = map.clone();
        edited.add("bad header", "x");
        edited.add("x-b", "2");
        let rebuilt = request_from_map(&edited, GatewayBody::empty()).unwrap();
        assert_eq!(rebuilt.method(), "POST");
        assert_eq!(rebuilt.headers()["host"], "example.com");
        assert_eq!(rebuilt.headers()["x-b"], "2");
        assert!(rebuilt.headers().get("bad header").is_none());
    }
}
