//! The pidfile: created and `flock`ed before anything is bound, so a second instance is refused
//! with the first one's pid instead of failing later on "address in use"; the pid is written
//! once the final process (after detaching) is known; the file is removed on exit.
//!
//! The lock lives on the open file description, which survives `fork`, so the detached daemon
//! keeps holding it after the starting process exits.
//!
//! A binary upgrade passes the pidfile on without a gap: the old process hands its open, locked
//! descriptor to the new one (`upgrade::share_pidfile`), so both hold the one lock (it belongs
//! to the open file description) and it never lapses; the new process writes its pid into the
//! same file in one write once it serves (`adopt`, `commit`). No directory write is needed, so
//! a daemon that dropped root can still do it in /run. A process removes the file on exit only
//! while it holds its own pid, so the old one leaves the new one's file alone.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use std::mem::ManuallyDrop;

use nix::fcntl::{Flock, FlockArg};

/// A locked pidfile; removed when dropped by the process that wrote it.
#[derive(Debug)]
pub struct Pidfile {
    /// Unlocked only when this process removes the file: the lock may be shared with the
    /// other process of an upgrade (one open file description), and `LOCK_UN` would release
    /// it for both. Otherwise the descriptor just closes when the process exits.
    file: ManuallyDrop<Flock<File>>,
    path: PathBuf,
    /// Only the process whose pid is in the file removes it (not a parent that forked).
    owner: Option<u32>,
    /// `adopt`: the pid is written by `commit` (when this process serves), not `write_pid`.
    deferred: bool,
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
                file: ManuallyDrop::new(file),
                path: path.to_path_buf(),
                owner: Some(std::process::id()), // until a detach hands it to the daemon
                deferred: false,
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

    /// For the new process of an upgrade: the old process's pidfile descriptor (already
    /// locked: the lock is shared with it), if it is the file at `path`. The pid goes in by
    /// `commit`, once this process serves.
    pub fn adopt(fd: std::os::fd::OwnedFd, path: &Path) -> Option<Pidfile> {
        let file = File::from(fd);
        if !same_file(&file, path) {
            return None;
        }
        // flock on the open file description that already holds the lock keeps it.
        let file = Flock::lock(file, FlockArg::LockExclusiveNonblock).ok()?;
        Some(Pidfile {
            file: ManuallyDrop::new(file),
            path: path.to_path_buf(),
            owner: None,
            deferred: true,
        })
    }

    /// An `adopt`ed pidfile gets this process's pid: one write over the old pid, padded so
    /// that a reader at any moment sees one whole pid. No-op for a `lock`ed one.
    pub fn commit(&mut self) -> io::Result<()> {
        if !std::mem::take(&mut self.deferred) {
            return Ok(());
        }
        use std::os::unix::fs::FileExt;
        let old_len = self.file.metadata()?.len() as usize;
        let mut text = format!("{}\n", std::process::id());
        while text.len() < old_len {
            text.push(' ');
        }
        self.file.write_all_at(text.as_bytes(), 0)?;
        self.owner = Some(std::process::id());
        let pid_len = text.trim_end_matches(' ').len() as u64;
        self.file.set_len(pid_len)
    }

    /// Write this process's pid (after detaching: the daemon's own pid).
    pub fn write_pid(&mut self) -> io::Result<()> {
        if self.deferred {
            return Ok(());
        }
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

impl Pidfile {
    /// Whether the file still names this process (the new process of an upgrade rewrites it).
    fn holds_own_pid(&mut self) -> bool {
        let mut text = String::new();
        let read = self
            .file
            .rewind()
            .and_then(|()| self.file.read_to_string(&mut text));
        let text = text.trim();
        read.is_err() || text.is_empty() || text.parse::<u32>().ok() == Some(std::process::id())
    }

    /// The open descriptor, for an upgrade to hand over.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        let file: &File = &self.file;
        std::os::fd::AsFd::as_fd(file)
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
        if !self.holds_own_pid() {
            // The new process of an upgrade has written its pid here.
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
        // SAFETY: dropped once, here, and `self.file` is not used after.
        unsafe { ManuallyDrop::drop(&mut self.file) };
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
