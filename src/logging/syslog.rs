//! `log = "syslog"`: log lines to a syslog daemon over a unix datagram socket (`/dev/log`), UDP
//! or TCP, in RFC 3164 or 5424 (`syslog_line`).
//!
//! The `syslog` crate is not used: its loggers block on a full socket, never reconnect after
//! the syslog daemon restarts and send TCP messages without framing, and its formatters pad
//! the RFC 3164 day with a zero and give RFC 5424 a MSGID of `0`. Here each line is formatted
//! by `syslog_line`, then sent on a non-blocking socket this module owns:
//! a line that cannot go out at once is dropped (and counted), never waited for; TCP lines are
//! framed by octet counting (RFC 6587) and queued up to `TCP_QUEUE` bytes while the connection
//! is being made. When the syslog daemon is unreachable lines go to stderr instead, with one
//! warning, and a reconnect is tried at most every `RETRY`.
//!
//! Forked processes (the fork servers, forked workers) inherit the logger. Every line carries
//! the daemon's pid, whichever process writes it, so an operator grepping the daemon's pid
//! (the pidfile's) sees every line of every worker model; lines that concern a child name its
//! pid in the text. A process that finds itself forked (its pid changed) never touches the
//! inherited socket again: forked workers close every
//! descriptor they do not need, so its number may be closed or, worse, reused by the client's
//! connection; it is forgotten (not closed) and a socket of the process's own is made.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixDatagram;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use syslog::{LogFormat, Severity};

use super::syslog_line::{self, Header};
use crate::config::{SyslogAddr, SyslogConfig, SyslogFormat};
use log::{Level, Record};
use socket2::{Domain, Socket, Type};

/// How often an unreachable syslog daemon is tried again (only when there is a line to send).
pub const RETRY: Duration = Duration::from_secs(1);
/// The most bytes a TCP connection may hold queued before lines are dropped.
pub const TCP_QUEUE: usize = 256 * 1024;

/// A syslog destination shared by every thread that logs.
#[derive(Debug)]
pub struct Syslog {
    target: SyslogAddr,
    state: Mutex<State>,
}

#[derive(Debug)]
enum Conn {
    Unix(UnixDatagram),
    Udp(UdpSocket),
    /// A non-blocking stream (maybe still connecting) and the bytes not yet written.
    Tcp(TcpStream, Vec<u8>),
}

impl Conn {
    /// Let go of the descriptor without closing it: it belongs to another process's past and
    /// its number may be someone else's now.
    fn forget(self) {
        let _ = match self {
            Conn::Unix(s) => s.into_raw_fd(),
            Conn::Udp(s) => s.into_raw_fd(),
            Conn::Tcp(s, _) => s.into_raw_fd(),
        };
    }
}

#[derive(Debug)]
struct State {
    header: Header,
    /// The process the connection belongs to.
    pid: u32,
    conn: Option<Conn>,
    /// When to try connecting again while `conn` is `None`.
    retry_at: Instant,
    /// Lines dropped because the socket was full, reported on the next line that goes out.
    dropped: u64,
    /// Whether the "unreachable, using stderr" warning is due when it comes back.
    down: bool,
}

impl Syslog {
    /// Set up (and try to connect) a syslog destination; never fails: an unreachable daemon
    /// means lines go to stderr until it is back.
    pub fn new(cfg: &SyslogConfig) -> Syslog {
        let pid = std::process::id();
        let hostname = match cfg.address {
            // The local syslog daemon adds the host name itself.
            SyslogAddr::Unix(_) if cfg.format == SyslogFormat::Rfc3164 => None,
            _ => Some(hostname()),
        };
        let header = Header {
            format: cfg.format,
            facility: cfg.facility,
            hostname,
            pid,
        };
        let s = Syslog {
            target: cfg.address.clone(),
            state: Mutex::new(State {
                header,
                pid,
                conn: None,
                retry_at: Instant::now(),
                dropped: 0,
                down: false,
            }),
        };
        if let Ok(mut st) = s.state.lock() {
            s.reconnect(&mut st);
        }
        s
    }

    /// Send one record; falls back to stderr when the syslog daemon cannot be reached.
    pub fn log(&self, r: &Record) {
        let text = r.args().to_string();
        let Ok(mut st) = self.state.lock() else {
            crate::logging::write_stderr(r.level(), &text);
            return;
        };
        st.follow_fork(std::process::id());
        let line = st.line(severity(r.level()), &text);
        if st.conn.is_none() && Instant::now() >= st.retry_at {
            self.reconnect(&mut st);
        }
        if st.conn.is_none() {
            drop(st);
            crate::logging::write_stderr(r.level(), &text);
            return;
        }
        match self.send(&mut st, &line) {
            Ok(true) => {}
            Ok(false) => st.dropped += 1,
            Err(e) => {
                if let Some(conn) = st.conn.take() {
                    // EBADF: someone closed it under us (a forked worker's descriptor sweep);
                    // the number is not ours to close again.
                    if e.raw_os_error() == Some(libc::EBADF) {
                        conn.forget();
                    }
                }
                st.retry_at = Instant::now() + RETRY;
                let first = !st.down;
                st.down = true;
                drop(st);
                if first {
                    crate::logging::write_stderr(
                        Level::Warn,
                        &format!(
                            "syslog at {}: {e}; logging to stderr until it is back",
                            self.target
                        ),
                    );
                }
                crate::logging::write_stderr(r.level(), &text);
            }
        }
    }

    /// Send a formatted line: `Ok(false)` if it had to be dropped (socket full), `Err` if the
    /// connection is gone.
    fn send(&self, st: &mut State, line: &[u8]) -> io::Result<bool> {
        let sent = match st.conn.as_mut() {
            None => return Ok(false),
            Some(Conn::Unix(s)) => s.send(line).map(|_| ()),
            Some(Conn::Udp(s)) => s.send(line).map(|_| ()),
            Some(Conn::Tcp(s, queue)) => {
                if queue.len() + line.len() + 12 > TCP_QUEUE {
                    return Ok(false);
                }
                queue.extend_from_slice(format!("{} ", line.len()).as_bytes());
                queue.extend_from_slice(line);
                flush_tcp(s, queue)
            }
        };
        match sent {
            Ok(()) => {
                if st.down || st.dropped > 0 {
                    let note = format!(
                        "syslog at {} reachable again; {} lines were dropped meanwhile",
                        self.target, st.dropped
                    );
                    st.down = false;
                    st.dropped = 0;
                    let again = st.line(Severity::LOG_NOTICE, &note);
                    let _ = self.send(st, &again);
                }
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            // A datagram that nobody received this time (ICMP port unreachable): not fatal.
            Err(e)
                if matches!(st.conn, Some(Conn::Udp(_)))
                    && e.kind() == io::ErrorKind::ConnectionRefused =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn reconnect(&self, st: &mut State) {
        match connect(&self.target) {
            Ok(conn) => st.conn = Some(conn),
            Err(e) => {
                if let Some(conn) = st.conn.take() {
                    // EBADF: someone closed it under us (a forked worker's descriptor sweep);
                    // the number is not ours to close again.
                    if e.raw_os_error() == Some(libc::EBADF) {
                        conn.forget();
                    }
                }
                st.retry_at = Instant::now() + RETRY;
                if !st.down {
                    st.down = true;
                    crate::logging::write_stderr(
                        Level::Warn,
                        &format!(
                            "syslog at {}: {e}; logging to stderr until it is reachable",
                            self.target
                        ),
                    );
                }
            }
        }
    }
}

impl State {
    /// One formatted message, stamped now.
    fn line(&self, severity: Severity, text: &str) -> Vec<u8> {
        let mut line = Vec::with_capacity(128);
        let stamp = syslog_line::Line {
            header: &self.header,
            now: std::time::SystemTime::now(),
        };
        // Writing into a Vec cannot fail.
        let _ = stamp.format(&mut line, severity, text);
        line
    }

    /// In a process forked since the last line: forget the parent's socket (and what it had
    /// queued) so a fresh one is made for this process. The lines keep the daemon's pid.
    fn follow_fork(&mut self, pid: u32) {
        if pid == self.pid {
            return;
        }
        self.pid = pid;
        if let Some(conn) = self.conn.take() {
            conn.forget();
        }
        self.retry_at = Instant::now();
        self.dropped = 0;
        self.down = false;
    }
}

/// Write as much of `queue` as the socket takes now.
fn flush_tcp(s: &mut TcpStream, queue: &mut Vec<u8>) -> io::Result<()> {
    while !queue.is_empty() {
        match s.write(queue) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                queue.drain(..n);
            }
            // Still connecting, or the buffer is full: the rest stays queued.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // ENOTCONN while a non-blocking connect is in progress.
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A non-blocking, close-on-exec socket to the syslog daemon (TCP: connect started).
fn connect(target: &SyslogAddr) -> io::Result<Conn> {
    match target {
        SyslogAddr::Unix(path) => {
            let s = UnixDatagram::unbound()?;
            s.connect(path)?;
            s.set_nonblocking(true)?;
            Ok(Conn::Unix(s))
        }
        SyslogAddr::Udp(addr) => {
            let local: SocketAddr = if addr.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                ([0u16; 8], 0).into()
            };
            let s = UdpSocket::bind(local)?;
            s.connect(addr)?;
            s.set_nonblocking(true)?;
            Ok(Conn::Udp(s))
        }
        SyslogAddr::Tcp(addr) => {
            let s = Socket::new(Domain::for_address(*addr), Type::STREAM, None)?;
            s.set_nonblocking(true)?;
            match s.connect(&(*addr).into()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => return Err(e),
            }
            Ok(Conn::Tcp(s.into(), Vec::new()))
        }
    }
}

fn severity(level: Level) -> Severity {
    match level {
        Level::Error => Severity::LOG_ERR,
        Level::Warn => Severity::LOG_WARNING,
        Level::Info => Severity::LOG_INFO,
        Level::Debug | Level::Trace => Severity::LOG_DEBUG,
    }
}

/// This host's name for network syslog (never resolved: it is only a label).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn record_line(syslog: &Syslog, text: &str) {
        syslog.log(
            &Record::builder()
                .args(format_args!("{text}"))
                .level(Level::Info)
                .build(),
        );
    }

    /// A logger inherited across fork (simulated: it believes another process built it) keeps
    /// the daemon's pid in its lines and never closes the inherited descriptor, whose number a
    /// forked worker may have closed and reused.
    #[test]
    fn after_a_fork_lines_keep_the_daemon_pid_and_the_old_socket_is_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.sock");
        let sink = UnixDatagram::bind(&path).expect("bind the sink");
        sink.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let syslog = Syslog::new(&SyslogConfig {
            address: SyslogAddr::Unix(path.clone()),
            facility: 3,
            format: SyslogFormat::Rfc3164,
        });
        let inherited = {
            let mut st = syslog.state.lock().expect("lock");
            st.pid = 1;
            match &st.conn {
                Some(Conn::Unix(s)) => s.as_raw_fd(),
                other => panic!("not connected: {other:?}"),
            }
        };
        record_line(&syslog, "hello from the child");
        let mut buf = [0u8; 1024];
        let n = sink.recv(&mut buf).expect("a line");
        let line = String::from_utf8_lossy(&buf[..n]);
        let tag = format!(
            "socketd[{}]: hello from the child",
            syslog.state.lock().expect("lock").header.pid
        );
        assert!(line.contains(&tag), "{line:?} lacks {tag:?}");
        // The inherited descriptor was forgotten, not closed: it is still open here.
        assert!(
            // SAFETY: F_GETFD only reads the descriptor's flags.
            unsafe { libc::fcntl(inherited, libc::F_GETFD) } >= 0,
            "the inherited socket was closed"
        );
        // SAFETY: the descriptor was forgotten by the logger; this test owns it now.
        drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(inherited) });
    }
}
