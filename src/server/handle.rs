//! `shutdown()` from any thread: socketserver's `BaseServer.shutdown`, as a handle.
//!
//! The handle sets a flag and wakes the loop through its `Waker`; the loop sees the flag at the
//! end of its turn, stops accepting and returns from `serve_forever`, and only then does
//! `shutdown()` return. Called from the serving thread itself (a `service_actions` hook), it
//! only asks, since waiting there would wait for itself.
//!
//! The handle also carries the other things one can ask of a running server: stop at once
//! (`shutdown_now`), re-read the config file (`reload`), and, for the daemon, log a status
//! report and start a binary upgrade. The daemon's signals are turned into exactly these
//! calls (`Server::on_signals`), so a signal and a handle take one path through the loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::ThreadId;

use mio::Waker;

/// What a handle and its server share.
#[derive(Debug)]
pub(crate) struct Control {
    waker: Arc<Waker>,
    requested: AtomicBool,
    /// Other asks, taken by the loop on its next turn.
    asks: Mutex<Asks>,
    /// The thread running `serve_forever`, if one is.
    serving: Mutex<Option<ThreadId>>,
    returned: Condvar,
}

impl Control {
    pub(crate) fn new(waker: Arc<Waker>) -> Arc<Control> {
        Arc::new(Control {
            waker,
            requested: AtomicBool::new(false),
            asks: Mutex::new(Asks::default()),
            serving: Mutex::new(None),
            returned: Condvar::new(),
        })
    }

    /// Whether a shutdown was asked for and not yet acted on.
    pub(crate) fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Take what was asked since the last turn (the graceful shutdown stays in `requested`).
    pub(crate) fn take_asks(&self) -> Asks {
        self.asks
            .lock()
            .map(|mut a| std::mem::take(&mut *a))
            .unwrap_or_default()
    }

    fn ask(&self, add: impl FnOnce(&mut Asks)) {
        if let Ok(mut a) = self.asks.lock() {
            add(&mut a);
        }
        let _ = self.waker.wake();
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

/// What a handle asked of the loop besides a graceful shutdown.
#[derive(Debug, Default)]
pub(crate) struct Asks {
    /// Stop at once, with the reason to log.
    pub(crate) stop_now: Option<&'static str>,
    pub(crate) reload: bool,
    pub(crate) status: bool,
    pub(crate) upgrade: bool,
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
        self.wait_returned(true);
    }

    /// Whether a graceful `shutdown` has been asked for and `serve_forever` has not yet acted
    /// on it.
    pub fn shutdown_requested(&self) -> bool {
        self.control.requested()
    }

    /// Stop at once: close the listeners, shut down every open connection and kill worker
    /// processes, without waiting for in-flight work (what a second SIGTERM does to the
    /// daemon). Returns once `serve_forever` has returned, like `shutdown`; after it,
    /// `server_close` has nothing left to wait for.
    pub fn shutdown_now(&self) {
        self.ask_stop_now("shutdown_now");
    }

    /// `shutdown_now`, logging `why` as the reason.
    pub(crate) fn ask_stop_now(&self, why: &'static str) {
        self.control.ask(|a| a.stop_now = Some(why));
        self.wait_returned(false);
    }

    /// Ask the server to re-read its config file and apply it, as SIGHUP does to the daemon: a
    /// file with errors is refused and the running config keeps serving. Returns at once; the
    /// loop applies it on its next turn. A server made without a config file (`TcpServer`, …)
    /// logs that it has nothing to reload.
    pub fn reload(&self) {
        self.control.ask(|a| a.reload = true);
    }

    /// Ask the loop to log a status report (the daemon's SIGUSR1).
    pub(crate) fn log_status(&self) {
        self.control.ask(|a| a.status = true);
    }

    /// Ask the daemon to start a binary upgrade (its SIGUSR2).
    pub(crate) fn upgrade(&self) {
        self.control.ask(|a| a.upgrade = true);
    }

    /// Wake the loop (asking for a graceful shutdown first if `graceful`), and unless called
    /// from the serving thread itself, wait until `serve_forever` has returned.
    fn wait_returned(&self, graceful: bool) {
        let c = &self.control;
        let Ok(mut serving) = c.serving.lock() else {
            return;
        };
        if graceful {
            c.requested.store(true, Ordering::Release);
        }
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
