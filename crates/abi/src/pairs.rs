//! The header-pair wire format (spec §"Serialization"):
//! `u32 count`, then `count` pairs of `(u32 key_len, u32 value_len)`, then every entry as
//! `key \0 value \0`. All integers are little-endian.
//!
//! Guests hand us these buffers, so decoding never trusts a length: every size is checked against
//! what is left, and the totals are capped as proxy-wasm-cpp-host caps them.

use thiserror::Error;

/// Largest serialized map a guest may pass (as in proxy-wasm-cpp-host).
pub const MAX_SERIALIZED_SIZE: usize = 1 << 20;
/// Most pairs a guest may pass (as in proxy-wasm-cpp-host).
pub const MAX_PAIRS: usize = 1024;

/// Why a serialized map was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PairsError {
    #[error("serialized map is {0} bytes, more than the {MAX_SERIALIZED_SIZE} allowed")]
    TooLarge(usize),
    #[error("serialized map is {0} bytes, too short for its 4-byte pair count")]
    Truncated(usize),
    #[error("serialized map declares {0} pairs, more than the {MAX_PAIRS} allowed")]
    TooManyPairs(u32),
    #[error("serialized map declares {declared} pairs but is too short for their size table")]
    SizeTableTruncated { declared: u32 },
    #[error("entry {index} runs past the end of the serialized map")]
    EntryTruncated { index: usize },
    #[error("entry {index} is not terminated by a NUL byte")]
    MissingTerminator { index: usize },
    #[error("{extra} unexpected bytes after the last entry")]
    TrailingBytes { extra: usize },
}

/// A decoded entry, borrowing from the serialized bytes.
pub type Pair<'a> = (&'a [u8], &'a [u8]);

/// Serialized size of `pairs`, as `proxy_get_header_map_size` reports it.
pub fn encoded_len<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> usize {
    if pairs.is_empty() {
        return 0;
    }
    4 + pairs
        .iter()
        .map(|(k, v)| 8 + k.as_ref().len() + v.as_ref().len() + 2)
        .sum::<usize>()
}

/// Encodes `pairs`. An empty map encodes to zero bytes: the Rust SDK panics on the one-byte form.
pub fn encode<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(pairs));
    encode_into(pairs, &mut out);
    out
}

/// Encodes `pairs` at the end of `out`.
pub fn encode_into<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)], out: &mut Vec<u8>) {
    encode_fields(
        pairs.len(),
        pairs.iter().map(|(k, v)| (k.as_ref(), v.as_ref())),
        out,
    );
}

/// Encodes `count` fields at the end of `out` (the iterator is walked twice: sizes, then bytes).
pub fn encode_fields<'a>(
    count: usize,
    fields: impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone,
    out: &mut Vec<u8>,
) {
    if count == 0 {
        return;
    }
    out.extend_from_slice(&(count as u32).to_le_bytes());
    for (k, v) in fields.clone() {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in fields {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
}

/// Decodes a serialized map, borrowing keys and values from `bytes`.
///
/// Zero bytes and the one-byte `\0` form both mean an empty map.
pub fn decode(bytes: &[u8]) -> Result<Vec<Pair<'_>>, PairsError> {
    if bytes.len() > MAX_SERIALIZED_SIZE {
        return Err(PairsError::TooLarge(bytes.len()));
    }
    if bytes.is_empty() || bytes == [0] {
        return Ok(Vec::new());
    }
    if bytes.len() < 4 {
        return Err(PairsError::Truncated(bytes.len()));
    }
    let count = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
    if count as usize > MAX_PAIRS {
        return Err(PairsError::TooManyPairs(count));
    }
    let count = count as usize;
    let table_end = 4 + count * 8;
    if bytes.len() < table_end {
        return Err(PairsError::SizeTableTruncated {
            declared: count as u32,
        });
    }
    let mut pairs = Vec::with_capacity(count);
    let mut cursor = table_end;
    for index in 0..count {
        let entry = &bytes[4 + index * 8..4 + index * 8 + 8];
        let key_len = u32::from_le_bytes(entry[..4].try_into().expect("4 bytes")) as usize;
        let value_len = u32::from_le_bytes(entry[4..].try_into().expect("4 bytes")) as usize;
        let key = take_terminated(bytes, &mut cursor, key_len, index)?;
        let value = take_terminated(bytes, &mut cursor, value_len, index)?;
        pairs.push((key, value));
    }
    if cursor != bytes.len() {
        return Err(PairsError::TrailingBytes {
            extra: bytes.len() - cursor,
        });
    }
    Ok(pairs)
}

fn take_terminated<'a>(
    bytes: &'a [u8],
    cursor: &mut usize,
    len: usize,
    index: usize,
) -> Result<&'a [u8], PairsError> {
    let end = cursor
        .checked_add(len)
        .filter(|end| *end < bytes.len())
        .ok_or(PairsError::EntryTruncated { index })?;
    if bytes[end] != 0 {
        return Err(PairsError::MissingTerminator { index });
    }
    let slice = &bytes[*cursor..end];
    *cursor = end + 1;
    Ok(slice)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_spec_example() {
        let bytes = encode(&[("a", "1"), ("b", "22")]);
        let expected = [
            2, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, b'a', 0, b'1', 0, b'b', 0,
            b'2', b'2', 0,
        ];
        assert_eq!(bytes, expected);
        assert_eq!(encoded_len(&[("a", "1"), ("b", "22")]), expected.len());
    }

    #[test]
    fn round_trips() {
        let pairs: Vec<(&[u8], &[u8])> = vec![(b":path", b"/x?y"), (b"empty", b""), (b"", b"v")];
        let bytes = encode(&pairs);
        assert_eq!(decode(&bytes).unwrap(), pairs);
    }

    #[test]
    fn empty_forms() {
        assert!(encode::<&str, &str>(&[]).is_empty());
        assert!(decode(&[]).unwrap().is_empty());
        assert!(decode(&[0]).unwrap().is_empty());
        assert!(decode(&[0, 0, 0, 0]).unwrap().is_empty());
    }

    #[test]
    fn refuses_malformed_input() {
        assert_eq!(decode(&[1, 0]), Err(PairsError::Truncated(2)));
        assert_eq!(
            decode(&[1, 0, 0, 0]),
            Err(PairsError::SizeTableTruncated { declared: 1 })
        );
        assert_eq!(
            decode(&[0xff, 0xff, 0xff, 0xff]),
            Err(PairsError::TooManyPairs(u32::MAX))
        );
        // One pair whose key claims 4 GiB.
        let mut lying = vec![1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];
        lying.extend_from_slice(b"k\0\0");
        assert_eq!(decode(&lying), Err(PairsError::EntryTruncated { index: 0 }));
        let mut unterminated = encode(&[("k", "v")]);
        let last = unterminated.len() - 1;
        unterminated[last] = b'x';
        assert_eq!(
            decode(&unterminated),
            Err(PairsError::MissingTerminator { index: 0 })
        );
        let mut trailing = encode(&[("k", "v")]);
        trailing.push(7);
        assert_eq!(
            decode(&trailing),
            Err(PairsError::TrailingBytes { extra: 1 })
        );
        assert_eq!(
            decode(&vec![0; MAX_SERIALIZED_SIZE + 1]),
            Err(PairsError::TooLarge(MAX_SERIALIZED_SIZE + 1))
        );
    }
}
