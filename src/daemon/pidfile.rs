//! The pidfile: created and `flock`ed before anything is bound, so a second instance is refused
//! with the first one's pid instead of failing later on "address in use"; the pid is written
//! once the final process (after detaching) is known; the file is removed on exit.
//!
//! The lock lives on the open file description, which survives `fork`, so the detached daemon
//! keeps holding it after the starting process exits.
//!
//! A binary upgrade moves the pidfile without a gap: the new process writes and locks a new
//! file beside it (`replace`) and, once serving, renames it over the old one (`commit`). The
//! path names a locked file holding a live pid at every moment, so a second instance is
//! refused throughout; the old process then sees the path is no longer its file and leaves it.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// A locked pidfile; removed when dropped by the process that wrote it.
#[derive(Debug)]
pub struct Pidfile {
    file: Flock<File>,
    path: PathBuf,
    /// Only the process whose pid is in the file removes it (not a parent that forked).
    owner: Option<u32>,
    /// `replace`: the new file, not yet renamed over `path`.
    pending: Option<PathBuf>,
}

impl Pidfile {
    /// Open (creating) and lock `path`, or say which process holds it.
    pub fn lock(path: &Path) -> Result<Pidfile, String> {
        // The previous owner removes the file while still holding its lock, so a lock won on
        // a file that was unlinked meanwhile protects nothing: then open the path again.
        for _ in 0..8 {
            if let Some(pidfile) = Pidfile::try_lock(path)? {
                return Ok(pidfile);
            }
        }
        Err(format!(
            "cannot lock the pidfile {}: it keeps being replaced",
            path.display()
        ))
    }

    /// One attempt: `None` when the locked file is no longer the one at `path`.
    fn try_lock(path: &Path) -> Result<Option<Pidfile>, String> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| format!("cannot open the pidfile {}: {e}", path.display()))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(file) if !same_file(&file, path) => Ok(None),
            Ok(file) => Ok(Some(Pidfile {
                file,
                path: path.to_path_buf(),
                owner: Some(std::process::id()), // until a detach hands it to the daemon
                pending: None,
            })),
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let pid = text.trim();
                let who = if pid.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {pid})")
                };
                Err(format!(
                    "another socketd{who} is running with the pidfile {}; stop it first, or give \
                     this instance another pidfile",
                    path.display()
                ))
            }
            Err((_, e)) => Err(format!("cannot lock the pidfile {}: {e}", path.display())),
        }
    }

    /// For the new process of an upgrade from pid `from`: a locked file beside `path`, to be
    /// renamed over it by `commit` once this process serves. Refused when `path` is locked by
    /// a process other than `from`.
    pub fn replace(path: &Path, from: u32) -> Result<Pidfile, String> {
        if let Ok(mut current) = File::open(path) {
            let mut text = String::new();
            let _ = current.read_to_string(&mut text);
            let holder = text.trim().parse::<u32>().ok();
            let locked = matches!(
                Flock::lock(current, FlockArg::LockSharedNonblock),
                Err((_, nix::errno::Errno::EWOULDBLOCK))
            );
            if locked && holder != Some(from) {
                let who = holder.map_or_else(String::new, |p| format!(" (pid {p})"));
                return Err(format!(
                    "another socketd{who} holds the pidfile {}, not the process upgrading                      (pid {from})",
                    path.display()
                ));
            }
        }
        let name = path.file_name().map_or_else(
            || "socketd.pid".into(),
            |n| n.to_string_lossy().into_owned(),
        );
        let temp = path.with_file_name(format!(".{name}.{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC)
            .open(&temp)
            .map_err(|e| format!("cannot create {}: {e}", temp.display()))?;
        let file = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| format!("cannot lock {}: {e}", temp.display()))?;
        Ok(Pidfile {
            file,
            path: path.to_path_buf(),
            owner: Some(std::process::id()),
            pending: Some(temp),
        })
    }

    /// Move a `replace`d pidfile into place (rename: atomic). No-op for a `lock`ed one.
    pub fn commit(&mut self) -> io::Result<()> {
        if let Some(temp) = self.pending.take() {
            if let Err(e) = std::fs::rename(&temp, &self.path) {
                self.pending = Some(temp);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Write this process's pid (after detaching: the daemon's own pid).
    pub fn write_pid(&mut self) -> io::Result<()> {
        let pid = std::process::id();
        self.file.set_len(0)?;
        self.file.rewind()?;
        self.file.write_all(format!("{pid}\n").as_bytes())?;
        self.owner = Some(pid);
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Whether the open file is still the one at `path` (same device and inode).
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        if self.owner != Some(std::process::id()) {
            return;
        }
        if let Some(temp) = self.pending.take() {
            // Never moved into place (an upgrade that did not take over).
            let _ = std::fs::remove_file(temp);
            return;
        }
        if !same_file(&self.file, &self.path) {
            // Another process (the new one of an upgrade) has its own pidfile there now.
            return;
        }
        // Removing needs write access to the directory, which a daemon that dropped root may
        // have lost (e.g. /run); then empty the file so no stale pid is left behind.
        if let Err(e) = std::fs::remove_file(&self.path) {
            let _ = self.file.set_len(0);
            log::warn!(
                "cannot remove the pidfile {}: {e} (emptied it instead)",
                self.path.display()
            );
        }
    }
}

#[cfg(test)]
mod replaced_file_tests {
    use super::*;

    #[test]
    fn a_lock_on_a_replaced_file_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socketd.pid");
        let old = File::create(&path).unwrap();
        assert!(same_file(&old, &path));
        std::fs::remove_file(&path).unwrap();
        assert!(!same_file(&old, &path), "the path is gone");
        File::create(&path).unwrap();
        assert!(!same_file(&old, &path), "the path is another file now");
        let locked = Pidfile::lock(&path).unwrap();
        assert!(same_file(&locked.file, &path));
    }
}
