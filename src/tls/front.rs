//! The TLS front: one event-loop thread per process that does every handshake and relays
//! every TLS session's bytes, the way stunnel sits in front of a service.
//!
//! A server-side session arrives as an accepted, admitted socket; the front does the handshake
//! (bounded by its deadline, so a stalled or half-open client holds no worker), then makes a
//! Unix socketpair and hands one end to the listener (`reply`), which dispatches it to any
//! worker model and handler as an ordinary plaintext connection. A client-side session (a
//! proxy's TLS upstream) hands its plaintext end back at once. Either way the front then moves
//! bytes between the TLS socket and its end of the pair, with bounded buffers and both
//! half-closes, never a thread per stream.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream as StdUnix;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::net::{TcpStream, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use rustls::Connection;

use super::info::TlsInfo;

const WAKER: Token = Token(0);
/// How long a session whose local side has finished waits for the TLS peer to close.
const LINGER: Duration = Duration::from_secs(10);
/// Plaintext read per turn from either side.
const CHUNK: usize = 64 * 1024;

/// What the listener gets back from a server-side handshake.
pub type Reply = Box<dyn FnOnce(Result<(StdUnix, TlsInfo), String>) + Send>;

/// The TLS-side socket of a session.
#[derive(Debug)]
pub enum Wire {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Wire {
    fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Wire::Tcp(s) => s,
            Wire::Unix(s) => s,
        }
    }

    fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Wire::Tcp(s) => s.shutdown(how),
            Wire::Unix(s) => s.shutdown(how),
        };
    }

    /// For a connect in progress: Ok(true) once connected.
    fn connected(&self) -> io::Result<bool> {
        match self {
            Wire::Tcp(s) => {
                if let Some(e) = s.take_error()? {
                    return Err(e);
                }
                match s.peer_addr() {
                    Ok(_) => Ok(true),
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Wire::Unix(_) => Ok(true),
        }
    }
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Wire::Tcp(s) => s.read(buf),
            Wire::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Wire::Tcp(s) => s.write(buf),
            Wire::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A session for the front to run.
pub enum Job {
    /// Accept TLS on `wire`; `reply` gets the plaintext end or why the handshake failed.
    Accept {
        wire: Wire,
        config: Arc<rustls::ServerConfig>,
        deadline: Instant,
        /// The listener's `idle_timeout`: an established session with no byte either way for
        /// this long is closed (the front sees every byte, whatever the handler is).
        idle: Option<Duration>,
        /// `listener `name` peer addr`, for log lines.
        label: String,
        reply: Reply,
    },
    /// Speak TLS as a client on `wire` (maybe still connecting), after sending `preamble`
    /// in the clear; `plain` is the front's end of the caller's socketpair.
    Connect {
        wire: Wire,
        config: Arc<rustls::ClientConfig>,
        name: rustls::pki_types::ServerName<'static>,
        plain: UnixStream,
        preamble: Vec<u8>,
        deadline: Instant,
        label: String,
    },
}

/// The handle on this process's front; started on first use.
pub struct Front {
    tx: Mutex<Sender<Job>>,
    waker: Arc<Waker>,
}

/// The process's front, started on first use. A forked child that needs one starts its own
/// (it inherits the parent's handle but not the parent's thread).
pub fn front() -> io::Result<&'static Front> {
    static FRONT: Mutex<Option<(u32, &'static Front)>> = Mutex::new(None);
    let mut slot = FRONT
        .lock()
        .map_err(|_| io::Error::other("TLS front lock poisoned"))?;
    let pid = std::process::id();
    if let Some((owner, f)) = *slot {
        if owner == pid {
            return Ok(f);
        }
    }
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let (tx, rx) = channel();
    std::thread::Builder::new()
        .name("socketd-tls".into())
        .spawn(move || Loop::new(poll, rx).run())?;
    // One per process for its whole life: leaked on purpose, like a static.
    let f: &'static Front = Box::leak(Box::new(Front {
        tx: Mutex::new(tx),
        waker,
    }));
    *slot = Some((pid, f));
    Ok(f)
}

impl Front {
    /// Hand a session to the front.
    pub fn submit(&self, job: Job) -> io::Result<()> {
        let sent = self
            .tx
            .lock()
            .map_err(|_| io::Error::other("TLS front lock poisoned"))?
            .send(job);
        sent.map_err(|_| io::Error::other("the TLS front has stopped"))?;
        self.waker.wake()
    }
}

/// Handshake failures: counted, and logged at most `LOG_BURST` per `LOG_WINDOW` with a
/// summary of the rest, so a flood of bad clients cannot flood the log.
pub struct FailureLog {
    pub total: u64,
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

const LOG_BURST: u32 = 10;
const LOG_WINDOW: Duration = Duration::from_secs(10);

static FAILURES: Mutex<FailureLog> = Mutex::new(FailureLog {
    total: 0,
    window_start: None,
    in_window: 0,
    suppressed: 0,
});

/// TLS handshakes that failed in this process since start.
pub fn handshake_failures() -> u64 {
    FAILURES.lock().map(|f| f.total).unwrap_or(0)
}

/// What to log for one failure: a summary of the previous window's suppressed lines first
/// (its count), then whether this failure gets its own line.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict {
    pub summary: Option<u64>,
    pub log_this: bool,
}

impl FailureLog {
    /// Count one failure at `now` and say what to log.
    pub fn record(&mut self, now: Instant) -> Verdict {
        self.total += 1;
        let fresh = self
            .window_start
            .is_none_or(|s| now.duration_since(s) >= LOG_WINDOW);
        let mut summary = None;
        if fresh {
            if self.suppressed > 0 {
                summary = Some(self.suppressed);
            }
            self.window_start = Some(now);
            self.in_window = 0;
            self.suppressed = 0;
        }
        let log_this = self.in_window < LOG_BURST;
        if log_this {
            self.in_window += 1;
        } else {
            self.suppressed += 1;
        }
        Verdict { summary, log_this }
    }
}

/// Count a failed handshake and log it unless the burst for this window is used up.
pub fn log_failure(label: &str, reason: &str) {
    let Ok(mut f) = FAILURES.lock() else { return };
    let v = f.record(Instant::now());
    drop(f);
    if let Some(n) = v.summary {
        log::warn!(
            "tls: {n} more handshake failures in the last {}s were not logged one by one",
            LOG_WINDOW.as_secs()
        );
    }
    if v.log_this {
        log::warn!("{label}: TLS handshake failed: {reason}");
    }
}

/// A short reason an operator can act on.
pub fn reason(e: &rustls::Error) -> String {
    use rustls::{CertificateError, Error};
    match e {
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "unknown CA (certificate not signed by a trusted CA)".into()
        }
        Error::InvalidCertificate(CertificateError::Revoked) => {
            "certificate revoked (listed in the `crl` file)".into()
        }
        Error::InvalidCertificate(CertificateError::UnknownRevocationStatus) => {
            "certificate revocation status unknown (no CRL from its issuer in the `crl` file)"
                .into()
        }
        Error::InvalidCertificate(c) => format!("bad certificate ({c:?})"),
        Error::NoCertificatesPresented => "no client certificate presented".into(),
        Error::PeerIncompatible(p) => format!("incompatible peer ({p:?}), e.g. protocol version"),
        Error::InvalidMessage(m) => format!("not TLS or corrupt message ({m:?})"),
        Error::AlertReceived(a) => format!("peer sent alert {a:?}"),
        other => other.to_string(),
    }
}

struct Session {
    wire: Wire,
    conn: Connection,
    plain: Option<UnixStream>,
    /// Set while the handshake runs (and, for a client, while connecting), and while
    /// lingering for the peer's close.
    deadline: Option<Instant>,
    idle: Option<Duration>,
    /// When a byte last moved.
    last: Instant,
    connecting: bool,
    preamble: Vec<u8>,
    reply: Option<Reply>,
    label: String,
    /// Plaintext from the TLS peer not yet written to `plain`.
    to_plain: Vec<u8>,
    /// Ciphertext read from the socket that rustls could not take yet.
    wire_in: Vec<u8>,
    /// The TLS peer finished sending (close_notify or EOF); `plain` half-closed once flushed.
    peer_done: bool,
    plain_shut: bool,
    /// Our side (`plain`) finished sending; close_notify queued.
    local_done: bool,
    wire_shut: bool,
}

/// Why a session ended badly.
enum End {
    Failed(String),
    Closed,
}

struct Loop {
    poll: Poll,
    rx: Receiver<Job>,
    sessions: Vec<Option<Session>>,
    free: VecDeque<usize>,
    buf: Vec<u8>,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

fn interrupted(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Interrupted
}

impl Loop {
    fn new(poll: Poll, rx: Receiver<Job>) -> Loop {
        Loop {
            poll,
            rx,
            sessions: Vec::new(),
            free: VecDeque::new(),
            buf: vec![0; CHUNK],
        }
    }

    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            let timeout = self
                .sessions
                .iter()
                .flatten()
                .filter_map(Session::due)
                .min()
                .map(|d| d.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if interrupted(&e) {
                    continue;
                }
                log::error!("tls: event loop failed: {e}");
                return;
            }
            let mut touched = Vec::new();
            for ev in events.iter() {
                match ev.token() {
                    WAKER => {}
                    Token(t) => touched.push((t - 1) / 2),
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(job) => {
                        if let Some(id) = self.add(job) {
                            touched.push(id);
                        }
                    }
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        if self.sessions.iter().all(Option::is_none) {
                            return;
                        }
                        break;
                    }
                }
            }
            touched.sort_unstable();
            touched.dedup();
            for id in touched {
                self.drive(id);
            }
            self.expire();
        }
    }

    fn add(&mut self, job: Job) -> Option<usize> {
        let session = match job {
            Job::Accept {
                wire,
                config,
                deadline,
                idle,
                label,
                reply,
            } => match rustls::ServerConnection::new(config) {
                Ok(c) => {
                    let mut s = Session::new(wire, c.into(), None, deadline, label, Some(reply));
                    s.idle = idle;
                    s
                }
                Err(e) => {
                    reply(Err(e.to_string()));
                    return None;
                }
            },
            Job::Connect {
                wire,
                config,
                name,
                plain,
                preamble,
                deadline,
                label,
            } => match rustls::ClientConnection::new(config, name) {
                Ok(c) => {
                    let mut s = Session::new(wire, c.into(), Some(plain), deadline, label, None);
                    s.connecting = true;
                    s.preamble = preamble;
                    s
                }
                Err(e) => {
                    log_failure(&label, &e.to_string());
                    return None;
                }
            },
        };
        let id = self.free.pop_front().unwrap_or_else(|| {
            self.sessions.push(None);
            self.sessions.len() - 1
        });
        self.sessions[id] = Some(session);
        let s = self.sessions[id].as_mut()?;
        let both = Interest::READABLE | Interest::WRITABLE;
        let mut ok = self
            .poll
            .registry()
            .register(s.wire.source(), Token(id * 2 + 1), both)
            .is_ok();
        if let Some(p) = s.plain.as_mut() {
            ok &= self
                .poll
                .registry()
                .register(p, Token(id * 2 + 2), both)
                .is_ok();
        }
        if !ok {
            self.finish(id, End::Failed("cannot watch the socket".into()));
            return None;
        }
        Some(id)
    }

    fn drive(&mut self, id: usize) {
        let Some(Some(s)) = self.sessions.get_mut(id) else {
            return;
        };
        let end = s.step(&mut self.buf);
        // A server session whose handshake just finished gets its plaintext pair.
        if let Some(Some(s)) = self.sessions.get_mut(id) {
            if s.plain.is_none() && !s.conn.is_handshaking() && end.is_none() {
                match StdUnix::pair() {
                    Ok((mine, theirs)) => {
                        let _ = mine.set_nonblocking(true);
                        let mut mine = UnixStream::from_std(mine);
                        let both = Interest::READABLE | Interest::WRITABLE;
                        if self
                            .poll
                            .registry()
                            .register(&mut mine, Token(id * 2 + 2), both)
                            .is_err()
                        {
                            self.finish(id, End::Failed("cannot watch the socketpair".into()));
                            return;
                        }
                        s.plain = Some(mine);
                        s.deadline = None;
                        let info = s.info();
                        if let Some(reply) = s.reply.take() {
                            reply(Ok((theirs, info)));
                        }
                        // Bytes that came with the handshake's last flight.
                        return self.drive(id);
                    }
                    Err(e) => {
                        self.finish(id, End::Failed(format!("socketpair: {e}")));
                        return;
                    }
                }
            }
        }
        if let Some(end) = end {
            self.finish(id, end);
        }
    }

    /// Cut sessions whose handshake (or connect) ran past its deadline, idle ones past
    /// `idle_timeout`, and lingering ones whose peer never closed.
    fn expire(&mut self) {
        let now = Instant::now();
        let due: Vec<usize> = self
            .sessions
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                s.as_ref()
                    .and_then(Session::due)
                    .filter(|d| *d <= now)
                    .map(|_| i)
            })
            .collect();
        for id in due {
            let handshaking = self.sessions[id]
                .as_ref()
                .is_some_and(|s| s.conn.is_handshaking() || s.connecting);
            let end = match handshaking {
                true => End::Failed("timeout (handshake not finished in time)".into()),
                false => End::Closed,
            };
            self.finish(id, end);
        }
    }

    fn finish(&mut self, id: usize, end: End) {
        let Some(mut s) = self.sessions.get_mut(id).and_then(Option::take) else {
            return;
        };
        let _ = self.poll.registry().deregister(s.wire.source());
        if let Some(p) = s.plain.as_mut() {
            let _ = self.poll.registry().deregister(p);
        }
        if let End::Failed(why) = end {
            let handshaking = s.conn.is_handshaking();
            if handshaking {
                // Best effort: the alert rustls queued tells the peer why.
                let _ = s.conn.write_tls(&mut s.wire);
                log_failure(&s.label, &why);
            } else {
                log::debug!("{}: TLS session ended: {why}", s.label);
            }
            if let Some(reply) = s.reply.take() {
                reply(Err(why));
            }
        }
        self.free.push_back(id);
    }
}

impl Session {
    fn new(
        wire: Wire,
        conn: Connection,
        plain: Option<UnixStream>,
        deadline: Instant,
        label: String,
        reply: Option<Reply>,
    ) -> Session {
        Session {
            wire,
            conn,
            plain,
            deadline: Some(deadline),
            idle: None,
            last: Instant::now(),
            connecting: false,
            preamble: Vec::new(),
            reply,
            label,
            to_plain: Vec::new(),
            wire_in: Vec::new(),
            peer_done: false,
            plain_shut: false,
            local_done: false,
            wire_shut: false,
        }
    }

    /// When this session must be looked at: its handshake or linger deadline, else the end
    /// of its idle time.
    fn due(&self) -> Option<Instant> {
        self.deadline.or_else(|| self.idle.map(|d| self.last + d))
    }

    fn info(&self) -> TlsInfo {
        match &self.conn {
            Connection::Server(c) => TlsInfo::from_state(c, c.server_name()),
            Connection::Client(c) => TlsInfo::from_state(c, None),
        }
    }

    /// Give ciphertext to rustls while it takes it, processing as it goes; keep the rest.
    fn feed(&mut self, mut data: &[u8]) -> Result<usize, End> {
        let offered = data.len();
        // Never an empty read: rustls takes a 0-byte read_tls for the peer's EOF.
        while !data.is_empty() && self.conn.wants_read() {
            match self.conn.read_tls(&mut data) {
                Ok(0) => break,
                Ok(_) => {
                    if let Err(e) = self.conn.process_new_packets() {
                        let _ = self.conn.write_tls(&mut self.wire);
                        return Err(End::Failed(reason(&e)));
                    }
                }
                Err(e) => return Err(End::Failed(format!("read: {e}"))),
            }
        }
        self.wire_in.extend_from_slice(data);
        Ok(offered - data.len())
    }

    /// Move whatever can move; `Some` when the session is over.
    fn step(&mut self, buf: &mut [u8]) -> Option<End> {
        if self.connecting {
            match self.wire.connected() {
                Ok(true) => self.connecting = false,
                Ok(false) => return None,
                Err(e) => return Some(End::Failed(format!("connect: {e}"))),
            }
            while !self.preamble.is_empty() {
                match self.wire.write(&self.preamble) {
                    Ok(n) => {
                        self.preamble.drain(..n);
                    }
                    Err(e) if would_block(&e) => return None,
                    Err(e) if interrupted(&e) => {}
                    Err(e) => return Some(End::Failed(format!("write: {e}"))),
                }
            }
        }
        loop {
            let mut progress = false;
            // TLS records in: one read of up to CHUNK bytes from the socket (rustls alone would
            // read 4 KiB a call), fed to rustls; what it cannot take yet waits in `wire_in`.
            if !self.peer_done && self.conn.wants_read() {
                if self.wire_in.is_empty() {
                    match self.wire.read(buf) {
                        Ok(0) => {
                            if self.conn.is_handshaking() {
                                return Some(End::Failed(
                                    "peer closed during the handshake".into(),
                                ));
                            }
                            self.peer_done = true;
                            progress = true;
                        }
                        Ok(n) => {
                            progress = true;
                            if let Err(end) = self.feed(&buf[..n]) {
                                return Some(end);
                            }
                        }
                        Err(e) if would_block(&e) || interrupted(&e) => {}
                        Err(e) => return Some(End::Failed(format!("read: {e}"))),
                    }
                } else {
                    let pending = std::mem::take(&mut self.wire_in);
                    match self.feed(&pending) {
                        Ok(taken) => progress |= taken > 0,
                        Err(end) => return Some(end),
                    }
                }
            }
            // TLS records out.
            while self.conn.wants_write() {
                match self.conn.write_tls(&mut self.wire) {
                    Ok(_) => progress = true,
                    Err(e) if would_block(&e) => break,
                    Err(e) if interrupted(&e) => {}
                    Err(e) => return Some(End::Failed(format!("write: {e}"))),
                }
            }
            if self.conn.is_handshaking() {
                if !progress {
                    return None;
                }
                continue;
            }
            let Some(plain) = self.plain.as_mut() else {
                return None; // the loop makes the pair
            };
            // Peer plaintext -> plain side.
            if self.to_plain.is_empty() && !self.plain_shut {
                match self.conn.reader().read(buf) {
                    Ok(0) => self.peer_done = true,
                    Ok(n) => {
                        self.to_plain.extend_from_slice(&buf[..n]);
                        progress = true;
                    }
                    Err(e) if would_block(&e) => {}
                    // EOF without close_notify: the peer is gone all the same.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => self.peer_done = true,
                    Err(e) => return Some(End::Failed(format!("read: {e}"))),
                }
            }
            while !self.to_plain.is_empty() {
                match plain.write(&self.to_plain) {
                    Ok(n) => {
                        self.to_plain.drain(..n);
                        progress = true;
                    }
                    Err(e) if would_block(&e) => break,
                    Err(e) if interrupted(&e) => {}
                    Err(_) => return Some(End::Closed),
                }
            }
            if self.peer_done && self.to_plain.is_empty() && !self.plain_shut {
                let _ = plain.shutdown(Shutdown::Write);
                self.plain_shut = true;
                progress = true;
            }
            // Plain side -> TLS, only once earlier records are on the wire (bounded memory).
            if !self.local_done && !self.conn.wants_write() {
                match plain.read(buf) {
                    Ok(0) => {
                        self.local_done = true;
                        self.conn.send_close_notify();
                        progress = true;
                    }
                    Ok(n) => {
                        if let Err(e) = self.conn.writer().write_all(&buf[..n]) {
                            return Some(End::Failed(format!("write: {e}")));
                        }
                        progress = true;
                    }
                    Err(e) if would_block(&e) || interrupted(&e) => {}
                    Err(_) => {
                        self.local_done = true;
                        self.conn.send_close_notify();
                        progress = true;
                    }
                }
            }
            if self.local_done && !self.conn.wants_write() && !self.wire_shut {
                self.wire.shutdown(Shutdown::Write);
                self.wire_shut = true;
                // A peer that never closes its side is not waited for without end.
                self.deadline = Some(Instant::now() + LINGER);
            }
            if self.local_done && self.wire_shut && self.plain_shut {
                return Some(End::Closed);
            }
            if progress {
                self.last = Instant::now();
            } else {
                // Waiting: an idle session keeps no relay buffer (RSS per idle connection).
                if self.to_plain.is_empty() {
                    self.to_plain = Vec::new();
                }
                if self.wire_in.is_empty() {
                    self.wire_in = Vec::new();
                }
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_all_counted_but_logged_at_most_a_burst_per_window() {
        let mut f = FailureLog {
            total: 0,
            window_start: None,
            in_window: 0,
            suppressed: 0,
        };
        let t0 = Instant::now();
        let logged = (0..25).filter(|_| f.record(t0).log_this).count();
        assert_eq!((logged, f.total), (LOG_BURST as usize, 25));
        // The next window opens with a summary of the 15 not logged, and logs again.
        let v = f.record(t0 + LOG_WINDOW);
        assert_eq!(
            v,
            Verdict {
                summary: Some(15),
                log_this: true
            }
        );
        let v = f.record(t0 + LOG_WINDOW + LOG_WINDOW);
        assert_eq!(
            v,
            Verdict {
                summary: None,
                log_this: true
            }
        );
        assert_eq!(f.total, 27);
    }
}
