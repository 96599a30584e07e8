//! Enumerations of the Proxy-Wasm ABI (spec v0.1.0 to v0.2.1, plus the values proxy-wasm-cpp-host adds).

use std::fmt;

/// `proxy_status_t`: what every host function returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    SerializationFailure = 3,
    ParseFailure = 4,
    BadExpression = 5,
    InvalidMemoryAccess = 6,
    Empty = 7,
    CasMismatch = 8,
    ResultMismatch = 9,
    InternalFailure = 10,
    BrokenConnection = 11,
    Unimplemented = 12,
}

impl Status {
    pub fn from_raw(raw: u32) -> Option<Self> {
        const ALL: [Status; 13] = [
            Status::Ok,
            Status::NotFound,
            Status::BadArgument,
            Status::SerializationFailure,
            Status::ParseFailure,
            Status::BadExpression,
            Status::InvalidMemoryAccess,
            Status::Empty,
            Status::CasMismatch,
            Status::ResultMismatch,
            Status::InternalFailure,
            Status::BrokenConnection,
            Status::Unimplemented,
        ];
        ALL.get(raw as usize).copied()
    }

    pub fn code(self) -> u32 {
        self as u32
    }

    /// The status as a guest sees it: an `i32` return value.
    pub fn raw(self) -> i32 {
        self as i32
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Status::Ok => "Ok",
            Status::NotFound => "NotFound",
            Status::BadArgument => "BadArgument",
            Status::SerializationFailure => "SerializationFailure",
            Status::ParseFailure => "ParseFailure",
            Status::BadExpression => "BadExpression",
            Status::InvalidMemoryAccess => "InvalidMemoryAccess",
            Status::Empty => "Empty",
            Status::CasMismatch => "CasMismatch",
            Status::ResultMismatch => "ResultMismatch",
            Status::InternalFailure => "InternalFailure",
            Status::BrokenConnection => "BrokenConnection",
            Status::Unimplemented => "Unimplemented",
        };
        f.write_str(name)
    }
}

/// `proxy_log_level_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u32)]
pub enum LogLevel {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

impl LogLevel {
    pub fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => Self::Trace,
            1 => Self::Debug,
            2 => Self::Info,
            3 => Self::Warn,
            4 => Self::Error,
            5 => Self::Critical,
            _ => return None,
        })
    }

    /// Parses the names Envoy's admin `/logging` endpoint accepts.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "trace" => Self::Trace,
            "debug" => Self::Debug,
            "info" => Self::Info,
            "warn" | "warning" => Self::Warn,
            "error" => Self::Error,
            "critical" | "off" => Self::Critical,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trace => "trace",
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
            Self::Critical => "critical",
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `proxy_action_t` as returned by stream callbacks.
///
/// The spec knows CONTINUE and PAUSE; Envoy forwards wider raw values to its filter statuses
/// (reference §3.2), so the raw value is kept for the embedder that wants it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
    /// Any value above PAUSE, kept as returned. Hosts treat it as a stop.
    Other(u32),
}

impl Action {
    pub fn from_raw(raw: u32) -> Self {
        match raw {
            0 => Self::Continue,
            1 => Self::Pause,
            other => Self::Other(other),
        }
    }

    pub fn is_continue(self) -> bool {
        self == Self::Continue
    }
}

macro_rules! raw_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $value:expr),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum $name { $($variant = $value),+ }

        impl $name {
            pub fn from_raw(raw: u32) -> Option<Self> {
                match raw {
                    $($value => Some(Self::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

raw_enum!(
    /// `proxy_buffer_type_t`.
    BufferType {
        HttpRequestBody = 0,
        HttpResponseBody = 1,
        DownstreamData = 2,
        UpstreamData = 3,
        HttpCallResponseBody = 4,
        GrpcReceiveBuffer = 5,
        VmConfiguration = 6,
        PluginConfiguration = 7,
        CallData = 8,
    }
);

raw_enum!(
    /// `proxy_map_type_t`.
    MapType {
        HttpRequestHeaders = 0,
        HttpRequestTrailers = 1,
        HttpResponseHeaders = 2,
        HttpResponseTrailers = 3,
        GrpcReceiveInitialMetadata = 4,
        GrpcReceiveTrailingMetadata = 5,
        HttpCallResponseHeaders = 6,
        HttpCallResponseTrailers = 7,
    }
);

raw_enum!(
    /// `proxy_stream_type_t`.
    StreamType {
        HttpRequest = 0,
        HttpResponse = 1,
        Downstream = 2,
        Upstream = 3,
    }
);

raw_enum!(
    /// `proxy_peer_type_t`.
    PeerType {
        Unknown = 0,
        Local = 1,
        Remote = 2,
    }
);

raw_enum!(
    /// `proxy_metric_type_t`.
    MetricType {
        Counter = 0,
        Gauge = 1,
        Histogram = 2,
    }
);

/// WASI preview1 errno values a Proxy-Wasm host answers with.
pub mod errno {
    pub const SUCCESS: i32 = 0;
    pub const BADF: i32 = 8;
    pub const FAULT: i32 = 21;
    pub const INVAL: i32 = 28;
    pub const NOSYS: i32 = 52;
    pub const NOTSUP: i32 = 58;
    pub const NOTCAPABLE: i32 = 76;
}

/// The ABI a module was built for, told by its exported marker function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AbiVersion {
    V0_1_0,
    V0_2_0,
    V0_2_1,
}

impl AbiVersion {
    pub const MARKERS: [(&'static str, AbiVersion); 3] = [
        ("proxy_abi_version_0_2_1", AbiVersion::V0_2_1),
        ("proxy_abi_version_0_2_0", AbiVersion::V0_2_0),
        ("proxy_abi_version_0_1_0", AbiVersion::V0_1_0),
    ];

    pub fn from_marker(export_name: &str) -> Option<Self> {
        Self::MARKERS
            .iter()
            .find(|(name, _)| *name == export_name)
            .map(|(_, version)| *version)
    }

    pub fn marker(self) -> &'static str {
        Self::MARKERS
            .iter()
            .find(|(_, version)| *version == self)
            .map(|(name, _)| *name)
            .expect("every version has a marker")
    }
}

impl fmt::Display for AbiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AbiVersion::V0_1_0 => "0.1.0",
            AbiVersion::V0_2_0 => "0.2.0",
            AbiVersion::V0_2_1 => "0.2.1",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_values_round_trip() {
        for raw in 0..=8 {
            assert_eq!(BufferType::from_raw(raw).unwrap() as u32, raw);
        }
        assert_eq!(BufferType::from_raw(9), None);
        assert_eq!(
            MapType::from_raw(7),
            Some(MapType::HttpCallResponseTrailers)
        );
        assert_eq!(MapType::from_raw(8), None);
        assert_eq!(StreamType::from_raw(4), None);
        assert_eq!(LogLevel::from_raw(6), None);
        assert_eq!(Action::from_raw(3), Action::Other(3));
    }

    #[test]
    fn markers_tell_versions_apart() {
        assert_eq!(
            AbiVersion::from_marker("proxy_abi_version_0_2_0"),
            Some(AbiVersion::V0_2_0)
        );
        assert_eq!(AbiVersion::from_marker("proxy_abi_version_0_3_0"), None);
        assert_eq!(AbiVersion::V0_1_0.marker(), "proxy_abi_version_0_1_0");
    }
}
