//! `shutdown()` from any thread: socketserver's `BaseServer.shutdown`, as a handle.
//!
//! The handle sets a flag and wakes the loop through its `Waker`; the loop sees the flag at the
//! end of its turn, stops accepting and returns from `serve_forever`, and only then does
//! `shutdown()` return. Called from the serving thread itself (a `service_actions` hook), it
//! only asks, since waiting there would wait for itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::ThreadId;

use mio::Waker;

/// What a handle and its server share.
#[derive(Debug)]
pub(crate) struct Control {
    waker: Arc<Waker>,
    requested: AtomicBool,
    /// The thread running `serve_forever`, if one is.
    serving: Mutex<Option<ThreadId>>,
    returned: Condvar,
}

impl Control {
    pub(crate) fn new(waker: Arc<Waker>) -> Arc<Control> {
        Arc::new(Control {
            waker,
            requested: AtomicBool::new(false),
            serving: Mutex::new(None),
            returned: Condvar::new(),
        })
    }

    /// Whether a shutdown was asked for and not yet acted on.
    pub(crate) fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// `serve_forever` starts on this thread.
    pub(crate) fn enter(&self) {
        if let Ok(mut s) = self.serving.lock() {
            *s = Some(std::thread::current().id());
        }
    }

    /// `serve_forever` has returned: the request is spent and waiting callers are released.
    pub(crate) fn leave(&self) {
        if let Ok(mut s) = self.serving.lock() {
            self.requested.store(false, Ordering::Release);
            *s = None;
        }
        self.returned.notify_all();
    }
}

/// Stops a server's `serve_forever` from any thread (socketserver's `shutdown()`).
///
/// Cheap to clone and `Send`: hand one to another thread, a signal-watching thread of your own,
/// or a test. `shutdown` returns once `serve_forever` has returned; if the server is not
/// serving, the next `serve_forever` returns at once.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    control: Arc<Control>,
}

impl ShutdownHandle {
    pub(crate) fn new(control: Arc<Control>) -> ShutdownHandle {
        ShutdownHandle { control }
    }

    /// Tell `serve_forever` to stop, and wait until it has returned.
    pub fn shutdown(&self) {
        let c = &self.control;
        let Ok(mut serving) = c.serving.lock() else {
            return;
        };
        c.requested.store(true, Ordering::Release);
        let _ = c.waker.wake();
        let me = std::thread::current().id();
        while serving.is_some_and(|t| t != me) {
            serving = match c.returned.wait(serving) {
                Ok(s) => s,
                Err(_) => return,
            };
        }
    }
}
