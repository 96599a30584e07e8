//! Property values and the encodings Envoy gives them on the wire (reference §3.4): strings and
//! bytes raw; integers, durations and timestamps as 8-byte little-endian; booleans as one byte;
//! maps in the header-pair format.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::pairs;

#[derive(Debug, Clone, PartialEq)]
pub enum PropertyValue {
    Bytes(Vec<u8>),
    Int(i64),
    UInt(u64),
    Double(f64),
    Bool(bool),
    /// Encoded as nanoseconds, like Envoy's `duration` attributes.
    Duration(Duration),
    /// Encoded as nanoseconds since the Unix epoch, like Envoy's `timestamp` attributes.
    Timestamp(SystemTime),
    Map(Vec<(Vec<u8>, Vec<u8>)>),
}

impl PropertyValue {
    pub fn string(value: impl Into<String>) -> Self {
        Self::Bytes(value.into().into_bytes())
    }

    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Bytes(bytes) => bytes.clone(),
            Self::Int(v) => v.to_le_bytes().to_vec(),
            Self::UInt(v) => v.to_le_bytes().to_vec(),
            Self::Double(v) => v.to_le_bytes().to_vec(),
            Self::Bool(v) => vec![u8::from(*v)],
            Self::Duration(d) => (d.as_nanos().min(i64::MAX as u128) as i64)
                .to_le_bytes()
                .to_vec(),
            Self::Timestamp(t) => {
                let nanos = t
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos().min(i64::MAX as u128) as i64)
                    .unwrap_or(0);
                nanos.to_le_bytes().to_vec()
            }
            Self::Map(entries) => pairs::encode(entries),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings() {
        assert_eq!(PropertyValue::string("ab").encode(), b"ab");
        assert_eq!(PropertyValue::Int(-1).encode(), [0xff; 8]);
        assert_eq!(PropertyValue::UInt(258).encode(), [2, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(PropertyValue::Bool(true).encode(), [1]);
        assert_eq!(
            PropertyValue::Duration(Duration::from_micros(1)).encode(),
            1000i64.to_le_bytes()
        );
        assert_eq!(
            PropertyValue::Timestamp(UNIX_EPOCH + Duration::from_secs(2)).encode(),
            2_000_000_000i64.to_le_bytes()
        );
        let map = PropertyValue::Map(vec![(b"k".to_vec(), b"v".to_vec())]);
        assert_eq!(map.encode(), pairs::encode(&[("k", "v")]));
    }
}
