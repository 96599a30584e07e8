use crate::pairs;

/// An ordered multimap of header (or trailer, or gRPC metadata) fields, as a stream holds them.
///
/// Keys are lower-cased on the way in, as Envoy does, so lookups ignore case. Values are bytes:
/// HTTP allows obs-text, and a guest may write anything; the embedder validates before it sends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderMap {
    entries: Vec<(Vec<u8>, Vec<u8>)>,
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
        Ok(Self::from_pairs(pairs::decode(bytes)?))
    }

    pub fn encode(&self) -> Vec<u8> {
        pairs::encode(&self.entries)
    }

    pub fn encoded_len(&self) -> usize {
        pairs::encoded_len(&self.entries)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The first value of `key`, as Envoy's `get_header_map_value` answers.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Option<&[u8]> {
        let key = key.as_ref();
        self.entries
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_slice())
    }

    /// The first value of `key` as text, if it is UTF-8.
    pub fn get_str(&self, key: impl AsRef<[u8]>) -> Option<&str> {
        self.get(key).and_then(|v| std::str::from_utf8(v).ok())
    }

    pub fn get_all<'a>(&'a self, key: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.entries
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_slice())
    }

    /// Appends a field, keeping existing ones with the same name.
    pub fn add(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.entries
            .push((key.as_ref().to_ascii_lowercase(), value.as_ref().to_vec()));
    }

    /// Sets `key` to a single `value`: the first field keeps its place, later ones go.
    pub fn replace(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        let key = key.as_ref();
        match self
            .entries
            .iter()
            .position(|(k, _)| k.eq_ignore_ascii_case(key))
        {
            Some(first) => {
                self.entries[first].1 = value.as_ref().to_vec();
                let mut index = 0;
                self.entries.retain(|(k, _)| {
                    let keep = index <= first || !k.eq_ignore_ascii_case(key);
                    index += 1;
                    keep
                });
            }
            None => self.add(key, value),
        }
    }

    /// Removes every field named `key`.
    pub fn remove(&mut self, key: impl AsRef<[u8]>) {
        let key = key.as_ref();
        self.entries.retain(|(k, _)| !k.eq_ignore_ascii_case(key));
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.entries
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
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
}
