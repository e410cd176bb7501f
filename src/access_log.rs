//! The access log's own sink (`[daemon] access_log`): one line per connection, kept apart from
//! the daemon's log so that a busy listener can never push lifecycle, reload and error lines
//! out (journald's rate limit counts every line of the service).
//!
//! Workers hand lines to a bounded queue (`QUEUE_LINES`) without waiting; one writer thread
//! writes them out. When the queue is full, or a write fails (a full disk, a stopped syslog
//! daemon), the line is dropped and counted; the count is shown by `socketd status` and the
//! metrics, and the loop (not the writer, which may be stuck in a write) warns in the daemon's
//! log at once and then at most every `REPORT_EVERY`. A file target
//! is reopened on SIGHUP (every reload) and by `socketd reopen-logs`, for logrotate.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::config::{AccessLogTarget, SyslogConfig};
use crate::conn::{PeerAddr, PeerCred};

/// Lines that may wait for the writer; past this they are dropped (and counted).
pub const QUEUE_LINES: usize = 8192;
/// How often, at most, the daemon's log says that access lines were dropped.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);
/// The writer gathers up to this many bytes into one write.
const BATCH_BYTES: usize = 64 * 1024;

enum Msg {
    Line(String),
    /// Look at the reopen/retarget requests now.
    Wake,
    /// Say when every line queued before this one is written (the daemon is exiting).
    Flush(SyncSender<()>),
}

/// Counters and requests shared by the workers, the loop and the writer thread.
#[derive(Default)]
struct Shared {
    enabled: AtomicBool,
    written: AtomicU64,
    dropped: AtomicU64,
    reopen: AtomicBool,
    retarget: Mutex<Option<AccessLogTarget>>,
    current: Mutex<String>,
    report: Mutex<Report>,
}

/// What the daemon's log was last told about drops.
struct Report {
    reported: u64,
    /// Not before this.
    at: Instant,
    last_error: String,
}

impl Default for Report {
    fn default() -> Report {
        Report {
            reported: 0,
            at: Instant::now(),
            last_error: String::new(),
        }
    }
}

struct Sink {
    tx: SyncSender<Msg>,
    shared: &'static Shared,
}

static SHARED: OnceLock<Shared> = OnceLock::new();
static SINK: OnceLock<Sink> = OnceLock::new();

fn shared() -> &'static Shared {
    SHARED.get_or_init(Shared::default)
}

/// Worker processes (forked workers, and the fork servers for exec programs) have neither the
/// writer thread nor the daemon's counters: they send each ended connection over this
/// datagram socket (created before the fork servers, so they inherit it) to a thread in the
/// daemon, which counts it and writes its line. `-1` when there is none.
static FORWARD_FD: AtomicI32 = AtomicI32::new(-1);
/// The daemon's pid: any other process forwards.
static DAEMON_PID: AtomicU32 = AtomicU32::new(0);
/// The daemon's end of the forwarding socket, until `start` takes it.
static FORWARD_RX: Mutex<Option<UnixDatagram>> = Mutex::new(None);
/// The largest forwarded record (a longer one is cut to this).
const MAX_FORWARD: usize = 8 * 1024;

/// Create the forwarding socket. Call in the daemon before the fork servers are forked.
pub fn prepare() -> std::io::Result<()> {
    if forward_fd() >= 0 {
        return Ok(()); // another server in this process made it already
    }
    let (tx, rx) = UnixDatagram::pair()?;
    tx.set_nonblocking(true)?;
    DAEMON_PID.store(std::process::id(), Relaxed);
    FORWARD_FD.store(std::os::fd::IntoRawFd::into_raw_fd(tx), Relaxed);
    if let Ok(mut r) = FORWARD_RX.lock() {
        *r = Some(rx);
    }
    Ok(())
}

/// The descriptor worker processes must keep open (or -1).
pub fn forward_fd() -> RawFd {
    FORWARD_FD.load(Relaxed)
}

thread_local! {
    /// Set on threads that only ever run in the daemon (see `mark_daemon_thread`).
    static DAEMON_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Mark the calling thread as one that lives only in the daemon and never forks (an event
/// loop), so `forwards` answers without a `getpid` per connection.
pub fn mark_daemon_thread() {
    DAEMON_THREAD.with(|c| c.set(true));
}

/// Whether this process is a worker process that forwards to the daemon.
pub fn forwards() -> bool {
    if DAEMON_THREAD.with(std::cell::Cell::get) {
        return false;
    }
    let daemon = DAEMON_PID.load(Relaxed);
    daemon != 0 && daemon != std::process::id() && forward_fd() >= 0
}

/// One ended connection, as a worker process sends it to the daemon, which counts it and
/// writes its access line (formatted there, not in the worker: see `encode`).
#[derive(Debug, PartialEq, Eq)]
pub struct Ended {
    pub listener: String,
    pub took: Duration,
    pub received: Option<u64>,
    pub sent: Option<u64>,
    pub peer: PeerAddr,
    /// `ok`, `error` or `panic`.
    pub outcome: &'static str,
    /// The TLS session's fields for the line (empty without TLS).
    pub tls: String,
}

/// The access line of an ended connection (one format for the daemon's own connections and
/// those forwarded by worker processes).
pub fn access_line(
    listener: &str,
    peer: &PeerAddr,
    took: Duration,
    received: Option<u64>,
    sent: Option<u64>,
    outcome: &str,
    tls: &str,
) -> String {
    let count = |n: Option<u64>| n.map_or_else(|| "-".to_string(), |n| n.to_string());
    format!(
        "access: listener `{listener}` peer {peer} duration {took:?} in {} out {} outcome {outcome}{tls}",
        count(received),
        count(sent),
    )
}

const OUTCOMES: [&str; 3] = ["ok", "error", "panic"];

impl Ended {
    /// A fixed little-endian layout: nanoseconds, which counters are known, received, sent,
    /// the outcome, the listener's name and the TLS fields with their lengths, then the peer.
    /// Hand-written rather than JSON, and the line formatted by the daemon: a forked child
    /// sends one per connection, and every code page it runs for the first time is a page
    /// fault in that child (see `worker::forkserver`).
    fn encode(&self) -> Vec<u8> {
        let name = &self.listener.as_bytes()[..self.listener.len().min(1024)];
        let tls = &self.tls.as_bytes()[..self.tls.len().min(4096)];
        let mut b = Vec::with_capacity(64 + name.len() + tls.len());
        let nanos = u64::try_from(self.took.as_nanos()).unwrap_or(u64::MAX);
        b.extend_from_slice(&nanos.to_le_bytes());
        b.push(u8::from(self.received.is_some()) | u8::from(self.sent.is_some()) << 1);
        b.extend_from_slice(&self.received.unwrap_or(0).to_le_bytes());
        b.extend_from_slice(&self.sent.unwrap_or(0).to_le_bytes());
        b.push(
            OUTCOMES
                .iter()
                .position(|o| *o == self.outcome)
                .unwrap_or(1) as u8,
        );
        for field in [name, tls] {
            b.extend_from_slice(&(field.len() as u16).to_le_bytes());
            b.extend_from_slice(field);
        }
        put_peer(&mut b, &self.peer);
        b
    }

    /// The record `encode` made; `None` if it is not one.
    fn decode(b: &[u8]) -> Option<Ended> {
        let mut r = b;
        let nanos = u64::from_le_bytes(take(&mut r, 8)?.try_into().ok()?);
        let known = take(&mut r, 1)?[0];
        let received = u64::from_le_bytes(take(&mut r, 8)?.try_into().ok()?);
        let sent = u64::from_le_bytes(take(&mut r, 8)?.try_into().ok()?);
        let outcome = *OUTCOMES.get(usize::from(take(&mut r, 1)?[0]))?;
        let mut text = || -> Option<String> {
            let len = u16::from_le_bytes(take(&mut r, 2)?.try_into().ok()?);
            Some(String::from_utf8_lossy(take(&mut r, usize::from(len))?).into_owned())
        };
        let (listener, tls) = (text()?, text()?);
        let peer = get_peer(&mut r)?;
        Some(Ended {
            listener,
            took: Duration::from_nanos(nanos),
            received: (known & 1 != 0).then_some(received),
            sent: (known & 2 != 0).then_some(sent),
            peer,
            outcome,
            tls,
        })
    }
}

fn take<'a>(r: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if r.len() < n {
        return None;
    }
    let (head, rest) = r.split_at(n);
    *r = rest;
    Some(head)
}

fn put_peer(b: &mut Vec<u8>, peer: &PeerAddr) {
    match peer {
        PeerAddr::Inet(SocketAddr::V4(a)) => {
            b.push(4);
            b.extend_from_slice(&a.ip().octets());
            b.extend_from_slice(&a.port().to_le_bytes());
        }
        PeerAddr::Inet(SocketAddr::V6(a)) => {
            b.push(6);
            b.extend_from_slice(&a.ip().octets());
            b.extend_from_slice(&a.port().to_le_bytes());
            b.extend_from_slice(&a.flowinfo().to_le_bytes());
            b.extend_from_slice(&a.scope_id().to_le_bytes());
        }
        PeerAddr::Unix { path, cred } => {
            b.push(b'u');
            let path = path.as_deref().map(|p| p.as_os_str().as_bytes());
            let path = path.map(|p| &p[..p.len().min(1024)]);
            b.push(u8::from(path.is_some()) | u8::from(cred.is_some()) << 1);
            let path = path.unwrap_or_default();
            b.extend_from_slice(&(path.len() as u16).to_le_bytes());
            b.extend_from_slice(path);
            let c = cred.unwrap_or(PeerCred {
                pid: 0,
                uid: 0,
                gid: 0,
            });
            b.extend_from_slice(&c.pid.to_le_bytes());
            b.extend_from_slice(&c.uid.to_le_bytes());
            b.extend_from_slice(&c.gid.to_le_bytes());
        }
    }
}

fn get_peer(r: &mut &[u8]) -> Option<PeerAddr> {
    let u16_of = |s: &[u8]| u16::from_le_bytes([s[0], s[1]]);
    let u32_of = |s: &[u8]| u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    Some(match take(r, 1)?[0] {
        4 => {
            let ip: [u8; 4] = take(r, 4)?.try_into().ok()?;
            let port = u16_of(take(r, 2)?);
            PeerAddr::Inet(SocketAddr::from((ip, port)))
        }
        6 => {
            let ip: [u8; 16] = take(r, 16)?.try_into().ok()?;
            let port = u16_of(take(r, 2)?);
            let (flow, scope) = (u32_of(take(r, 4)?), u32_of(take(r, 4)?));
            PeerAddr::Inet(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip.into(),
                port,
                flow,
                scope,
            )))
        }
        b'u' => {
            let has = take(r, 1)?[0];
            let len = u16_of(take(r, 2)?);
            let path = take(r, usize::from(len))?;
            let path =
                (has & 1 != 0).then(|| std::path::PathBuf::from(std::ffi::OsStr::from_bytes(path)));
            let (pid, uid, gid) = (
                u32_of(take(r, 4)?) as i32,
                u32_of(take(r, 4)?),
                u32_of(take(r, 4)?),
            );
            let cred = (has & 2 != 0).then_some(PeerCred { pid, uid, gid });
            PeerAddr::Unix { path, cred }
        }
        _ => return None,
    })
}

/// From a worker process: hand an ended connection to the daemon (never blocks; a full
/// socket loses the record).
pub fn forward(ended: &Ended) {
    let fd = forward_fd();
    if fd < 0 {
        return;
    }
    let bytes = ended.encode();
    // SAFETY: `fd` is the forwarding socket, open for the life of the process (kept by the
    // descriptor sweeps); send(2) reads `bytes` only.
    unsafe {
        libc::send(
            fd,
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
}

/// In the daemon: count and write what worker processes forward.
fn forward_loop(rx: &UnixDatagram) {
    let mut buf = vec![0u8; MAX_FORWARD];
    loop {
        let n = match rx.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let Some(e) = Ended::decode(&buf[..n]) else {
            continue;
        };
        crate::stats::listener(&e.listener).connection_ended(e.took, e.received, e.sent);
        if enabled() {
            line(access_line(
                &e.listener,
                &e.peer,
                e.took,
                e.received,
                e.sent,
                e.outcome,
                &e.tls,
            ));
        }
    }
}

/// What `socketd status` and the metrics show about the access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counts {
    pub target: String,
    pub written: u64,
    pub dropped: u64,
}

/// The access log's target and counters.
pub fn counts() -> Counts {
    let s = shared();
    Counts {
        target: s
            .current
            .lock()
            .map(|c| c.clone())
            .unwrap_or_else(|_| "?".into()),
        written: s.written.load(Relaxed),
        dropped: s.dropped.load(Relaxed),
    }
}

/// Whether the sink runs (the daemon); a library server without one logs access lines
/// through the `log` facade instead.
pub fn started() -> bool {
    SINK.get().is_some()
}

/// Whether access lines are wanted at all (so a worker can skip formatting them).
pub fn enabled() -> bool {
    SINK.get().is_some() && shared().enabled.load(Relaxed)
}

/// Start the writer thread for `target`. Call once, after the fork servers started (it starts
/// a thread); later changes go through `set_target`.
pub fn start(target: &AccessLogTarget, syslog: &SyslogConfig) -> std::io::Result<()> {
    let s = shared();
    let (tx, rx) = sync_channel(QUEUE_LINES);
    let mut writer = Writer::open(target, syslog);
    s.enabled.store(*target != AccessLogTarget::Off, Relaxed);
    set_current(target);
    let syslog = syslog.clone();
    std::thread::Builder::new()
        .name("socketd:access".into())
        .spawn(move || {
            writer_loop(&mut writer, &rx, s, &syslog);
        })?;
    let _ = SINK.set(Sink { tx, shared: s });
    if let Some(rx) = FORWARD_RX.lock().ok().and_then(|mut r| r.take()) {
        std::thread::Builder::new()
            .name("socketd:forwarded".into())
            .spawn(move || forward_loop(&rx))?;
    }
    Ok(())
}

fn set_current(target: &AccessLogTarget) {
    if let Ok(mut c) = shared().current.lock() {
        *c = target.describe();
    }
}

/// Hand one line to the writer, or drop and count it when the queue is full.
pub fn line(text: String) {
    let Some(sink) = SINK.get() else { return };
    if !sink.shared.enabled.load(Relaxed) {
        return;
    }
    match sink.tx.try_send(Msg::Line(text)) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
            sink.shared.dropped.fetch_add(1, Relaxed);
        }
    }
}

/// Reopen the file target (logrotate moved it away); a no-op for the other targets.
pub fn reopen() {
    shared().reopen.store(true, Relaxed);
    wake();
}

/// Switch to `target` (a reload changed `access_log`).
pub fn set_target(target: &AccessLogTarget) {
    let s = shared();
    if let Ok(mut r) = s.retarget.lock() {
        *r = Some(target.clone());
    }
    s.enabled.store(*target != AccessLogTarget::Off, Relaxed);
    set_current(target);
    wake();
}

/// At exit: wait (at most `timeout`) until the lines queued so far are written, so the last
/// connections' lines are not lost with the process.
pub fn flush(timeout: Duration) {
    let Some(sink) = SINK.get() else { return };
    let deadline = Instant::now() + timeout;
    let (tx, rx) = sync_channel(1);
    let mut msg = Msg::Flush(tx);
    loop {
        match sink.tx.try_send(msg) {
            Ok(()) => break,
            Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                msg = m;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return,
        }
    }
    let _ = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
}

fn wake() {
    if let Some(sink) = SINK.get() {
        // A full queue means the writer is busy and looks at the requests after its batch.
        let _ = sink.tx.try_send(Msg::Wake);
    }
}

/// Where the writer thread writes.
enum Writer {
    Off,
    Stderr {
        journald: bool,
    },
    /// The daemon log's own connection when it logs to syslog, else one of its own.
    Syslog(Option<Box<crate::logging::syslog::Syslog>>),
    File {
        path: std::path::PathBuf,
        file: Option<File>,
    },
}

fn open_file(path: &std::path::Path) -> std::io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

impl Writer {
    fn open(target: &AccessLogTarget, syslog: &SyslogConfig) -> Writer {
        match target {
            AccessLogTarget::Off => Writer::Off,
            AccessLogTarget::Stderr => Writer::Stderr {
                journald: std::env::var_os("JOURNAL_STREAM").is_some(),
            },
            AccessLogTarget::Syslog => Writer::Syslog(match crate::logging::shared_syslog() {
                Some(_) => None,
                None => Some(Box::new(crate::logging::syslog::Syslog::new(syslog))),
            }),
            AccessLogTarget::File(path) => {
                let file = match open_file(path) {
                    Ok(f) => Some(f),
                    Err(e) => {
                        log::error!(
                            "access log: cannot open {}: {e}; access lines are dropped until \
                             it can be (retried on SIGHUP and `socketd reopen-logs`)",
                            path.display()
                        );
                        None
                    }
                };
                Writer::File {
                    path: path.clone(),
                    file,
                }
            }
        }
    }

    fn reopen(&mut self) {
        if let Writer::File { path, file } = self {
            match open_file(path) {
                Ok(f) => {
                    *file = Some(f);
                    log::info!("access log: reopened {}", path.display());
                }
                Err(e) => log::error!("access log: cannot reopen {}: {e}", path.display()),
            }
        }
    }

    /// Write `lines` (each without its newline); returns how many were lost and why.
    fn write(&mut self, lines: &[String]) -> Result<(), (u64, String)> {
        let n = lines.len() as u64;
        let now = crate::logging::timestamp(std::time::SystemTime::now());
        match self {
            Writer::Off => Ok(()),
            Writer::Stderr { journald } => {
                let mut buf = String::new();
                for l in lines {
                    if *journald {
                        buf.push_str("<6>");
                    } else {
                        buf.push_str(&now);
                        buf.push(' ');
                    }
                    buf.push_str(l);
                    buf.push('\n');
                }
                std::io::stderr()
                    .lock()
                    .write_all(buf.as_bytes())
                    .map_err(|e| (n, e.to_string()))
            }
            Writer::Syslog(own) => {
                let shared = crate::logging::shared_syslog();
                let Some(s) = own.as_deref().or(shared) else {
                    return Ok(());
                };
                for l in lines {
                    s.log(
                        &log::Record::builder()
                            .level(log::Level::Info)
                            .args(format_args!("{l}"))
                            .build(),
                    );
                }
                Ok(())
            }
            Writer::File { path, file } => {
                let Some(f) = file.as_mut() else {
                    return Err((n, format!("{} is not open", path.display())));
                };
                let mut buf = String::new();
                for l in lines {
                    buf.push_str(&now);
                    buf.push(' ');
                    buf.push_str(l);
                    buf.push('\n');
                }
                // One write per batch: a short write on a full disk loses the batch, counted.
                f.write_all(buf.as_bytes()).map_err(|e| (n, e.to_string()))
            }
        }
    }
}

fn writer_loop(writer: &mut Writer, rx: &Receiver<Msg>, s: &'static Shared, syslog: &SyslogConfig) {
    let mut batch: Vec<String> = Vec::new();
    loop {
        let first = match rx.recv_timeout(REPORT_EVERY) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if let Some(t) = s.retarget.lock().ok().and_then(|mut r| r.take()) {
            *writer = Writer::open(&t, syslog);
        }
        if s.reopen.swap(false, Relaxed) {
            writer.reopen();
        }
        let mut bytes = 0;
        let mut next = first;
        let mut flushed = None;
        while let Some(m) = next.take() {
            match m {
                Msg::Line(l) => {
                    bytes += l.len() + 32;
                    batch.push(l);
                }
                Msg::Wake => {}
                Msg::Flush(done) => {
                    flushed = Some(done);
                    break;
                }
            }
            if bytes < BATCH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            match writer.write(&batch) {
                Ok(()) => {
                    s.written.fetch_add(batch.len() as u64, Relaxed);
                }
                Err((lost, why)) => {
                    s.dropped.fetch_add(lost, Relaxed);
                    if let Ok(mut r) = s.report.lock() {
                        r.last_error = why;
                    }
                }
            }
            batch.clear();
        }
        if let Some(done) = flushed {
            let _ = done.try_send(());
        }
    }
}

/// When the loop should call `report_drops` next (`None`: nothing to report).
pub fn next_report() -> Option<Instant> {
    let s = shared();
    let r = s.report.lock().ok()?;
    (s.dropped.load(Relaxed) > r.reported).then_some(r.at)
}

/// Called by the daemon's loop (never blocked by the sink, unlike the writer thread): say in
/// the daemon's log how many access lines were dropped, the first time at once, then at most
/// every `REPORT_EVERY`.
pub fn report_drops(now: Instant) {
    let s = shared();
    let dropped = s.dropped.load(Relaxed);
    let Ok(mut r) = s.report.lock() else { return };
    if dropped <= r.reported || now < r.at {
        return;
    }
    let why = if r.last_error.is_empty() {
        "the writer could not keep up (queue full)".to_string()
    } else {
        format!("last error: {}", r.last_error)
    };
    log::warn!(
        "access log: {} lines dropped ({dropped} since start; reported at most every {}s); {why}",
        dropped - r.reported,
        REPORT_EVERY.as_secs()
    );
    r.reported = dropped;
    r.last_error.clear();
    r.at = now + REPORT_EVERY;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_records_round_trip() {
        let peers = [
            PeerAddr::Inet("127.0.0.1:5".parse().unwrap()),
            PeerAddr::Inet("[fe80::1%3]:443".parse().unwrap()),
            PeerAddr::Unix {
                path: Some("/tmp/x.sock".into()),
                cred: Some(PeerCred {
                    pid: -1,
                    uid: 1000,
                    gid: 100,
                }),
            },
            PeerAddr::Unix {
                path: None,
                cred: None,
            },
        ];
        for (i, peer) in peers.into_iter().enumerate() {
            let e = Ended {
                listener: "fk-echo".into(),
                took: Duration::new(1, 234_567_891),
                received: Some(64),
                sent: (i % 2 == 0).then_some(u64::MAX),
                peer,
                outcome: OUTCOMES[i % 3],
                tls: if i == 1 {
                    " tls TLSv1.3".into()
                } else {
                    String::new()
                },
            };
            let bytes = e.encode();
            assert_eq!(Ended::decode(&bytes).as_ref(), Some(&e));
            assert_eq!(Ended::decode(&bytes[..bytes.len() - 1]), None, "cut short");
        }
        assert_eq!(Ended::decode(b""), None);
    }

    #[test]
    fn the_access_line_shape() {
        let peer = PeerAddr::Inet("127.0.0.1:51034".parse().unwrap());
        let took = Duration::from_nanos(1_204_000);
        assert_eq!(
            access_line("echo", &peer, took, Some(5), None, "ok", ""),
            "access: listener `echo` peer 127.0.0.1:51034 duration 1.204ms in 5 out - outcome ok"
        );
    }
}
