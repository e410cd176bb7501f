//! The stop state machine (socketserver's `shutdown()` + `server_close()`): Running ->
//! Draining -> Stopped. A stop closes every listener at once, lets in-flight work run until
//! `shutdown_timeout`, then shuts the open connections down and signals child processes
//! (SIGTERM, SIGKILL `KILL_GRACE` later), and gives up on handlers that still have not
//! returned `FORCE_GRACE` after that. A second stop signal, or SIGQUIT, is `stop_now`.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::Server;

/// After `shutdown_timeout` the loop shuts open connections down; handlers that still have not
/// returned this much later are abandoned and the process exits anyway.
const FORCE_GRACE: Duration = Duration::from_secs(1);

/// Child processes (forked workers, exec programs) still running at `shutdown_timeout` get
/// SIGTERM, and SIGKILL this much later; the process exits `FORCE_GRACE` after that at most.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// Where the loop is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    Running,
    Draining {
        deadline: Instant,
        forced: Option<Instant>,
    },
    Stopped,
}

impl Server {
    /// Stop accepting at once, then let in-flight work run on until `shutdown_timeout`.
    pub(super) fn begin_stop(&mut self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        let timeout = self.config.daemon.shutdown_timeout;
        let status = format!("stopping: {} connections in flight", self.in_flight());
        self.notify.stopping(&status);
        self.close_all();
        log::info!(
            "stopping: {} connections in flight, waiting up to {}",
            self.in_flight(),
            humantime::format_duration(timeout)
        );
        self.state = State::Draining {
            deadline: Instant::now() + timeout,
            forced: None,
        };
    }

    pub(super) fn stop_now(&mut self, why: &str) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        self.notify.stopping(&format!("stopping now: {why}"));
        self.close_all();
        let n = self.shared.tracker.shutdown_all();
        self.signal_children(nix::sys::signal::Signal::SIGKILL);
        log::warn!("{why}: stopping now, {n} open connections closed");
        self.state = State::Stopped;
    }

    fn close_all(&mut self) {
        self.keep_files_for_fd_store();
        self.again.clear();
        self.retry.clear();
        for slot in self.slots.values_mut() {
            drop(slot.close(self.poll.registry()));
        }
    }

    /// Send `sig` to every forked worker and exec program; returns how many there were.
    fn signal_children(&self, sig: nix::sys::signal::Signal) -> usize {
        let forked = self.shared.forks.as_ref().map_or(0, |f| f.in_flight());
        if let Some(f) = &self.shared.forks {
            f.signal_children(sig);
        }
        forked + crate::exec::signal_all(sig)
    }

    /// When a forced stop gives up: `FORCE_GRACE` after it began, or after the SIGKILL round
    /// when children had to be signalled.
    pub(super) fn children_deadline(&self, forced: Instant) -> Instant {
        match (self.kill_at, self.killed) {
            (Some(k), _) => k,
            (None, true) => forced + KILL_GRACE + FORCE_GRACE,
            (None, false) => forced + FORCE_GRACE,
        }
    }

    pub(super) fn check_stop(&mut self) {
        let State::Draining { deadline, forced } = self.state else {
            return;
        };
        let in_flight = self.in_flight();
        if in_flight == 0 {
            self.state = State::Stopped;
            return;
        }
        let now = Instant::now();
        match forced {
            None if now >= deadline => {
                let n = self.shared.tracker.shutdown_all();
                log::warn!("shutdown_timeout reached: closing {n} open connections");
                let children = self.signal_children(nix::sys::signal::Signal::SIGTERM);
                if children > 0 {
                    log::warn!(
                        "shutdown_timeout reached: SIGTERM sent to {children} child processes"
                    );
                    self.kill_at = Some(now + KILL_GRACE);
                }
                self.state = State::Draining {
                    deadline,
                    forced: Some(now),
                };
            }
            Some(_) if self.kill_at.is_some_and(|k| now >= k) => {
                self.kill_at = None;
                self.killed = true;
                let n = self.signal_children(nix::sys::signal::Signal::SIGKILL);
                log::warn!(
                    "{n} child processes still running {KILL_GRACE:?} after SIGTERM: SIGKILL sent"
                );
            }
            Some(f) if self.kill_at.is_none() && now >= self.children_deadline(f) => {
                log::warn!(
                    "{in_flight} handlers did not return after their connections closed; exiting"
                );
                self.state = State::Stopped;
            }
            _ => {}
        }
    }
}
