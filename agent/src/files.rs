//! Files the agent keeps on the host across restarts (the cost catalog,
//! the launch-site book): written so that a reader, or a crash, finds the
//! old file or the new one, never half of one.
use std::io::Write as _;
use std::path::Path;

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// folder, synced, then renamed over the old one. The temporary file is
/// removed when any step fails.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temporary = path.with_extension(format!("tmp.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&temporary);
    })
}

/// The text of `path`, or `None` when there is no such file (a kept file
/// that was never written yet).
pub fn read_if_present(path: &Path) -> std::io::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

/// Moves an unreadable kept file aside to `<path>.bad`, so that the agent
/// starts empty without overwriting what someone may want to look at,
/// and says so. `what` names the file in the log.
pub fn move_aside(path: &Path, what: &str, error: &dyn std::fmt::Display) {
    let aside = path.with_extension("bad");
    let moved = std::fs::rename(path, &aside).is_ok();
    tracing::warn!(error = %error, moved_to = %aside.display(), moved, "{what} unreadable; starting empty");
}
