//! The fork server's books on the programs its children became (`exec::direct`): their
//! `stderr = "log"` pipes and their exits.
//!
//! The fork server stays single-threaded, so nothing here blocks: each pipe's read end is
//! non-blocking and watched by the fork server's `poll` next to its socket and signalfd; lines
//! are logged as `listener `name` pid N: text`, cut at `MAX_LINE` bytes so a program cannot make
//! the fork server buffer without limit, and each pass reads a bounded amount per pipe so a
//! chatty program cannot starve the others. When a program is reaped, what it left in its pipe is
//! logged first, then its exit status (`exec::log_exit`) and, for a connection, the access line
//! (bytes from the kernel's TCP counters of the fork server's copy of the connection, kept until
//! then; it also tells whether the client had left before the program ended). A pipe a descendant still holds open is read
//! for `DRAIN_WAIT` more, then closed.
//!
//! `max_duration` reaches the program too: the main loop shuts its connection down at the
//! deadline, which ends any program that uses its socket; one that is still running
//! `CUT_GRACE` later gets SIGTERM (its whole process group), and SIGKILL `CUT_GRACE` after that.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use super::wire::Ending;
use crate::conn::{Conn, PeerAddr};

/// The longest stderr line logged in one piece.
pub const MAX_LINE: usize = 4096;

/// How long a reaped program's stderr pipe stays watched when something else still holds it.
const DRAIN_WAIT: Duration = Duration::from_millis(500);

/// Reads per pipe per pass of the poll loop.
const READS_PER_PASS: usize = 16;

pub use crate::exec::CUT_GRACE;
use crate::exec::{idle_check, IdleCheck};

/// A program started for a job.
#[derive(Debug)]
pub(super) struct Started {
    pub listener: Arc<str>,
    /// `argv[0]`, for the log.
    pub name: Arc<str>,
    /// For a connection: the peer and (when access lines are logged) the fork server's copy of
    /// the connection, for its byte counters.
    pub conn: Option<(PeerAddr, Option<Conn>)>,
    pub at: Instant,
    /// When to signal the program if it is still running, and with what (`max_duration`).
    pub kill_at: Option<(Instant, Signal)>,
    /// `idle_timeout` and when to look at the connection's counters next (TCP only; needs
    /// the fork server's copy of the connection).
    pub idle: Option<(Duration, Instant)>,
    /// Which limit `kill_at` enforces, for the log.
    pub reason: &'static str,
    /// The TLS session in front of the connection, for its access line.
    pub tls: Option<crate::tls::TlsInfo>,
}

impl Started {
    /// The program does its connection's I/O, so idleness is read from the kernel's TCP
    /// counters: past `idle_timeout` the connection is shut down and the program given
    /// `CUT_GRACE` before SIGTERM, as after `max_duration`.
    fn check_idle(&mut self, pid: i32, now: Instant) {
        let Some((limit, at)) = self.idle else { return };
        if at > now {
            return;
        }
        let Some(conn) = self.conn.as_ref().and_then(|(_, c)| c.as_ref()) else {
            self.idle = None;
            return;
        };
        match idle_check(conn, limit, &self.listener, &self.name, pid) {
            IdleCheck::Cut => {
                let grace = now + CUT_GRACE;
                if self.kill_at.is_none_or(|(t, _)| grace < t) {
                    self.kill_at = Some((grace, Signal::SIGTERM));
                    self.reason = "idle_timeout";
                }
                self.idle = None;
            }
            IdleCheck::Again(after) => self.idle = Some((limit, now + after)),
            IdleCheck::Unknown => self.idle = None,
        }
    }
}

#[derive(Debug)]
struct Pipe {
    fd: OwnedFd,
    listener: Arc<str>,
    pid: i32,
    buf: Vec<u8>,
    /// Set once the program is reaped: stop reading then.
    until: Option<Instant>,
    /// Lines a second this program may log (`exec::output::LineCap`).
    cap: crate::exec::output::LineCap,
}

/// Programs running now and the stderr pipes still open.
#[derive(Debug)]
pub(super) struct Programs {
    running: HashMap<i32, Started>,
    pipes: Vec<Pipe>,
    null: OwnedFd,
    /// An epoll set of the pipes, readable when one is: the fork server waits on it with its
    /// other descriptors (a pipe leaves it when closed; nothing else holds our read ends).
    watch: OwnedFd,
}

/// A new pipe for a program's stderr: (our non-blocking read end, the program's write end).
pub(super) fn stderr_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    // Only our end: the program gets an ordinary blocking stderr.
    socket2::SockRef::from(&r).set_nonblocking(true)?;
    Ok((r, w))
}

impl Programs {
    pub fn new() -> io::Result<Programs> {
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?;
        // SAFETY: epoll_create1 returns a new descriptor or -1.
        let watch = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if watch < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Programs {
            running: HashMap::new(),
            pipes: Vec::new(),
            null: null.into(),
            // SAFETY: a descriptor just created, owned by nothing else.
            watch: unsafe { std::os::fd::FromRawFd::from_raw_fd(watch) },
        })
    }

    /// Readable when a pipe is (see `watch`).
    pub fn watch_fd(&self) -> BorrowedFd<'_> {
        self.watch.as_fd()
    }

    /// `/dev/null`, for `stderr = "null"`.
    pub fn null(&self) -> BorrowedFd<'_> {
        self.null.as_fd()
    }

    /// Book a program just forked, with the read end of its stderr pipe if it has one.
    pub fn started(&mut self, pid: i32, program: Started, stderr: Option<OwnedFd>) {
        if let Some(fd) = stderr {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: 0,
            };
            // SAFETY: both descriptors are open and ours; `ev` outlives the call.
            let r = unsafe {
                libc::epoll_ctl(
                    self.watch.as_raw_fd(),
                    libc::EPOLL_CTL_ADD,
                    fd.as_raw_fd(),
                    &mut ev,
                )
            };
            if r != 0 {
                log::warn!(
                    "listener `{}` pid {pid}: cannot watch its stderr: {}",
                    program.listener,
                    io::Error::last_os_error()
                );
            }
            self.pipes.push(Pipe {
                fd,
                listener: Arc::clone(&program.listener),
                pid,
                buf: Vec::new(),
                until: None,
                cap: crate::exec::output::LineCap::new(Instant::now()),
            });
        }
        self.running.insert(pid, program);
    }

    /// The pipes to watch, in the order `readable` expects.
    pub fn fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.pipes.iter().map(|p| p.fd.as_fd())
    }

    /// Read the pipes `poll` marked (`ready[i]` for the i-th of `fds`).
    pub fn readable(&mut self, ready: &[bool]) {
        let mut i = 0;
        self.pipes.retain_mut(|p| {
            let keep = !ready.get(i).copied().unwrap_or(false) || p.read();
            i += 1;
            keep
        });
    }

    /// When the next lingering pipe is due to be closed or program to be signalled.
    pub fn next_deadline(&self) -> Option<Instant> {
        let pipes = self.pipes.iter().filter_map(|p| p.until);
        let kills = self
            .running
            .values()
            .filter_map(|p| p.kill_at.map(|(t, _)| t));
        let idle = self.running.values().filter_map(|p| p.idle.map(|(_, t)| t));
        pipes.chain(kills).chain(idle).min()
    }

    /// Close the pipes whose wait ran out, logging what they held, and signal the programs
    /// that outlived their `max_duration`.
    pub fn expire(&mut self, now: Instant) {
        for (pid, p) in self.running.iter_mut() {
            p.check_idle(*pid, now);
            let Some((at, sig)) = p.kill_at else { continue };
            if at > now {
                continue;
            }
            // Not reaped yet (it is still in `running`), so the pid and group are its own.
            let _ = killpg(Pid::from_raw(*pid), sig);
            log::warn!(
                "listener `{}`: {} (pid {pid}) still running after {}: {sig} sent",
                p.listener,
                p.name,
                p.reason
            );
            p.kill_at = match sig {
                Signal::SIGTERM => Some((now + CUT_GRACE, Signal::SIGKILL)),
                _ => None,
            };
        }
        self.pipes.retain_mut(|p| match p.until {
            Some(t) if t <= now => {
                p.read();
                p.end();
                false
            }
            _ => true,
        });
    }

    /// A reaped child: if it was a program, log its last stderr lines, how it ended and its
    /// access line, and return true.
    pub fn ended(&mut self, pid: i32, ending: &Ending) -> bool {
        let Some(p) = self.running.remove(&pid) else {
            return false;
        };
        let now = Instant::now();
        self.pipes.retain_mut(|pipe| {
            if pipe.pid != pid {
                return true;
            }
            let open = pipe.read();
            if open {
                pipe.until = Some(now + DRAIN_WAIT);
            }
            open
        });
        let (code, signal) = match ending {
            Ending::Exited(c) => (Some(*c), None),
            Ending::Signaled(s) => (None, Some(*s)),
            _ => (None, None),
        };
        let client = match &p.conn {
            Some((_, Some(conn))) => crate::exec::Client::of(conn.as_fd()),
            _ => crate::exec::Client::Unknown,
        };
        crate::exec::log_exit(&p.listener, &p.name, pid, code, signal, client);
        if let Some((peer, conn)) = &p.conn {
            let bytes = conn.as_ref().map(crate::access::bytes).unwrap_or_default();
            crate::access::log_stream(
                &p.listener,
                peer,
                now.duration_since(p.at),
                bytes,
                &super::Outcome::Ok,
                p.tls.as_ref(),
            );
        }
        true
    }

    /// The daemon is done: log what the pipes hold and close them.
    pub fn finish(&mut self) {
        for mut p in self.pipes.drain(..) {
            p.read();
            p.end();
        }
    }
}

impl Pipe {
    /// Read what is there, logging complete lines; false at end of file or on an error (the
    /// rest is logged then).
    fn read(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        for _ in 0..READS_PER_PASS {
            match nix::unistd::read(self.fd.as_fd(), &mut chunk) {
                Ok(0) => {
                    self.end();
                    return false;
                }
                Ok(n) => self.take(&chunk[..n]),
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EAGAIN) => return true,
                Err(e) => {
                    self.end();
                    log::warn!(
                        "listener `{}` pid {}: reading stderr (fd {}): {e}",
                        self.listener,
                        self.pid,
                        self.fd.as_raw_fd()
                    );
                    return false;
                }
            }
        }
        true
    }

    fn take(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let room = MAX_LINE - self.buf.len();
            let nl = data[..data.len().min(room)]
                .iter()
                .position(|b| *b == b'\n');
            match nl {
                Some(i) => {
                    self.buf.extend_from_slice(&data[..i]);
                    data = &data[i + 1..];
                    self.flush();
                }
                None if data.len() >= room => {
                    self.buf.extend_from_slice(&data[..room]);
                    data = &data[room..];
                    self.flush();
                }
                None => {
                    self.buf.extend_from_slice(data);
                    data = &[];
                }
            }
        }
    }

    /// The pipe is done with: log the last line and what the cap dropped.
    fn end(&mut self) {
        self.flush();
        self.cap.report(&self.listener, self.pid);
    }

    /// Log the buffered line, if any.
    fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&self.buf);
        self.cap.log_line(&self.listener, self.pid, text.trim_end());
        self.buf.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe_with(data: &[u8]) -> Pipe {
        let (r, w) = stderr_pipe().unwrap();
        nix::unistd::write(&w, data).unwrap();
        drop(w);
        Pipe {
            fd: r,
            listener: "t".into(),
            pid: 1,
            buf: Vec::new(),
            until: None,
            cap: crate::exec::output::LineCap::new(Instant::now()),
        }
    }

    #[test]
    fn lines_are_cut_at_max_line_and_the_buffer_stays_bounded() {
        let mut long = vec![b'x'; MAX_LINE * 2 + 10];
        long.extend_from_slice(b"\nshort\npartial");
        let mut p = pipe_with(&long);
        // Everything fits in one pass; end of file flushes the partial last line.
        assert!(!p.read(), "end of file closes the pipe");
        assert!(p.buf.is_empty());
        let mut q = pipe_with(b"");
        q.take(&vec![b'y'; MAX_LINE * 3 + 5]);
        assert_eq!(q.buf.len(), 5, "three whole lines logged, the rest kept");
        q.take(b"z\n");
        assert!(q.buf.is_empty());
    }

    #[test]
    fn an_open_pipe_with_nothing_to_read_stays_open() {
        let (r, _w) = stderr_pipe().unwrap();
        let mut p = Pipe {
            fd: r,
            listener: "t".into(),
            pid: 1,
            buf: Vec::new(),
            until: None,
            cap: crate::exec::output::LineCap::new(Instant::now()),
        };
        assert!(p.read(), "EAGAIN: still open, the poll loop waits");
        p.take(b"half a line");
        assert_eq!(p.buf, b"half a line");
    }
}
