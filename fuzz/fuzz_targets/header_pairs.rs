//! The header-pair codec (`wasmgate_abi::pairs` and `HeaderMap`), which decodes every map a guest
//! hands the host. Each input is used twice:
//!
//! - as a serialized map, as a guest would pass it: decoding answers `Ok` or `Err`, never panics,
//!   and what it accepts is canonical (re-encoding gives the same bytes, but for the three spellings
//!   of an empty map);
//! - as a description of pairs: encoding them and decoding the result gives them back, and more
//!   pairs than the limit are refused as too many.
#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use wasmgate_abi::HeaderMap;
use wasmgate_abi::pairs::{self, MAX_PAIRS, MAX_SERIALIZED_SIZE, PairsError};

fuzz_target!(|data: &[u8]| {
    decode_as_a_guest_would_send(data);
    // Running out of input only ends the structured half early; there is nothing to reject.
    let _ = encode_then_decode(&mut Unstructured::new(data));
});

fn decode_as_a_guest_would_send(data: &[u8]) {
    let decoded = pairs::decode(data);
    let map = HeaderMap::decode(data);
    let pairs = match decoded {
        Ok(pairs) => pairs,
        Err(error) => {
            // HeaderMap::decode is the same decoder plus lower-casing: it refuses for the same reason.
            assert_eq!(map, Err(error));
            return;
        }
    };
    assert!(data.len() <= MAX_SERIALIZED_SIZE);
    assert!(pairs.len() <= MAX_PAIRS);
    let encoded = pairs::encode(&pairs);
    assert_eq!(pairs::encoded_len(&pairs), encoded.len());
    if pairs.is_empty() {
        // Zero bytes, a lone NUL and a zero count all mean "no pairs"; we always write zero bytes.
        assert!(
            matches!(data, [] | [0] | [0, 0, 0, 0]),
            "{data:?} decoded to no pairs"
        );
        assert!(encoded.is_empty());
    } else {
        // Every byte of an accepted map is accounted for, so there is exactly one way to write it.
        assert_eq!(encoded, data, "accepted a non-canonical map");
    }
    assert_eq!(pairs::decode(&encoded).as_deref(), Ok(&pairs[..]));

    let map = map.expect("HeaderMap::decode refused what pairs::decode accepted");
    assert_eq!(map.len(), pairs.len());
    for ((key, value), (map_key, map_value)) in pairs.iter().zip(map.iter()) {
        assert_eq!(map_key, key.to_ascii_lowercase().as_slice());
        assert_eq!(map_value, *value);
    }
    assert_eq!(map.encoded_len(), encoded.len());
    assert_eq!(HeaderMap::decode(&map.encode()).as_ref(), Ok(&map));
}

/// Pairs described by the input: short keys and values of any bytes (NULs included, since the
/// length table, not a terminator search, delimits them), sometimes more than the decoder allows.
fn encode_then_decode(u: &mut Unstructured<'_>) -> Result<()> {
    // A spent `Unstructured` answers zeros, so the rare shape (around the pair limit) is 0xff.
    // The size limit is not crossed here: a 1 MiB map per input made the target 100 times slower,
    // and the unit tests check that boundary.
    let shape: u8 = u.arbitrary()?;
    let count = if shape == 0xff {
        u.int_in_range(MAX_PAIRS - 2..=MAX_PAIRS + 2)?
    } else {
        u.int_in_range(0..=16)?
    };
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(count);
    for _ in 0..count {
        let key = take(u, 24)?.to_vec();
        let value = take(u, 48)?.to_vec();
        pairs.push((key, value));
    }
    check_round_trip(&pairs);
    Ok(())
}

/// Up to `max` bytes, fewer (even none) when the input runs out: a short input still gets checked.
fn take<'a>(u: &mut Unstructured<'a>, max: usize) -> Result<&'a [u8]> {
    let len = u.int_in_range(0..=max)?.min(u.len());
    u.bytes(len)
}

fn check_round_trip(pairs: &[(Vec<u8>, Vec<u8>)]) {
    let encoded = pairs::encode(pairs);
    assert_eq!(pairs::encoded_len(pairs), encoded.len());
    let decoded = pairs::decode(&encoded);
    if pairs.len() > MAX_PAIRS {
        assert_eq!(decoded, Err(PairsError::TooManyPairs(pairs.len() as u32)));
        return;
    }
    let decoded = decoded.expect("our own encoding decodes");
    assert_eq!(decoded.len(), pairs.len());
    for ((key, value), (decoded_key, decoded_value)) in pairs.iter().zip(&decoded) {
        assert_eq!(
            (key.as_slice(), value.as_slice()),
            (*decoded_key, *decoded_value)
        );
    }

    let map = HeaderMap::from_pairs(pairs.iter().map(|(k, v)| (k, v)));
    assert_eq!(map.encoded_len(), encoded.len());
    assert_eq!(HeaderMap::decode(&map.encode()).as_ref(), Ok(&map));
}
