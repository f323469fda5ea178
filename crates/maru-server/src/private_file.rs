//! Small files the server keeps beside its key index (its identity, the tokens of sessions
//! that may resume): written whole, mode 0600, through a temporary file renamed over the old
//! one, so a crash leaves the previous contents or the new ones, never a torn file.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Replaces `path` with `bytes` (the temporary file is `path` with extension `tmp_ext`);
/// `sync` also makes the contents durable before the rename.
pub(crate) fn replace(path: &Path, tmp_ext: &str, bytes: &[u8], sync: bool) -> std::io::Result<()> {
    let tmp = path.with_extension(tmp_ext);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    if sync {
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}
