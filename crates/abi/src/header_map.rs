use crate::pairs;

/// An ordered multimap of header (or trailer, or gRPC metadata) fields, as a stream holds them.
///
/// Keys are lower-cased on the way in, as Envoy does, so lookups ignore case. Values are bytes:
/// HTTP allows obs-text, and a guest may write anything; the embedder validates before it sends.
///
/// Every key and value lives in one buffer, so a copy (the gateway copies a map out of a plugin's
/// stream once per headers callback) is two allocations and a memcpy, not two per field.
#[derive(Default)]
pub struct HeaderMap {
    /// Keys and values back to back. A replaced value or a removed field leaves its bytes here
    /// until the map is next cloned.
    bytes: Vec<u8>,
    fields: Vec<Field>,
}

/// Where one field's key and value are in [`HeaderMap::bytes`].
#[derive(Debug, Clone, Copy)]
struct Field {
    key: usize,
    key_len: usize,
    value: usize,
    value_len: usize,
}

impl HeaderMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a map from pairs, lower-casing keys.
    pub fn from_pairs<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let mut map = Self::new();
        for (k, v) in pairs {
            map.add(k.as_ref(), v.as_ref());
        }
        map
    }

    /// Decodes a guest's serialized map.
    pub fn decode(bytes: &[u8]) -> Result<Self, pairs::PairsError> {
        let decoded = pairs::decode(bytes)?;
        let mut map = Self {
            bytes: Vec::with_capacity(bytes.len()),
            fields: Vec::with_capacity(decoded.len()),
        };
        for (key, value) in decoded {
            map.add(key, value);
        }
        Ok(map)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        pairs::encode_fields(self.len(), self.iter(), &mut out);
        out
    }

    pub fn encoded_len(&self) -> usize {
        if self.fields.is_empty() {
            return 0;
        }
        4 + self
            .fields
            .iter()
            .map(|f| 8 + f.key_len + f.value_len + 2)
            .sum::<usize>()
    }

    pub fn len(&self) -> usize {
        self.fields.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    fn key_of(&self, field: &Field) -> &[u8] {
        &self.bytes[field.key..field.key + field.key_len]
    }

    fn value_of(&self, field: &Field) -> &[u8] {
        &self.bytes[field.value..field.value + field.value_len]
    }

    /// The first value of `key`, as Envoy's `get_header_map_value` answers.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Option<&[u8]> {
        let key = key.as_ref();
        self.fields
            .iter()
            .find(|f| self.key_of(f).eq_ignore_ascii_case(key))
            .map(|f| self.value_of(f))
    }

    /// The first value of `key` as text, if it is UTF-8.
    pub fn get_str(&self, key: impl AsRef<[u8]>) -> Option<&str> {
        self.get(key).and_then(|v| std::str::from_utf8(v).ok())
    }

    pub fn get_all<'a>(&'a self, key: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.fields
            .iter()
            .filter(move |f| self.key_of(f).eq_ignore_ascii_case(key))
            .map(|f| self.value_of(f))
    }

    /// Appends `value` to the buffer; where it starts.
    fn push_bytes(&mut self, value: &[u8]) -> usize {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(value);
        start
    }

    /// Appends a field, keeping existing ones with the same name.
    pub fn add(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        let (key, value) = (key.as_ref(), value.as_ref());
        let key_start = self.bytes.len();
        self.bytes
            .extend(key.iter().map(|byte| byte.to_ascii_lowercase()));
        let value_start = self.push_bytes(value);
        self.fields.push(Field {
            key: key_start,
            key_len: key.len(),
            value: value_start,
            value_len: value.len(),
        });
    }

    /// Sets `key` to a single `value`: the first field keeps its place, later ones go.
    pub fn replace(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        let (key, value) = (key.as_ref(), value.as_ref());
        let Some(first) = self
            .fields
            .iter()
            .position(|f| self.key_of(f).eq_ignore_ascii_case(key))
        else {
            return self.add(key, value);
        };
        let old = self.fields[first];
        if value.len() <= old.value_len {
            self.bytes[old.value..old.value + value.len()].copy_from_slice(value);
        } else {
            self.fields[first].value = self.push_bytes(value);
        }
        self.fields[first].value_len = value.len();
        let bytes = &self.bytes;
        let named = |f: &Field| bytes[f.key..f.key + f.key_len].eq_ignore_ascii_case(key);
        // Repeated names are rare: look before rewriting the field list.
        if !self.fields[first + 1..].iter().any(named) {
            return;
        }
        let mut index = 0;
        self.fields.retain(|f| {
            let keep = index <= first || !named(f);
            index += 1;
            keep
        });
    }

    /// Removes every field named `key`.
    pub fn remove(&mut self, key: impl AsRef<[u8]>) {
        let key = key.as_ref();
        let bytes = &self.bytes;
        self.fields
            .retain(|f| !bytes[f.key..f.key + f.key_len].eq_ignore_ascii_case(key));
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&[u8], &[u8])> + Clone {
        self.fields
            .iter()
            .map(|f| (self.key_of(f), self.value_of(f)))
    }

    /// Fields as text pairs, for display and assertions; invalid UTF-8 is replaced.
    pub fn to_string_pairs(&self) -> Vec<(String, String)> {
        self.iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect()
    }
}

impl Clone for HeaderMap {
    fn clone(&self) -> Self {
        let live: usize = self.fields.iter().map(|f| f.key_len + f.value_len).sum();
        if live == self.bytes.len() {
            return Self {
                bytes: self.bytes.clone(),
                fields: self.fields.clone(),
            };
        }
        // Leave what replaced and removed fields left behind.
        let mut copy = Self {
            bytes: Vec::with_capacity(live),
            fields: Vec::with_capacity(self.fields.len()),
        };
        for (key, value) in self.iter() {
            let key_start = copy.push_bytes(key);
            let value_start = copy.push_bytes(value);
            copy.fields.push(Field {
                key: key_start,
                key_len: key.len(),
                value: value_start,
                value_len: value.len(),
            });
        }
        copy
    }
}

impl PartialEq for HeaderMap {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for HeaderMap {}

impl std::fmt::Debug for HeaderMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.iter().map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            }))
            .finish()
    }
}

impl<K: AsRef<[u8]>, V: AsRef<[u8]>> FromIterator<(K, V)> for HeaderMap {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Self::from_pairs(iter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_follow_envoy() {
        let mut map = HeaderMap::from_pairs([("A", "1"), ("b", "2"), ("a", "3")]);
        assert_eq!(map.get("a"), Some(&b"1"[..]));
        assert_eq!(map.get_all(b"A").count(), 2);
        map.replace("a", "9");
        assert_eq!(
            map.to_string_pairs(),
            vec![("a".into(), "9".into()), ("b".into(), "2".into())]
        );
        map.add("c", "x");
        map.remove("B");
        assert_eq!(map.len(), 2);
        map.replace("new", "v");
        assert_eq!(map.get_str("new"), Some("v"));
        let decoded = HeaderMap::decode(&map.encode()).unwrap();
        assert_eq!(decoded, map);
        assert_eq!(map.encoded_len(), map.encode().len());
    }

    #[test]
    fn replaced_and_removed_fields_leave_no_trace_in_copies() {
        let mut map = HeaderMap::from_pairs([("k", "short"), ("x", "1"), ("K", "dup")]);
        map.replace("k", "a much longer value than before");
        map.replace("x", "2");
        map.remove("nothing");
        let copy = map.clone();
        assert_eq!(copy, map);
        assert_eq!(
            copy.to_string_pairs(),
            vec![
                ("k".into(), "a much longer value than before".into()),
                ("x".into(), "2".into())
            ]
        );
        assert_eq!(copy.bytes.len(), "k".len() + 31 + "x".len() + 1);
        assert_eq!(copy.encode(), map.encode());
        assert_eq!(
            HeaderMap::decode(&copy.encode()).unwrap(),
            map,
            "equality is by fields, not by the buffer"
        );
        assert_ne!(copy, HeaderMap::from_pairs([("k", "x")]));
    }
}
