//! The test harness: run the real daemon in a private temp dir, talk to it over real sockets,
//! signal it with `kill(2)`, and show its log whenever a test fails.
//!
//! Every topic file in this binary uses it the same way:
//!
//! ```ignore
//! let d = Daemon::start(r#"
//!     [[listener]]
//!     name = "echo"
//!     protocol = "unix"
//!     address = "{dir}/echo.sock"     # {dir} is the daemon's temp dir
//!     handler = "echo"
//! "#);
//! let mut s = d.connect("echo");      // a Stream, TCP or Unix by the listener's protocol
//! s.write_all(b"hi").unwrap();
//! d.signal(libc::SIGTERM);
//! assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
//! ```
//!
//! Rules the harness keeps so that no test can hang or collide with another:
//! - no fixed ports: configs bind port 0 and `Daemon::addr` reads the real one from the log;
//!   unix sockets go under `{dir}`;
//! - no bare sleeps for readiness: `wait_log` / `wait_ready` / `wait_exit` poll every
//!   `POLL` up to a deadline and panic with the daemon's log when it passes;
//! - every client socket has read and write timeouts (`IO_TIMEOUT`);
//! - signals go through `kill(2)`; `Drop` SIGKILLs a daemon that is still running and prints
//!   its log when the test is panicking;
//! - a watchdog SIGKILLs any daemon still alive after `WATCHDOG`, so even a test stuck in its
//!   own loop on a daemon socket ends.
//!
//! Custom daemons built from `examples/` (handlers the `socketd` binary does not have) run
//! through `example_bin("name")`, which builds the example once per test run.

#![allow(dead_code)] // a toolbox for every topic file; not every file uses every tool

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The daemon under test.
pub const SOCKETD: &str = env!("CARGO_BIN_EXE_socketd");

/// How long a daemon may take to say it is ready (generous: CI machines are slow).
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Read/write timeout on every client socket.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a stop with nothing in flight may take.
pub const STOP_BUDGET: Duration = Duration::from_secs(5);
/// Polling interval for every wait.
pub const POLL: Duration = Duration::from_millis(10);
/// Longest one whole client operation (`read_to_end_vec`, `read_line`) may take, however
/// the data trickles in: an endless stream (chargen) cannot hang a test.
pub const OP_DEADLINE: Duration = Duration::from_secs(30);
/// Longest a daemon may live in one test. Then a watchdog SIGKILLs it, so a test blocked on
/// one of its sockets gets EOF and fails (printing the log) instead of hanging the suite.
pub const WATCHDOG: Duration = Duration::from_secs(60);

/// Environment that would change how the daemon behaves (journald log format, socket
/// activation, sd_notify); removed so tests behave the same under systemd or CI.
const SCRUBBED_ENV: &[&str] = &[
    "JOURNAL_STREAM",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// A `Command` for the `socketd` binary with a clean environment; add arguments and run.
pub fn socketd_cmd() -> Command {
    command(Path::new(SOCKETD))
}

/// A `Command` for any daemon binary (socketd or an example) with a clean environment.
pub fn command(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// Replace `{dir}` in a config text with `dir`.
pub fn substitute(toml: &str, dir: &Path) -> String {
    toml.replace("{dir}", &dir.display().to_string())
}

/// A private temp dir holding a config file; what `check` and failed starts need.
#[derive(Debug)]
pub struct TestDir {
    dir: TempDir,
}

impl TestDir {
    pub fn new() -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix("socketd-it.")
            .tempdir()
            .expect("create a temp dir");
        TestDir { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Write `toml` (with `{dir}` substituted) to `name` in the dir, atomically (write a
    /// sibling, then rename, as editors and config tools do), and return its path.
    pub fn write(&self, name: &str, toml: &str) -> PathBuf {
        let path = self.path().join(name);
        let tmp = self.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, substitute(toml, self.path())).expect("write the config");
        std::fs::rename(&tmp, &path).expect("move the config into place");
        path
    }
}

/// What a finished command printed and how it exited.
#[derive(Debug)]
pub struct CmdOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    fn from(out: Output) -> CmdOutput {
        CmdOutput {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Exit code and both streams, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "exit: {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }

    /// The lines of stderr that are diagnostics for `file` (`file:line:col: message`).
    pub fn diagnostics(&self, file: &Path) -> Vec<String> {
        let prefix = format!("{}:", file.display());
        self.stderr
            .lines()
            .filter(|l| {
                l.strip_prefix(&prefix)
                    .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
            })
            .map(str::to_string)
            .collect()
    }
}

/// Run a command to completion with a deadline (it is killed if it runs over).
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> CmdOutput {
    let dir = TestDir::new();
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    cmd.stdout(File::create(&out_path).expect("stdout file"));
    cmd.stderr(File::create(&err_path).expect("stderr file"));
    let mut child = cmd.spawn().expect("spawn the command");
    let status = wait_child(&mut child, timeout).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{cmd:?} did not finish within {timeout:?}");
    });
    let read = |p: &Path| std::fs::read(p).unwrap_or_default();
    CmdOutput::from(Output {
        status,
        stdout: read(&out_path),
        stderr: read(&err_path),
    })
}

/// `socketd check --config FILE` on `toml` written into a fresh dir as `socketd.toml`.
/// Returns the output and the config's path (which the diagnostics name).
pub fn check(toml: &str) -> (CmdOutput, PathBuf, TestDir) {
    check_with(Path::new(SOCKETD), toml)
}

/// `check` with another daemon binary (an example).
pub fn check_with(bin: &Path, toml: &str) -> (CmdOutput, PathBuf, TestDir) {
    let dir = TestDir::new();
    let path = dir.write("socketd.toml", toml);
    let mut cmd = command(bin);
    cmd.arg("check").arg("--config").arg(&path);
    (run_with_timeout(cmd, READY_TIMEOUT), path, dir)
}

fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() >= deadline => return None,
            Ok(None) => std::thread::sleep(POLL),
            Err(e) => panic!("cannot wait for the child: {e}"),
        }
    }
}

/// Where a listener is, as the daemon logged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    /// `tcp`, `udp`, `unix` or `unix-dgram`.
    pub protocol: String,
    /// `127.0.0.1:43271`, `[::1]:5000` or a path.
    pub address: String,
}

/// A running (or exited) daemon process in its own temp dir.
pub struct Daemon {
    child: Child,
    dir: TestDir,
    config: PathBuf,
    log: PathBuf,
    status: Option<ExitStatus>,
    clients: AtomicUsize,
    watch: Arc<Watch>,
}

/// Shared between a `Daemon` and its watchdog thread. The pid is reaped only with `state`
/// locked and `reaped` set, and the watchdog kills only with it locked and `reaped` unset, so
/// it can never signal a recycled pid.
#[derive(Default)]
struct Watch {
    state: Mutex<WatchState>,
    wake: Condvar,
}

#[derive(Default)]
struct WatchState {
    reaped: bool,
    dropped: bool,
    fired: bool,
}

impl Watch {
    fn lock(&self) -> MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// SIGKILL `pid` at `WATCHDOG` unless it was reaped or its `Daemon` dropped first.
    fn start(self: &Arc<Watch>, pid: i32) {
        let watch = Arc::clone(self);
        let deadline = Instant::now() + WATCHDOG;
        std::thread::spawn(move || {
            let mut state = watch.lock();
            while !state.reaped && !state.dropped {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    // SAFETY: kill(2) has no memory effects; the pid is unreaped (see above).
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    state.fired = true;
                    eprintln!("watchdog: daemon {pid} still running after {WATCHDOG:?}; killed it");
                    return;
                }
                state = watch
                    .wake
                    .wait_timeout(state, left)
                    .map_or_else(|p| p.into_inner().0, |r| r.0);
            }
        });
    }
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("pid", &self.child.id())
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl Daemon {
    /// Start `socketd` on `config_toml` and wait until it logs `socketd ready`.
    pub fn start(config_toml: &str) -> Daemon {
        Daemon::start_bin(Path::new(SOCKETD), config_toml)
    }

    /// Start another daemon binary (see `example_bin`) and wait until it is ready.
    pub fn start_bin(bin: &Path, config_toml: &str) -> Daemon {
        let d = Daemon::spawn_bin(bin, config_toml);
        d.wait_ready();
        d
    }

    /// Start `socketd` without waiting for readiness: for daemons expected to fail at start.
    pub fn spawn(config_toml: &str) -> Daemon {
        Daemon::spawn_bin(Path::new(SOCKETD), config_toml)
    }

    /// Start `bin --config FILE` in a fresh temp dir, stdout and stderr to `daemon.log` there.
    pub fn spawn_bin(bin: &Path, config_toml: &str) -> Daemon {
        Daemon::spawn_args(bin, config_toml, &[])
    }

    /// As `spawn_bin`, with extra arguments after `--config FILE`.
    pub fn spawn_args(bin: &Path, config_toml: &str, args: &[&str]) -> Daemon {
        Daemon::spawn_with(config_toml, |_, config| {
            let mut cmd = command(bin);
            cmd.arg("--config").arg(config).args(args);
            cmd
        })
    }

    /// Start a daemon from a command the caller builds, given the temp dir and the config
    /// path: for wrappers (`systemd-socket-activate`), extra environment (`NOTIFY_SOCKET`) or
    /// sockets the test must create in the dir first. Output goes to the log as for `spawn`.
    pub fn spawn_with(config_toml: &str, build: impl FnOnce(&Path, &Path) -> Command) -> Daemon {
        let dir = TestDir::new();
        let config = dir.write("socketd.toml", config_toml);
        let log = dir.path().join("daemon.log");
        let out = File::create(&log).expect("create the log file");
        let err = out.try_clone().expect("clone the log file");
        let mut cmd = build(dir.path(), &config);
        cmd.current_dir(dir.path()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let watch = Arc::new(Watch::default());
        watch.start(i32::try_from(child.id()).expect("pid fits in i32"));
        Daemon {
            child,
            dir,
            config,
            log,
            status: None,
            clients: AtomicUsize::new(0),
            watch,
        }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits in i32")
    }

    /// The daemon's temp dir (what `{dir}` stood for).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The config file the daemon was started with.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Replace the config file (atomically, `{dir}` substituted), e.g. before a SIGHUP.
    pub fn write_config(&self, config_toml: &str) {
        self.dir.write("socketd.toml", config_toml);
    }

    /// Everything the daemon has logged so far (stdout and stderr).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Wait until the log has a line containing `needle`; returns that line. Panics (with
    /// the log) on timeout, or if the daemon exits first without logging it.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        self.wait_log_count(needle, 1, timeout)
    }

    /// Wait until `count` lines contain `needle` (e.g. the second `socketd ready` after a
    /// reload); returns the last of them.
    pub fn wait_log_count(&self, needle: &str, count: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            // Read the log before looking at the process, so a line written just before
            // exiting is still seen.
            let log = self.log();
            let found: Vec<&str> = log.lines().filter(|l| l.contains(needle)).collect();
            if found.len() >= count {
                return found[count - 1].to_string();
            }
            let exited = self.try_status();
            assert!(
                exited.is_none(),
                "daemon exited ({exited:?}) before logging {needle:?} x{count}\n{}",
                self.log_dump()
            );
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {needle:?} x{count} in the log\n{}",
                self.log_dump()
            );
            std::thread::sleep(POLL);
        }
    }

    /// Wait for `socketd ready: N listeners`; returns N.
    pub fn wait_ready(&self) -> usize {
        let line = self.wait_log("socketd ready: ", READY_TIMEOUT);
        let n = line
            .split("socketd ready: ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok());
        n.unwrap_or_else(|| panic!("cannot read the listener count in {line:?}"))
    }

    /// Where listener `name` is bound, from the latest `listener `NAME` listening on PROTO
    /// ADDR` line (so a reload that re-binds is picked up).
    pub fn bound(&self, name: &str) -> Bound {
        let marker = format!("listener `{name}` listening on ");
        let log = self.log();
        let line = log.lines().rev().find_map(|l| l.split(&marker).nth(1));
        let parsed = line.and_then(|rest| {
            let (protocol, address) = rest.trim_end().split_once(' ')?;
            Some(Bound {
                protocol: protocol.to_string(),
                address: address.to_string(),
            })
        });
        parsed.unwrap_or_else(|| {
            panic!(
                "no `{marker}` line for listener {name:?}\n{}",
                self.log_dump()
            )
        })
    }

    /// The IP address listener `name` is bound to (port 0 resolved).
    pub fn addr(&self, name: &str) -> SocketAddr {
        let b = self.bound(name);
        b.address
            .parse()
            .unwrap_or_else(|e| panic!("listener {name:?} address {b:?} is not ip:port: {e}"))
    }

    /// The socket path of unix listener `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        PathBuf::from(self.bound(name).address)
    }

    /// A connected stream client (TCP or Unix, by the listener's protocol) with timeouts.
    pub fn connect(&self, name: &str) -> Stream {
        let b = self.bound(name);
        match b.protocol.as_str() {
            "tcp" => Stream::tcp(self.addr(name)),
            "unix" => Stream::unix(&self.path(name)),
            other => panic!("listener {name:?} is {other}, not a stream listener"),
        }
    }

    /// A datagram client (UDP, or Unix datagram bound to its own path in the temp dir so it
    /// can receive replies) with timeouts, connected to listener `name`.
    pub fn dgram(&self, name: &str) -> Dgram {
        let b = self.bound(name);
        match b.protocol.as_str() {
            "udp" => Dgram::udp(self.addr(name)),
            "unix-dgram" => {
                let n = self.clients.fetch_add(1, Ordering::Relaxed);
                let own = self.dir().join(format!("client-{n}.sock"));
                Dgram::unix(&self.path(name), &own)
            }
            other => panic!("listener {name:?} is {other}, not a datagram listener"),
        }
    }

    /// Send `signal` with kill(2).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) has no memory effects; the pid is our own child, not yet reaped
        // while `self.child` is alive (a reaped pid is never signalled: see `try_status`).
        if self.status.is_none() {
            let rc = unsafe { libc::kill(self.pid(), signal) };
            assert_eq!(
                rc,
                0,
                "kill({}, {signal}): {}",
                self.pid(),
                io::Error::last_os_error()
            );
        }
    }

    /// The exit status if the daemon has exited (without blocking).
    pub fn try_status(&self) -> Option<ExitStatus> {
        if let Some(s) = self.status {
            return Some(s);
        }
        // `try_wait` needs `&mut`; peek with waitid(WNOWAIT) so the pid stays unreaped and
        // `signal` can never hit a recycled pid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable siginfo_t; WNOWAIT leaves the child waitable.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                self.child.id(),
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: waitid filled `info` (si_pid is 0 when the child is still running).
        if rc == 0 && unsafe { info.si_pid() } != 0 {
            let (code, status) = unsafe { (info.si_code, info.si_status()) };
            return Some(if code == libc::CLD_EXITED {
                ExitStatus::from_raw((status & 0xff) << 8)
            } else {
                ExitStatus::from_raw(status & 0x7f)
            });
        }
        None
    }

    /// Whether the process is still running.
    pub fn is_running(&self) -> bool {
        self.try_status().is_none()
    }

    /// Wait for the daemon to exit; panics with the log if it is still running at `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.reap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "daemon still running {timeout:?} after being asked to exit\n{}",
                self.log_dump()
            );
            std::thread::sleep(POLL);
        }
    }

    /// Reap the process if it has exited (see `Watch` for why under the lock).
    fn reap(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            let mut state = self.watch.lock();
            match self.child.try_wait() {
                Ok(Some(s)) => {
                    state.reaped = true;
                    self.status = Some(s);
                    self.watch.wake.notify_all();
                }
                Ok(None) => {}
                Err(e) => panic!("cannot wait for the daemon: {e}"),
            }
        }
        self.status
    }

    /// The log framed for a failure message.
    pub fn log_dump(&self) -> String {
        let killed = if self.watch.lock().fired {
            format!("(the test watchdog SIGKILLed the daemon after {WATCHDOG:?})\n")
        } else {
            String::new()
        };
        format!(
            "=== daemon log ({}) ===\n{}{killed}=== end of daemon log ===",
            self.log.display(),
            self.log()
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        {
            let mut state = self.watch.lock();
            if self.status.is_none() {
                if let Ok(None) = self.child.try_wait() {
                    // SIGKILL: only for leftovers, never as a test's way to stop the daemon.
                    let _ = self.child.kill();
                }
                let _ = self.child.wait();
                state.reaped = true;
            }
            state.dropped = true;
            self.watch.wake.notify_all();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log_dump());
        }
    }
}

/// A stream client: TCP or Unix, with read and write timeouts.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn tcp(addr: SocketAddr) -> Stream {
        let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
        s.set_write_timeout(Some(IO_TIMEOUT))
            .expect("write timeout");
        Stream::Tcp(s)
    }

    pub fn unix(path: &Path) -> Stream {
        let s = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
        s.set_write_timeout(Some(IO_TIMEOUT))
            .expect("write timeout");
        Stream::Unix(s)
    }

    pub fn set_read_timeout(&self, t: Duration) {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(Some(t)),
            Stream::Unix(s) => s.set_read_timeout(Some(t)),
        }
        .expect("set read timeout");
    }

    /// Half-close: the server sees end of input, the client can still read.
    pub fn shutdown_write(&self) {
        match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
        }
        .expect("shutdown(SHUT_WR)");
    }

    pub fn try_clone(&self) -> Stream {
        match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone().expect("clone")),
            Stream::Unix(s) => Stream::Unix(s.try_clone().expect("clone")),
        }
    }

    /// Read exactly `n` bytes (panics on timeout or early end).
    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        self.read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("reading {n} bytes: {e}"));
        buf
    }

    /// Read up to and including the next `\n` (panics on timeout; stops early at EOF).
    pub fn read_line(&mut self) -> String {
        let deadline = Instant::now() + OP_DEADLINE;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            assert!(
                Instant::now() < deadline,
                "no newline within {OP_DEADLINE:?} (got {:?})",
                lossy(&line)
            );
            match self.read(&mut byte) {
                Ok(0) => break,
                Ok(_) => {
                    line.push(byte[0]);
                    if byte[0] == b'\n' {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("reading a line (got {:?} so far): {e}", lossy(&line)),
            }
        }
        String::from_utf8_lossy(&line).into_owned()
    }

    /// Read until the server closes (panics on timeout, or if EOF has not come within
    /// `OP_DEADLINE` while data kept arriving).
    pub fn read_to_end_vec(&mut self) -> Vec<u8> {
        let deadline = Instant::now() + OP_DEADLINE;
        let mut all = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match self.read(&mut buf) {
                Ok(0) => return all,
                Ok(n) => all.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("reading to EOF (got {} bytes): {e}", all.len()),
            }
            assert!(
                Instant::now() < deadline,
                "no EOF within {OP_DEADLINE:?} ({} bytes so far)",
                all.len()
            );
        }
    }

    /// Whether the server has closed the connection: EOF (or a reset) within `timeout`.
    /// Data that arrives instead is an error.
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        self.set_read_timeout(timeout);
        let mut buf = [0u8; 256];
        let got = match self.read(&mut buf) {
            Ok(0) => true,
            Ok(n) => panic!(
                "expected the connection closed, got data {:?}",
                lossy(&buf[..n])
            ),
            Err(e) if is_timeout(&e) => false,
            Err(_) => true,
        };
        self.set_read_timeout(IO_TIMEOUT);
        got
    }

    /// Whether nothing arrives (no data, no EOF) for `quiet`.
    pub fn silent_for(&mut self, quiet: Duration) -> bool {
        self.set_read_timeout(quiet);
        let mut buf = [0u8; 1];
        let silent = matches!(self.read(&mut buf), Err(e) if is_timeout(&e));
        self.set_read_timeout(IO_TIMEOUT);
        silent
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A datagram client: UDP or Unix datagram, connected to the listener, with timeouts.
/// A Unix one is bound to its own path (removed on drop) so the daemon can answer it.
#[derive(Debug)]
pub enum Dgram {
    Udp(UdpSocket),
    Unix(UnixDatagram, PathBuf),
}

impl Dgram {
    pub fn udp(server: SocketAddr) -> Dgram {
        let local: SocketAddr = if server.is_ipv4() {
            "127.0.0.1:0".parse().expect("v4")
        } else {
            "[::1]:0".parse().expect("v6")
        };
        let s = UdpSocket::bind(local).expect("bind a UDP client");
        s.connect(server).expect("connect the UDP client");
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
        s.set_write_timeout(Some(IO_TIMEOUT))
            .expect("write timeout");
        Dgram::Udp(s)
    }

    pub fn unix(server: &Path, own: &Path) -> Dgram {
        let s = UnixDatagram::bind(own)
            .unwrap_or_else(|e| panic!("bind a unix datagram client at {}: {e}", own.display()));
        s.connect(server)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", server.display()));
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
        s.set_write_timeout(Some(IO_TIMEOUT))
            .expect("write timeout");
        Dgram::Unix(s, own.to_path_buf())
    }

    pub fn send(&self, data: &[u8]) {
        let sent = match self {
            Dgram::Udp(s) => s.send(data),
            Dgram::Unix(s, _) => s.send(data),
        }
        .unwrap_or_else(|e| panic!("send a {}-byte datagram: {e}", data.len()));
        assert_eq!(sent, data.len(), "datagram sent whole");
    }

    /// Receive one datagram (panics on timeout).
    pub fn recv(&self) -> Vec<u8> {
        self.try_recv(IO_TIMEOUT)
            .unwrap_or_else(|| panic!("no datagram within {IO_TIMEOUT:?}"))
    }

    /// Receive one datagram, or `None` if none arrives within `timeout`.
    pub fn try_recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 70_000];
        let got = match self {
            Dgram::Udp(s) => s
                .set_read_timeout(Some(timeout))
                .and_then(|()| s.recv(&mut buf)),
            Dgram::Unix(s, _) => s
                .set_read_timeout(Some(timeout))
                .and_then(|()| s.recv(&mut buf)),
        };
        match got {
            Ok(n) => {
                buf.truncate(n);
                Some(buf)
            }
            Err(e) if is_timeout(&e) => None,
            Err(e) => panic!("receive a datagram: {e}"),
        }
    }

    /// Send `data` and return the one reply.
    pub fn request(&self, data: &[u8]) -> Vec<u8> {
        self.send(data);
        self.recv()
    }
}

impl Drop for Dgram {
    fn drop(&mut self) {
        if let Dgram::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Read timeouts surface as WouldBlock on Linux and TimedOut elsewhere.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Whether this machine has an IPv6 loopback to bind; tests that need it skip (and say so)
/// when it does not.
pub fn have_ipv6() -> bool {
    static HAVE: OnceLock<bool> = OnceLock::new();
    *HAVE.get_or_init(|| std::net::TcpListener::bind("[::1]:0").is_ok())
}

/// `true` and a printed reason when the IPv6 loopback is missing: `if skip_without_ipv6() { return; }`.
pub fn skip_without_ipv6() -> bool {
    if have_ipv6() {
        return false;
    }
    eprintln!("skipped: this machine has no IPv6 loopback ([::1] cannot be bound)");
    true
}

/// Deterministic pseudo-random bytes (xorshift64*), so a failure can be replayed.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Text for a failure message, with non-UTF-8 bytes escaped.
pub fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `haystack` contains every one of `needles`; the message shows which is missing and where.
#[track_caller]
pub fn assert_contains(haystack: &str, needles: &[&str]) {
    for needle in needles {
        assert!(
            haystack.contains(needle),
            "expected to find:\n  {needle:?}\nin:\n{haystack}"
        );
    }
}

/// Byte strings equal; on failure shows the lengths and the first differing offset with
/// some context instead of dumping megabytes.
#[track_caller]
pub fn assert_bytes_eq(expected: &[u8], actual: &[u8]) {
    if expected == actual {
        return;
    }
    let at = expected
        .iter()
        .zip(actual)
        .position(|(a, b)| a != b)
        .unwrap_or(expected.len().min(actual.len()));
    let window = |b: &[u8]| {
        let end = (at + 16).min(b.len());
        format!("{:02x?}", &b[at.saturating_sub(8).min(end)..end])
    };
    panic!(
        "byte strings differ: expected {} bytes, got {}; first difference at offset {at}\n  \
         expected: {}\n  actual:   {}",
        expected.len(),
        actual.len(),
        window(expected),
        window(actual)
    );
}

/// An exit status with the given code; on failure shows the status and the daemon log.
#[track_caller]
pub fn assert_exit_code(status: ExitStatus, code: i32, d: &Daemon) {
    assert_eq!(
        status.code(),
        Some(code),
        "expected exit code {code}, got {status:?}\n{}",
        d.log_dump()
    );
}

/// Poll `cond` every `POLL` until it holds; panics with `what` after `timeout`.
#[track_caller]
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// The path of example binary `name` (from `examples/NAME.rs`), built once per test run with
/// the same cargo and profile as this test binary. `cargo test` alone does not build examples
/// that integration tests could run, so this does.
pub fn example_bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(Mutex::default);
    // Hold the lock while building: cargo serializes builds anyway, and a second test that
    // wants the same example waits for the first build instead of starting its own.
    let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(path) = built.get(name) {
        return path.clone();
    }
    let path = build_example(name);
    built.insert(name.to_string(), path.clone());
    path
}

fn build_example(name: &str) -> PathBuf {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "build",
            "--quiet",
            "--message-format=json-render-diagnostics",
            "--example",
            name,
        ])
        .args(["--profile", &profile_of_this_binary()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Diagnostics are rendered to stderr as text; stdout holds only the JSON artifacts.
    assert!(
        out.status.success(),
        "building example {name} failed: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let marker = "\"executable\":\"";
    let exe = stdout
        .lines()
        .filter(|l| {
            l.contains("\"compiler-artifact\"") && l.contains(&format!("\"name\":\"{name}\""))
        })
        .filter_map(|l| l.split(marker).nth(1)?.split('"').next())
        .next_back()
        .map(PathBuf::from);
    exe.unwrap_or_else(|| panic!("cargo did not report the executable of example {name}\n{stdout}"))
}

/// The cargo profile this test binary was built with, from its directory
/// (`target/<profile-dir>/deps/it-HASH`; the `dev` profile's dir is `debug`).
fn profile_of_this_binary() -> String {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
        .unwrap_or("debug");
    match dir {
        "debug" => "dev".to_string(),
        other => other.to_string(),
    }
}

/// Pids whose parent is `pid`, from /proc.
pub fn children_of(pid: i32) -> Vec<i32> {
    crate::forked::processes()
        .into_iter()
        .filter(|(_, ppid, _)| *ppid == pid)
        .map(|(p, _, _)| p)
        .collect()
}

/// Names of the threads of `pid`.
pub fn thread_names(pid: i32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let p = e.ok()?.path().join("comm");
        Some(std::fs::read_to_string(p).ok()?.trim().to_string())
    })
    .collect()
}
