//! Binary upgrade, the running (old) process's side: start the new binary with every
//! listening socket, then watch it until it says it is serving, fails, or runs out of time.
//!
//! Nothing here is a socketd-only protocol where one already exists:
//! - the sockets go by fd inheritance with systemd's socket-activation variables
//!   (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`: sd_listen_fds(3)), named after their
//!   listeners, so the new process adopts them exactly as it adopts systemd's;
//! - readiness comes back over the same one-line pipe `--daemon` uses (`ok`, or
//!   `exit CODE why`: see `detach::ReadyPipe`), whose descriptor number is in
//!   `SOCKETD_UPGRADE_READY_FD`;
//! - the new process's stderr is a pipe until it is ready: the old process copies it through to
//!   its own stderr and keeps the tail, so a failed upgrade reports what the new binary said.
//!   The new process gets the real stderr back (descriptor `SOCKETD_UPGRADE_STDERR_FD`) before
//!   it starts any worker process;
//! - a pidfd tells the old process when the new one exits.
//!
//! `LISTEN_PID` must be the new process's own pid, known only after `fork`; so the child is
//! forked by hand (not `std::process::Command`), and writes its pid into an environment entry
//! prepared with room for it, then `execve`s. Between `fork` and `execve` the child makes only
//! async-signal-safe calls (`dup2`, `close_range`, `sigprocmask`, `signal`, `getpid`, `write`),
//! since the old process has other threads. Every descriptor other than stdin, stdout, the
//! stderr pipe, the sockets and the two pipe ends is closed in the child: the old process's
//! fork servers, wake-up descriptors, syslog and control sockets never reach the new binary.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// The readiness pipe's write end in the new process (`ok` / `exit CODE why`).
pub const ENV_READY_FD: &str = "SOCKETD_UPGRADE_READY_FD";
/// The real stderr, for the new process to put back once its start-up output is read.
pub const ENV_STDERR_FD: &str = "SOCKETD_UPGRADE_STDERR_FD";
/// The old process's pid (the new one's parent), for logs and the pidfile hand-over.
pub const ENV_FROM: &str = "SOCKETD_UPGRADE_FROM";
/// Names (`:`-separated, as `LISTEN_FDNAMES`) of unix listeners whose socket file socketd
/// created: the new process removes those files when it stops for good, as the old would have.
pub const ENV_OWNED: &str = "SOCKETD_UPGRADE_OWNED";
/// Names of sockets the old process had from the service manager (socket activation or the
/// fd store): bound where the unit says, so adopted by name whatever their address.
pub const ENV_MANAGER: &str = "SOCKETD_UPGRADE_MANAGER";

/// The pidfile's descriptor: the new process writes its pid into the same locked file.
pub const ENV_PIDFILE_FD: &str = "SOCKETD_UPGRADE_PIDFILE_FD";

/// The locked pidfile's descriptor, if this process has one (`share_pidfile`).
static PIDFILE_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Hand the pidfile (open and locked, kept open by the caller for the life of the process) to
/// the new process of an upgrade, so the lock passes over with no gap.
pub fn share_pidfile(fd: BorrowedFd<'_>) {
    PIDFILE_FD.store(fd.as_raw_fd(), std::sync::atomic::Ordering::Relaxed);
}

/// How much of the new process's start-up output is kept for the failure report.
const TAIL: usize = 4096;

/// The binary socketd was started from, read at start-up: after a package replaces the file,
/// `/proc/self/exe` names the deleted one, and an upgrade must start the file at the path.
static OWN_BINARY: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Remember where this process's binary is; call once at start-up.
pub fn remember_own_binary() {
    OWN_BINARY.get_or_init(|| std::env::current_exe().ok());
}

/// The binary an upgrade starts by default: the one socketd was started from.
pub fn own_binary() -> Option<PathBuf> {
    OWN_BINARY
        .get_or_init(|| std::env::current_exe().ok())
        .clone()
}

/// One listening socket to hand over.
#[derive(Debug)]
pub struct Handed<'a> {
    /// The listener's name: the new process adopts the socket for the listener of that name.
    pub name: &'a str,
    pub fd: BorrowedFd<'a>,
    /// A unix socket file socketd created (and so removes when it stops for good).
    pub owned_file: bool,
    /// A socket the service manager passed to the old process.
    pub from_manager: bool,
}

/// The new process, started and not yet judged.
#[derive(Debug)]
pub struct Started {
    pub pid: Pid,
    pub binary: PathBuf,
    pub pidfd: OwnedFd,
    /// Read ends, non-blocking.
    pub ready: File,
    pub output: File,
    pub deadline: Instant,
    timeout: Duration,
    ready_text: Vec<u8>,
    ready_eof: bool,
    tail: Vec<u8>,
}

/// What the new process has said so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    Waiting,
    Ready,
    Failed(String),
}

/// Start `binary` with this process's arguments and environment plus `extra_env`, handing it
/// `sockets` as fds 3.. with `LISTEN_*`. It has until `timeout` to say it is ready.
pub fn spawn(
    binary: &Path,
    sockets: &[Handed<'_>],
    extra_env: &[(OsString, OsString)],
    timeout: Duration,
) -> io::Result<Started> {
    let n = sockets.len();
    let ready_at = 3 + n as RawFd;
    let stderr_at = ready_at + 1;
    let pidfile_at = stderr_at + 1;
    // Every descriptor the child moves into place is first duplicated at or above `base`, so
    // moving one never overwrites another still to be moved.
    let base = pidfile_at + 1;
    let (ready_r, ready_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let high = |fd: BorrowedFd<'_>| -> io::Result<OwnedFd> {
        let raw = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(base))?;
        // SAFETY: F_DUPFD_CLOEXEC just returned this new descriptor, owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    };
    let mut moves: Vec<(OwnedFd, RawFd)> = Vec::with_capacity(n + 3);
    for (i, s) in sockets.iter().enumerate() {
        moves.push((high(s.fd)?, 3 + i as RawFd));
    }
    moves.push((high(ready_w.as_fd())?, ready_at));
    moves.push((high(io::stderr().as_fd())?, stderr_at));
    moves.push((high(out_w.as_fd())?, 2));
    drop((ready_w, out_w));
    let pidfile = PIDFILE_FD.load(std::sync::atomic::Ordering::Relaxed);
    if pidfile >= 0 {
        // SAFETY: `share_pidfile`'s caller keeps this descriptor open for the process's life.
        let fd = unsafe { BorrowedFd::borrow_raw(pidfile) };
        moves.push((high(fd)?, pidfile_at));
    }

    let names: Vec<&str> = sockets.iter().map(|s| s.name).collect();
    let owned: Vec<&str> = sockets
        .iter()
        .filter(|s| s.owned_file)
        .map(|s| s.name)
        .collect();
    let manager: Vec<&str> = sockets
        .iter()
        .filter(|s| s.from_manager)
        .map(|s| s.name)
        .collect();
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| !replaced_var(k))
        .collect();
    let mut add = |k: &str, v: String| env.push((k.into(), v.into()));
    add("LISTEN_FDS", n.to_string());
    add("LISTEN_FDNAMES", names.join(":"));
    add(ENV_READY_FD, ready_at.to_string());
    add(ENV_STDERR_FD, stderr_at.to_string());
    add(ENV_FROM, std::process::id().to_string());
    add(ENV_OWNED, owned.join(":"));
    add(ENV_MANAGER, manager.join(":"));
    if pidfile >= 0 {
        add(ENV_PIDFILE_FD, pidfile_at.to_string());
    }
    env.extend(extra_env.iter().cloned());
    let mut env: Vec<Vec<u8>> = env
        .into_iter()
        .map(|(k, v)| {
            let mut e = k.as_bytes().to_vec();
            e.push(b'=');
            e.extend_from_slice(v.as_bytes());
            e
        })
        .filter(|e| !e.contains(&0))
        .map(|mut e| {
            e.push(0);
            e
        })
        .collect();
    // LISTEN_PID=<the child's pid>, written by the child into this room.
    const PID_KEY: &[u8] = b"LISTEN_PID=";
    let mut pid_entry = PID_KEY.to_vec();
    pid_entry.extend_from_slice(&[0u8; 24]);
    env.push(pid_entry);

    let path = cstring(binary.as_os_str())?;
    let mut argv: Vec<CString> = vec![path.clone()];
    for a in std::env::args_os().skip(1) {
        argv.push(cstring(&a)?);
    }
    let argv_ptrs: Vec<*const libc::c_char> = argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let pid_slot: *mut u8 = env
        .last_mut()
        .map(|e| e[PID_KEY.len()..].as_mut_ptr())
        .unwrap_or(std::ptr::null_mut());
    let env_ptrs: Vec<*const libc::c_char> = env
        .iter()
        .map(|e| e.as_ptr().cast())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let plan: Vec<(RawFd, RawFd)> = moves.iter().map(|(f, to)| (f.as_raw_fd(), *to)).collect();
    let report = (moves[n].0.as_raw_fd(), ready_at);

    // SAFETY: fork in a multi-threaded process; the child only calls async-signal-safe
    // functions on memory prepared above (see `child`) and then execs or exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: in the child; every pointer points into buffers that outlive the call.
        unsafe {
            child(
                &plan,
                report,
                base,
                path.as_ptr(),
                &argv_ptrs,
                &env_ptrs,
                pid_slot,
            )
        }
    }
    drop(moves);
    let pid = Pid::from_raw(pid);
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1. The child is
    // unreaped, so the pid is still this child's even if it already exited.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0 as libc::c_uint) };
    let pidfd = match RawFd::try_from(raw) {
        // SAFETY: the syscall just returned this descriptor, owned by nobody else.
        Ok(fd) if fd >= 0 => unsafe { OwnedFd::from_raw_fd(fd) },
        _ => {
            let e = io::Error::last_os_error();
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
            return Err(e);
        }
    };
    for fd in [&ready_r, &out_r] {
        fcntl(fd.as_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    }
    Ok(Started {
        pid,
        binary: binary.to_path_buf(),
        pidfd,
        ready: File::from(ready_r),
        output: File::from(out_r),
        deadline: Instant::now() + timeout,
        timeout,
        ready_text: Vec::new(),
        ready_eof: false,
        tail: Vec::new(),
    })
}

/// Variables this process must not pass on as they are: its own socket-activation and
/// upgrade variables, and the manager's (given again, for the child, by `extra_env`).
fn replaced_var(k: &OsStr) -> bool {
    let k = k.as_bytes();
    k.starts_with(b"LISTEN_")
        || k.starts_with(b"SOCKETD_UPGRADE_")
        || k.starts_with(b"WATCHDOG_")
        || k == b"NOTIFY_SOCKET"
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} contains a NUL byte", s.to_string_lossy()),
        )
    })
}

/// The child between fork and exec. Only async-signal-safe calls.
///
/// # Safety
/// Call only in a freshly forked child; `path`, `argv`, `envp` are NUL-terminated as execve
/// wants, `pid_slot` has room for a pid and a NUL. `report` is the readiness pipe before and
/// after the moves, for a failure word.
unsafe fn child(
    plan: &[(RawFd, RawFd)],
    report: (RawFd, RawFd),
    base: RawFd,
    path: *const libc::c_char,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    pid_slot: *mut u8,
) -> ! {
    for &(from, to) in plan {
        if libc::dup2(from, to) < 0 {
            fail(report.0, "dup2");
        }
    }
    let ready_at = report.1;
    // Everything at or above `base` goes: the old process's descriptors and the staging dups.
    if libc::syscall(
        libc::SYS_close_range,
        base as libc::c_uint,
        libc::c_uint::MAX,
        0,
    ) != 0
    {
        fail(ready_at, "close_range");
    }
    let mut none: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut none);
    libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    if !pid_slot.is_null() {
        write_decimal(pid_slot, libc::getpid() as u64);
    }
    libc::execve(path, argv.as_ptr(), envp.as_ptr());
    fail(ready_at, "execve")
}

/// Tell the old process which call failed and how (`exec-failed CALL ERRNO`), then exit 127.
unsafe fn fail(ready_fd: RawFd, call: &str) -> ! {
    let errno = *libc::__errno_location();
    let mut msg = [0u8; 64];
    let head = b"exec-failed ";
    let mut at = 0;
    for &b in head.iter().chain(call.as_bytes()).chain(b" ") {
        if at < msg.len() - 24 {
            msg[at] = b;
            at += 1;
        }
    }
    let digits = write_decimal(msg.as_mut_ptr().add(at), errno.max(0) as u64);
    at += digits;
    msg[at] = b'\n';
    if ready_fd >= 0 {
        libc::write(ready_fd, msg.as_ptr().cast(), at + 1);
    }
    libc::_exit(127)
}

/// Write `n` in decimal at `out`, NUL-terminated; returns the number of digits.
unsafe fn write_decimal(out: *mut u8, mut n: u64) -> usize {
    let mut digits = [0u8; 20];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        *out.add(i) = digits[len - 1 - i];
    }
    *out.add(len) = 0;
    len
}

impl Started {
    /// Read what the new process wrote on the readiness pipe.
    pub fn on_ready_pipe(&mut self) -> Progress {
        let mut buf = [0u8; 1024];
        loop {
            match self.ready.read(&mut buf) {
                Ok(0) => {
                    self.ready_eof = true;
                    break;
                }
                Ok(k) => self.ready_text.extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let Some(end) = self.ready_text.iter().position(|b| *b == b'\n') else {
            // Closed without a word: it is exiting (the pidfd says when) or misbehaving
            // (the deadline says when).
            return Progress::Waiting;
        };
        let line = String::from_utf8_lossy(&self.ready_text[..end]).into_owned();
        parse_word(line.trim())
    }

    /// Copy the new process's start-up output to this process's stderr and keep its tail.
    pub fn on_output(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            match self.output.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => {
                    let _ = io::stderr().write_all(&buf[..k]);
                    self.tail.extend_from_slice(&buf[..k]);
                    if self.tail.len() > TAIL {
                        self.tail.drain(..self.tail.len() - TAIL);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }

    /// The new process exited (its pidfd is readable): reap it and say how it ended.
    pub fn on_exit(&mut self) -> Progress {
        self.on_output();
        // A last word may have been written just before exiting.
        if let Progress::Failed(why) = self.on_ready_pipe() {
            let _ = nix::sys::wait::waitpid(self.pid, None);
            return Progress::Failed(why);
        }
        let status = match nix::sys::wait::waitpid(self.pid, None) {
            Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => format!("with status {code}"),
            Ok(nix::sys::wait::WaitStatus::Signaled(_, sig, _)) => format!("on {sig}"),
            Ok(other) => format!("({other:?})"),
            Err(e) => format!("(cannot wait for it: {e})"),
        };
        Progress::Failed(format!(
            "the new process (pid {}) exited {status} before it was ready{}",
            self.pid,
            self.output_said()
        ))
    }

    /// `Some(why)` once the deadline has passed without a word.
    pub fn expired(&mut self, now: Instant) -> Option<String> {
        if now < self.deadline {
            return None;
        }
        self.on_output();
        Some(format!(
            "the new process (pid {}) was not ready within {}{}",
            self.pid,
            humantime::format_duration(self.timeout),
            self.output_said()
        ))
    }

    /// The new process's last lines of output, for a failure message.
    fn output_said(&self) -> String {
        let text = String::from_utf8_lossy(&self.tail);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.is_empty() {
            return "; it printed nothing".to_string();
        }
        let last: Vec<&str> = lines.iter().rev().take(5).rev().copied().collect();
        format!("; its output ended with: {}", last.join(" | "))
    }

    /// Give up on the new process: SIGKILL it and reap it on a thread (it may take a moment).
    pub fn abandon(self) {
        let pid = self.pid;
        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
        drop(self.pidfd);
        let reaper = std::thread::Builder::new().name("upgrade-reap".into());
        let spawned = reaper.spawn(move || {
            let _ = nix::sys::wait::waitpid(pid, None);
        });
        if spawned.is_err() {
            let _ = nix::sys::wait::waitpid(pid, None);
        }
    }
}

/// The readiness pipe's one line: `ok`, `exit CODE why`, or `exec-failed CALL ERRNO`.
fn parse_word(line: &str) -> Progress {
    if line == "ok" {
        return Progress::Ready;
    }
    if let Some(rest) = line.strip_prefix("exec-failed ") {
        let (call, errno) = rest.split_once(' ').unwrap_or((rest, ""));
        let e = errno
            .parse()
            .map(io::Error::from_raw_os_error)
            .map_or_else(|_| errno.to_string(), |e| e.to_string());
        return Progress::Failed(format!("cannot start the new binary ({call}: {e})"));
    }
    if let Some(rest) = line.strip_prefix("exit ") {
        let (code, why) = rest.split_once(' ').unwrap_or((rest, ""));
        return Progress::Failed(format!(
            "the new process failed to start (exit {code}): {why}"
        ));
    }
    Progress::Failed(format!("the new process said {line:?} instead of `ok`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_words_are_read_as_the_detach_pipe_writes_them() {
        assert_eq!(parse_word("ok"), Progress::Ready);
        assert_eq!(
            parse_word("exit 3 listener `a`: cannot listen"),
            Progress::Failed(
                "the new process failed to start (exit 3): listener `a`: cannot listen".into()
            )
        );
        let Progress::Failed(why) = parse_word("exec-failed execve 2") else {
            panic!("not a failure");
        };
        assert!(why.contains("execve: No such file or directory"), "{why}");
    }

    #[test]
    fn decimals_are_written_in_place() {
        let mut buf = [0xffu8; 24];
        // SAFETY: the buffer has room for 20 digits and a NUL.
        let n = unsafe { write_decimal(buf.as_mut_ptr(), 4_194_304) };
        assert_eq!(&buf[..n + 1], b"4194304\0");
        // SAFETY: as above.
        let n = unsafe { write_decimal(buf.as_mut_ptr(), 0) };
        assert_eq!(&buf[..n + 1], b"0\0");
    }

    #[test]
    fn inherited_manager_variables_are_not_passed_on_as_they_are() {
        for k in ["LISTEN_PID", "LISTEN_FDS", "NOTIFY_SOCKET", "WATCHDOG_USEC"] {
            assert!(replaced_var(OsStr::new(k)), "{k}");
        }
        assert!(replaced_var(OsStr::new(ENV_READY_FD)));
        assert!(!replaced_var(OsStr::new("PATH")));
    }
}
