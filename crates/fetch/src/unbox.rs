//! Unwrapping gzip and tar around a module, as Istio's agent does for HTTP downloads: repeat until
//! the bytes start with the Wasm magic or nothing more can be unwrapped.

use std::io::Read;

/// `\0asm`: every Wasm module starts with it.
pub const WASM_MAGIC: &[u8; 4] = b"\0asm";

/// Whether `bytes` look like a Wasm binary: the magic and a version, at least 8 bytes (Istio's test).
pub fn is_wasm(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes.starts_with(WASM_MAGIC)
}

/// Unwraps gzip and POSIX tar (first regular file) layers until a Wasm module appears. Each layer is
/// capped at `max_size`. Returns the module, or an error saying what was found instead.
pub fn unbox(bytes: Vec<u8>, max_size: usize) -> Result<Vec<u8>, String> {
    let mut current = bytes;
    // Bounded: each round peels one layer, and nobody nests archives this deep on purpose.
    for _ in 0..8 {
        if is_wasm(&current) {
            return Ok(current);
        }
        current = if is_gzip(&current) {
            gunzip(&current, max_size)?
        } else if is_tar(&current) {
            first_tar_file(&current, max_size, |_| true)?
                .ok_or_else(|| "the tar archive holds no file".to_owned())?
        } else {
            return Err(describe_non_wasm(&current));
        };
    }
    Err("archives nested too deep to hold a module".into())
}

fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

fn is_tar(bytes: &[u8]) -> bool {
    bytes.len() >= 512 && &bytes[257..262] == b"ustar"
}

/// gunzip with a cap, so a gzip bomb stops at `max_size`.
pub fn gunzip(bytes: &[u8], max_size: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(max_size as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("cannot gunzip: {e}"))?;
    if out.len() > max_size {
        return Err(format!(
            "the gzip stream unpacks to more than the {max_size}-byte limit"
        ));
    }
    Ok(out)
}

/// The first regular file in a tar archive for which `wanted(path)` holds, capped at `max_size`.
pub fn first_tar_file(
    bytes: &[u8],
    max_size: usize,
    wanted: impl Fn(&std::path::Path) -> bool,
) -> Result<Option<Vec<u8>>, String> {
    let mut archive = tar::Archive::new(bytes);
    let entries = archive
        .entries()
        .map_err(|e| format!("cannot read the tar archive: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("cannot read the tar archive: {e}"))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry
            .path()
            .map_err(|e| format!("bad path in the tar archive: {e}"))?
            .into_owned();
        if !wanted(&path) {
            continue;
        }
        if entry.size() > max_size as u64 {
            return Err(format!(
                "{} in the tar archive is {} bytes, over the {max_size}-byte limit",
                path.display(),
                entry.size()
            ));
        }
        let mut out = Vec::with_capacity(entry.size() as usize);
        entry
            .read_to_end(&mut out)
            .map_err(|e| format!("cannot read {} from the tar archive: {e}", path.display()))?;
        return Ok(Some(out));
    }
    Ok(None)
}

/// A short description of what arrived instead of a module, for the error message.
pub fn describe_non_wasm(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "the body is empty, not a Wasm module".into();
    }
    if bytes.starts_with(WASM_MAGIC) {
        return format!(
            "the body is {} bytes: too short to be a Wasm module",
            bytes.len()
        );
    }
    let head: String = bytes
        .iter()
        .take(16)
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '.'
            }
        })
        .collect();
    format!("not a Wasm module (no \\0asm magic; the body starts with {head:?})")
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    const MODULE: &[u8] = b"\0asm\x01\0\0\0\0\x05\x04name";

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    fn tar_of(name: &str, bytes: &[u8]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_ustar();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, bytes).unwrap();
        builder.into_inner().unwrap()
    }

    #[test]
    fn unwraps_gzip_tar_and_both() {
        // A tar archive is at least 10 KiB of records, so the cap must leave room for it.
        let cap = 64 * 1024;
        assert_eq!(unbox(MODULE.to_vec(), cap).unwrap(), MODULE);
        assert_eq!(unbox(gzip(MODULE), cap).unwrap(), MODULE);
        assert_eq!(unbox(tar_of("plugin.wasm", MODULE), cap).unwrap(), MODULE);
        assert_eq!(
            unbox(gzip(&tar_of("x/plugin.wasm", MODULE)), cap).unwrap(),
            MODULE
        );
    }

    #[test]
    fn says_what_it_got_instead() {
        let error = unbox(b"<html>not found</html>".to_vec(), 1024).unwrap_err();
        assert!(
            error.contains("no \\0asm magic") && error.contains("<html>"),
            "{error}"
        );
        assert!(unbox(Vec::new(), 1024).unwrap_err().contains("empty"));
        assert!(
            unbox(b"\0asm".to_vec(), 1024)
                .unwrap_err()
                .contains("too short")
        );
        let error = unbox(gzip(b"plain text"), 1024).unwrap_err();
        assert!(error.contains("plain text"), "{error}");
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_cap() {
        let bomb = gzip(&vec![0u8; 1 << 20]);
        let error = unbox(bomb, 4096).unwrap_err();
        assert!(error.contains("4096-byte limit"), "{error}");
    }
}
