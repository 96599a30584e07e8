//! The module cache: content-addressed files (`modules/<sha256>.wasm`) with an index that maps URLs
//! and OCI digests to them and survives restarts (Istio's lives in memory only). Every write is
//! atomic (a temporary file renamed into place), every read is verified against the file's name,
//! and modules unused for a while are purged with their compiled artefacts, which the runtime keeps
//! beside them.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{FetchError, FetchErrorKind};

const INDEX_FILE: &str = "index.json";
const MODULES_DIR: &str = "modules";

/// A content-addressed module store under one folder.
pub struct Cache {
    root: PathBuf,
    /// Serialises index updates within the process; across processes each update re-reads the
    /// index first, so the CLI and a running gateway do not erase each other's entries.
    lock: Mutex<()>,
}

/// One cached module, as `plugin cache ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheEntry {
    pub sha256: String,
    pub size: u64,
    /// Seconds since the Unix epoch.
    pub fetched_at: u64,
    pub last_used: u64,
    /// The URLs this module was fetched from (OCI ones with their digest).
    pub urls: Vec<String>,
}

/// What a URL pointed to when it was last fetched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UrlEntry {
    /// The module's sha256.
    pub sha256: String,
    /// For OCI, the manifest digest (`sha256:...`) the URL resolved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    pub updated: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    #[serde(default)]
    modules: BTreeMap<String, CacheEntry>,
    #[serde(default)]
    urls: BTreeMap<String, UrlEntry>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Cache {
    /// Opens (creating) the cache under `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, FetchError> {
        let root = root.into();
        std::fs::create_dir_all(root.join(MODULES_DIR)).map_err(|e| io_error(&root, e))?;
        Ok(Self {
            root,
            lock: Mutex::new(()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where modules live, and where the runtime should keep compiled artefacts.
    pub fn modules_dir(&self) -> PathBuf {
        self.root.join(MODULES_DIR)
    }

    fn module_path(&self, sha256: &str) -> PathBuf {
        self.modules_dir().join(format!("{sha256}.wasm"))
    }

    fn read_index(&self) -> Index {
        let path = self.root.join(INDEX_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
                // A damaged index costs refetches, never a wrong module: files are verified.
                tracing::warn!(
                    "ignoring the damaged cache index {}: {error}",
                    path.display()
                );
                Index::default()
            }),
            Err(_) => Index::default(),
        }
    }

    fn write_index(&self, index: &Index) -> Result<(), FetchError> {
        let bytes = serde_json::to_vec_pretty(index).unwrap_or_default();
        atomic_write(&self.root, &self.root.join(INDEX_FILE), &bytes)
    }

    fn update<R>(&self, change: impl FnOnce(&mut Index) -> R) -> Result<R, FetchError> {
        let _guard = self.lock.lock();
        let mut index = self.read_index();
        let result = change(&mut index);
        self.write_index(&index)?;
        Ok(result)
    }

    /// The module with this sha256, if cached and intact. A file whose content no longer matches
    /// its name is removed.
    pub fn get(&self, sha256: &str) -> Option<Vec<u8>> {
        let sha256 = sha256.to_ascii_lowercase();
        let path = self.module_path(&sha256);
        let bytes = std::fs::read(&path).ok()?;
        if sha256_hex(&bytes) != sha256 {
            tracing::warn!("removing the corrupt cached module {}", path.display());
            let _ = std::fs::remove_file(&path);
            return None;
        }
        let _ = self.update(|index| {
            if let Some(entry) = index.modules.get_mut(&sha256) {
                entry.last_used = now();
            }
        });
        Some(bytes)
    }

    /// What `url` pointed to last time.
    pub fn url(&self, url: &str) -> Option<UrlEntry> {
        self.read_index().urls.get(url).cloned()
    }

    /// Stores a module, recording that each of `urls` points to it (with the OCI `digest`).
    /// Returns its sha256 and path.
    pub fn insert(
        &self,
        bytes: &[u8],
        urls: &[&str],
        digest: Option<&str>,
    ) -> Result<(String, PathBuf), FetchError> {
        let sha256 = sha256_hex(bytes);
        let path = self.module_path(&sha256);
        let intact = std::fs::read(&path).is_ok_and(|existing| sha256_hex(&existing) == sha256);
        if !intact {
            atomic_write(&self.modules_dir(), &path, bytes)?;
        }
        let time = now();
        self.update(|index| {
            let entry = index
                .modules
                .entry(sha256.clone())
                .or_insert_with(|| CacheEntry {
                    sha256: sha256.clone(),
                    size: bytes.len() as u64,
                    fetched_at: time,
                    last_used: time,
                    urls: Vec::new(),
                });
            entry.last_used = time;
            for url in urls {
                if !entry.urls.iter().any(|u| u == url) {
                    entry.urls.push((*url).to_owned());
                }
                index.urls.insert(
                    (*url).to_owned(),
                    UrlEntry {
                        sha256: sha256.clone(),
                        digest: digest.map(str::to_owned),
                        updated: time,
                    },
                );
            }
        })?;
        Ok((sha256, path))
    }

    /// Every cached module, most recently used first.
    pub fn entries(&self) -> Vec<CacheEntry> {
        let index = self.read_index();
        let mut entries: Vec<CacheEntry> = index
            .modules
            .into_values()
            .filter(|e| self.module_path(&e.sha256).exists())
            .collect();
        entries.sort_by_key(|e| std::cmp::Reverse(e.last_used));
        entries
    }

    pub fn len(&self) -> usize {
        self.entries().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes modules unused for longer than `unused_for` (all of them with `Duration::ZERO`), with
    /// their compiled artefacts and the URLs that pointed to them. Returns what was removed.
    pub fn prune(&self, unused_for: Duration) -> Result<Vec<CacheEntry>, FetchError> {
        self.prune_keeping(unused_for, &[])
    }

    /// As [`Self::prune`], but the modules in `in_use` (sha256s: what a running gateway serves) are
    /// kept whatever their age, and marked used now. A module serves from memory for as long as
    /// the configuration keeps it, without reading the cache again; its `last_used` alone would
    /// let it expire, and the next start would need the network.
    pub fn prune_keeping(
        &self,
        unused_for: Duration,
        in_use: &[String],
    ) -> Result<Vec<CacheEntry>, FetchError> {
        let time = now();
        let cutoff = time.saturating_sub(unused_for.as_secs());
        let removed = self.update(|index| {
            for sha256 in in_use {
                if let Some(entry) = index.modules.get_mut(&sha256.to_ascii_lowercase()) {
                    entry.last_used = time;
                }
            }
            let expired: Vec<String> = index
                .modules
                .values()
                .filter(|e| !in_use.iter().any(|u| u.eq_ignore_ascii_case(&e.sha256)))
                .filter(|e| unused_for.is_zero() || e.last_used < cutoff)
                .map(|e| e.sha256.clone())
                .collect();
            let removed: Vec<CacheEntry> = expired
                .iter()
                .filter_map(|sha| index.modules.remove(sha))
                .collect();
            index.urls.retain(|_, u| !expired.contains(&u.sha256));
            removed
        })?;
        for entry in &removed {
            let _ = std::fs::remove_file(self.module_path(&entry.sha256));
            self.remove_compiled(&entry.sha256);
        }
        Ok(removed)
    }

    /// The runtime names compiled artefacts `<sha256>-<engine key>.cwasm`.
    fn remove_compiled(&self, sha256: &str) {
        let Ok(dir) = std::fs::read_dir(self.modules_dir()) else {
            return;
        };
        let prefix = format!("{sha256}-");
        for file in dir.flatten() {
            let name = file.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&prefix) && name.ends_with(".cwasm") {
                let _ = std::fs::remove_file(file.path());
            }
        }
    }
}

fn io_error(path: &Path, error: std::io::Error) -> FetchError {
    FetchError::new(
        path.display().to_string(),
        FetchErrorKind::Io,
        format!("module cache: {error}"),
    )
}

/// Writes through a temporary file in the same folder and renames it into place, so a reader sees
/// the old file or the whole new one, never a part.
fn atomic_write(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), FetchError> {
    let mut file = tempfile::NamedTempFile::new_in(dir).map_err(|e| io_error(dir, e))?;
    file.write_all(bytes).map_err(|e| io_error(path, e))?;
    file.as_file().sync_all().map_err(|e| io_error(path, e))?;
    file.persist(path).map_err(|e| io_error(path, e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &[u8] = b"\0asm\x01\0\0\0A";
    const B: &[u8] = b"\0asm\x01\0\0\0B";

    #[test]
    fn survives_reopening_and_verifies_files() {
        let dir = tempfile::tempdir().unwrap();
        let (sha, path) = {
            let cache = Cache::open(dir.path()).unwrap();
            cache.insert(A, &["http://x/a.wasm"], None).unwrap()
        };
        assert_eq!(path, dir.path().join("modules").join(format!("{sha}.wasm")));
        let cache = Cache::open(dir.path()).unwrap();
        assert_eq!(cache.url("http://x/a.wasm").unwrap().sha256, sha);
        assert_eq!(cache.get(&sha).unwrap(), A);
        assert_eq!(cache.entries()[0].urls, vec!["http://x/a.wasm"]);
        // Tampering is caught on read and the file goes.
        std::fs::write(&path, B).unwrap();
        assert!(cache.get(&sha).is_none());
        assert!(!path.exists());
    }

    #[test]
    fn prune_removes_modules_their_urls_and_compiled_artefacts() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let (a, _) = cache
            .insert(A, &["oci://r/a@sha256:1"], Some("sha256:1"))
            .unwrap();
        let (b, _) = cache.insert(B, &["http://x/b.wasm"], None).unwrap();
        let compiled = cache.modules_dir().join(format!("{a}-engine.cwasm"));
        std::fs::write(&compiled, b"x").unwrap();
        assert_eq!(cache.len(), 2);
        assert!(cache.prune(Duration::from_secs(3600)).unwrap().is_empty());
        let removed = cache.prune(Duration::ZERO).unwrap();
        assert_eq!(removed.len(), 2);
        assert!(!compiled.exists());
        assert!(cache.url("oci://r/a@sha256:1").is_none());
        assert!(cache.get(&b).is_none());
        assert!(cache.is_empty());
    }

    #[test]
    fn modules_in_use_survive_a_prune_and_count_as_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let (a, _) = cache.insert(A, &["http://x/a.wasm"], None).unwrap();
        let (b, _) = cache.insert(B, &["http://x/b.wasm"], None).unwrap();
        // Both last used long ago, as a module that serves from memory for days would be.
        cache
            .update(|index| {
                for entry in index.modules.values_mut() {
                    entry.last_used = 1;
                }
            })
            .unwrap();
        let removed = cache
            .prune_keeping(Duration::from_secs(3600), std::slice::from_ref(&a))
            .unwrap();
        assert_eq!(removed.iter().map(|e| &e.sha256).collect::<Vec<_>>(), [&b]);
        assert_eq!(cache.url("http://x/a.wasm").unwrap().sha256, a);
        let kept = &cache.entries()[0];
        assert!(kept.last_used > 1, "the prune marked the module used");
        // So a prune that no longer knows it is in use (the CLI's) keeps it too, until it expires.
        assert!(cache.prune(Duration::from_secs(3600)).unwrap().is_empty());
        // Even an expiry of zero keeps what serves.
        assert_eq!(
            cache
                .prune_keeping(Duration::ZERO, std::slice::from_ref(&a))
                .unwrap()
                .len(),
            0
        );
    }

    #[test]
    fn a_damaged_index_costs_entries_not_correctness() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let (sha, _) = cache.insert(A, &["u"], None).unwrap();
        std::fs::write(dir.path().join("index.json"), b"{not json").unwrap();
        assert!(cache.url("u").is_none());
        assert_eq!(
            cache.get(&sha).unwrap(),
            A,
            "content-addressed files still serve"
        );
        cache.insert(B, &["v"], None).unwrap();
        assert!(cache.url("v").is_some());
    }
}
