//! The access log's own sink (`[daemon] access_log`): one line per connection, kept apart from
//! the daemon's log so that a busy listener can never push lifecycle, reload and error lines
//! out (journald's rate limit counts every line of the service).
//!
//! Workers hand lines to a bounded queue (`QUEUE_LINES`) without waiting; one writer thread
//! writes them out. When the queue is full, or a write fails (a full disk, a stopped syslog
//! daemon), the line is dropped and counted; the count is shown by `socketd status` and the
//! metrics, and a warning goes to the daemon's log at most every `REPORT_EVERY`. A file target
//! is reopened on SIGHUP (every reload) and by `socketd reopen-logs`, for logrotate.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::config::{AccessLogTarget, SyslogConfig};

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
    s.enabled
        .store(*target != AccessLogTarget::Off, Relaxed);
    set_current(target);
    let syslog = syslog.clone();
    std::thread::Builder::new()
        .name("socketd:access".into())
        .spawn(move || {
            writer_loop(&mut writer, &rx, s, &syslog);
        })?;
    let _ = SINK.set(Sink { tx, shared: s });
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

fn wake() {
    if let Some(sink) = SINK.get() {
        // A full queue means the writer is busy and looks at the requests after its batch.
        let _ = sink.tx.try_send(Msg::Wake);
    }
}

/// Where the writer thread writes.
enum Writer {
    Off,
    Stderr { journald: bool },
    Syslog(Box<crate::daemon::syslog::Syslog>),
    File { path: std::path::PathBuf, file: Option<File> },
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
            AccessLogTarget::Syslog => {
                Writer::Syslog(Box::new(crate::daemon::syslog::Syslog::new(syslog)))
            }
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
            Writer::Syslog(s) => {
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

fn writer_loop(
    writer: &mut Writer,
    rx: &Receiver<Msg>,
    s: &'static Shared,
    syslog: &SyslogConfig,
) {
    let mut report_at = Instant::now() + REPORT_EVERY;
    let mut reported = 0u64;
    let mut last_error = String::new();
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
        while let Some(m) = next.take() {
            if let Msg::Line(l) = m {
                bytes += l.len() + 32;
                batch.push(l);
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
                    last_error = why;
                }
            }
            batch.clear();
        }
        let now = Instant::now();
        if now >= report_at {
            let dropped = s.dropped.load(Relaxed);
            if dropped > reported {
                let why = if last_error.is_empty() {
                    "the queue was full (the writer could not keep up)".to_string()
                } else {
                    format!("last error: {last_error}")
                };
                log::warn!(
                    "access log: {} lines dropped in the last {}s ({dropped} since start); {why}",
                    dropped - reported,
                    REPORT_EVERY.as_secs()
                );
                reported = dropped;
                last_error.clear();
            }
            report_at = now + REPORT_EVERY;
        }
    }
}
