//! Job accounting, shared by every layer that starts, tracks or cuts work: how a job ended
//! (`Outcome`), its report to the loop (`Done` through a `Notifier`), and the `Tracker` of open
//! connections' descriptors that timeouts and a stop shut down. Ground: imports nothing of
//! socketd's.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use mio::Waker;

/// How a finished job ended, for the access log and the counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Error(String),
    Panic(String),
}

/// A job's report back to the loop.
#[derive(Debug)]
pub struct Done {
    /// The listener slot id the job was dispatched from (ids are never reused).
    pub listener: usize,
    pub outcome: Outcome,
}

/// How a worker tells the loop that a job ended.
#[derive(Debug, Clone)]
pub struct Notifier {
    tx: Sender<Done>,
    waker: Arc<Waker>,
}

impl Notifier {
    pub fn new(tx: Sender<Done>, waker: Arc<Waker>) -> Notifier {
        Notifier { tx, waker }
    }

    /// Report a finished job without waking the loop: it is collected on the loop's next
    /// turn. For callers that wake the loop themselves when it must look sooner.
    pub fn done_quiet(&self, done: Done) {
        let _ = self.tx.send(done);
    }

    /// Wake the loop without a report (a TLS handshake came back; timers to recompute).
    pub fn wake(&self) {
        let _ = self.waker.wake();
    }

    /// Report a finished job; the loop may already be gone at exit, which is fine.
    pub fn done(&self, done: Done) {
        if self.tx.send(done).is_ok() {
            let _ = self.waker.wake();
        }
    }
}

/// Open connections' fds, so a stop that reaches its deadline can shut them down and unblock
/// their handlers. A worker removes its entry before closing the fd, under the same lock, so
/// the loop never touches a number the kernel may have handed to someone else.
#[derive(Debug, Default)]
pub struct Tracker {
    open: Mutex<HashMap<u64, RawFd>>,
}

impl Tracker {
    pub fn insert(&self, id: u64, fd: RawFd) {
        if let Ok(mut m) = self.open.lock() {
            m.insert(id, fd);
        }
    }

    pub fn remove(&self, id: u64) {
        if let Ok(mut m) = self.open.lock() {
            m.remove(&id);
        }
    }

    pub fn len(&self) -> usize {
        self.open.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether connection `id` is still open (its job has not ended).
    pub fn contains(&self, id: u64) -> bool {
        self.open
            .lock()
            .map(|m| m.contains_key(&id))
            .unwrap_or(false)
    }

    /// Shut down one connection both ways (a limit ran out); false if it already ended.
    pub fn shutdown(&self, id: u64) -> bool {
        let Ok(m) = self.open.lock() else {
            return false;
        };
        match m.get(&id) {
            Some(fd) => {
                let _ = nix::sys::socket::shutdown(*fd, nix::sys::socket::Shutdown::Both);
                true
            }
            None => false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Shut down every open connection (both directions): blocked reads see EOF, writes fail.
    pub fn shutdown_all(&self) -> usize {
        let Ok(m) = self.open.lock() else { return 0 };
        for fd in m.values() {
            let _ = nix::sys::socket::shutdown(*fd, nix::sys::socket::Shutdown::Both);
        }
        m.len()
    }
}
