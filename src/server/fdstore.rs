//! `[daemon] fd_store = true`: every listening socket is kept in systemd's file-descriptor
//! store under its listener's name (`FDSTORE=1`, `FDNAME=`), so a `systemctl restart` starts
//! the new process with them (`LISTEN_FDS`, adopted by name like socket activation) and the
//! kernel queues connections meanwhile: nothing is refused. The store follows reloads: a new
//! listener's socket is added, a removed listener's dropped (`FDSTOREREMOVE=1`). At a stop the
//! unix socket files stay, since the stored sockets stay reachable through them.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;

use super::Server;

/// What is in the store: listener name -> the stored socket's inode.
pub(super) type Stored = BTreeMap<String, u64>;

fn inode(fd: std::os::fd::BorrowedFd<'_>) -> Option<u64> {
    let file = std::fs::File::from(fd.try_clone_to_owned().ok()?);
    file.metadata().ok().map(|m| m.ino())
}

/// How soon a store message the manager had no room for is sent again. Its notify socket
/// queues only a few datagrams (net.unix.max_dgram_qlen, 10 by default), and messages go with
/// MSG_DONTWAIT so the loop never waits on it: a burst of listeners is stored over a few turns.
const RETRY: std::time::Duration = std::time::Duration::from_millis(20);

impl Server {
    /// Bring the store in line with the open listeners (at start, after each reload, and on
    /// the retry timer while some are not stored yet).
    pub(super) fn sync_fd_store(&mut self) {
        self.fd_store_retry = None;
        if !self.config.daemon.fd_store || !self.notify.enabled() {
            return;
        }
        let open: Stored = self
            .slots
            .values()
            .filter_map(|s| {
                let l = s.listener.as_ref()?;
                Some((s.cfg.name.clone(), inode(std::os::fd::AsFd::as_fd(l))?))
            })
            .collect();
        if !self.fd_store_synced && crate::daemon::handover::from_pid().is_some() {
            // The new process of an upgrade: the old one stored these very sockets, and this
            // process may not notify the manager until it is named the main process.
            self.fd_stored = open;
            self.fd_store_synced = true;
            return;
        }
        let before = self.fd_stored.len();
        let gone: Vec<String> = self
            .fd_stored
            .iter()
            .filter(|(name, ino)| open.get(*name) != Some(ino))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            self.notify.remove_stored_fd(&name);
            self.fd_stored.remove(&name);
        }
        let mut changed = before != self.fd_stored.len();
        for slot in self.slots.values() {
            let (Some(l), Some(ino)) = (&slot.listener, open.get(&slot.cfg.name)) else {
                continue;
            };
            if self.fd_stored.contains_key(&slot.cfg.name) {
                continue;
            }
            match self
                .notify
                .store_fd(&slot.cfg.name, std::os::fd::AsFd::as_fd(l))
            {
                Ok(()) => {
                    self.fd_stored.insert(slot.cfg.name.clone(), *ino);
                    changed = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.fd_store_retry = Some(std::time::Instant::now() + RETRY);
                }
                Err(e) => log::warn!(
                    "listener `{}`: cannot put its socket in the service manager's fd store: {e}",
                    slot.cfg.name
                ),
            }
        }
        if self.fd_store_retry.is_none() && (changed || !self.fd_store_synced) {
            log::info!(
                "fd store: {} listening sockets kept by the service manager",
                self.fd_stored.len()
            );
        }
        self.fd_store_synced = true;
    }

    /// Store what the manager had no room for last time, when its time has come.
    pub(super) fn retry_fd_store(&mut self) {
        if self
            .fd_store_retry
            .is_some_and(|t| t <= std::time::Instant::now())
        {
            self.sync_fd_store();
        }
    }

    /// At a stop: leave unix socket files in place while the store holds their sockets.
    pub(super) fn keep_files_for_fd_store(&mut self) {
        if self.fd_stored.is_empty() {
            return;
        }
        for l in self.slots.values_mut().filter_map(|s| s.listener.as_mut()) {
            l.release_file();
        }
    }
}
