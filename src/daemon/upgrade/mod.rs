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
//! - the new process starts through a short-lived helper (`child`), its parent until the
//!   hand-over: the helper reports how the new process ended if it does, and exits at the
//!   hand-over so that the new process becomes the service manager's child; a pidfd on the
//!   helper tells the old process when that happened (`watch`).
//!
//! `LISTEN_PID` must be the new process's own pid, known only after `fork`; so it is forked by
//! hand (not `std::process::Command`), and writes its pid into an environment entry prepared
//! with room for it, then `execve`s. The variables besides systemd's are in `wire`. Between `fork` and `execve` the child makes only
//! async-signal-safe calls (`dup2`, `close_range`, `sigprocmask`, `signal`, `getpid`, `write`),
//! since the old process has other threads. Every descriptor other than stdin, stdout, the
//! stderr pipe, the sockets and the two pipe ends is closed in the child: the old process's
//! fork servers, wake-up descriptors, syslog and control sockets never reach the new binary.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

mod child;
mod watch;
mod wire;

use watch::parse_word;
pub use watch::{Progress, Started};
pub use wire::*;

/// The locked pidfile's descriptor, if this process has one (`share_pidfile`).
static PIDFILE_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Hand the pidfile (open and locked, kept open by the caller for the life of the process) to
/// the new process of an upgrade, so the lock passes over with no gap.
pub fn share_pidfile(fd: BorrowedFd<'_>) {
    PIDFILE_FD.store(fd.as_raw_fd(), std::sync::atomic::Ordering::Relaxed);
}

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
    /// A unix socket's path, as the listener has it.
    pub path: Option<&'a Path>,
    /// Paused by `socketd pause`: the new process keeps it paused.
    pub paused: bool,
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
    let paused: Vec<&str> = sockets
        .iter()
        .filter(|s| s.paused)
        .map(|s| s.name)
        .collect();
    add(ENV_PAUSED, paused.join(":"));
    add(
        ENV_PATHS,
        encode_paths(sockets.iter().filter_map(|s| Some((s.name, s.path?)))),
    );
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

    let (release_r, release_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let release = (release_r.as_raw_fd(), release_w.as_raw_fd());

    // SAFETY: fork in a multi-threaded process; the helper and the new process only call
    // async-signal-safe functions on memory prepared above (`upgrade_child`), then exit or
    // exec.
    let helper = unsafe { libc::fork() };
    if helper < 0 {
        return Err(io::Error::last_os_error());
    }
    if helper == 0 {
        // SAFETY: in the forked helper; every pointer points into buffers that outlive it.
        unsafe {
            child::helper(
                release,
                &child::Launch {
                    plan: &plan,
                    report,
                    base,
                    path: path.as_ptr(),
                    argv: &argv_ptrs,
                    envp: &env_ptrs,
                    pid_slot,
                },
            )
        }
    }
    drop(moves);
    drop(release_r);
    let helper = Pid::from_raw(helper);
    let give_up = |e: io::Error| {
        let _ = nix::sys::wait::waitpid(helper, None);
        e
    };
    // The new process's first word is its pid (or the helper's clone failure).
    let mut ready = File::from(ready_r);
    let first = read_line_within(&mut ready, Duration::from_secs(10)).map_err(give_up)?;
    let pid = match first.strip_prefix("pid ").and_then(|p| p.parse().ok()) {
        Some(pid) => Pid::from_raw(pid),
        None => {
            let why = match parse_word(&first) {
                Progress::Failed(why) => why,
                _ => format!("the new process said {first:?} instead of its pid"),
            };
            return Err(give_up(io::Error::other(why)));
        }
    };
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1. The helper
    // is unreaped, so the pid is still this child's even if it already exited.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, helper.as_raw(), 0 as libc::c_uint) };
    let pidfd = match RawFd::try_from(raw) {
        // SAFETY: the syscall just returned this descriptor, owned by nobody else.
        Ok(fd) if fd >= 0 => unsafe { OwnedFd::from_raw_fd(fd) },
        _ => {
            let e = io::Error::last_os_error();
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            return Err(give_up(e));
        }
    };
    for fd in [ready.as_fd(), out_r.as_fd()] {
        fcntl(fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    }
    Ok(Started {
        pid,
        helper: Some(helper),
        release: Some(release_w),
        binary: binary.to_path_buf(),
        pidfd,
        ready,
        output: File::from(out_r),
        deadline: Instant::now() + timeout,
        timeout,
        ready_text: Vec::new(),
        tail: Vec::new(),
    })
}

/// One line from a blocking pipe, waiting at most `timeout` for it.
fn read_line_within(pipe: &mut File, timeout: Duration) -> io::Result<String> {
    let deadline = Instant::now() + timeout;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [nix::poll::PollFd::new(
            pipe.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        if nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms))? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the new process did not start",
            ));
        }
        match pipe.read(&mut byte) {
            Ok(0) => return Err(io::Error::other("the new process ended before it started")),
            Ok(_) if byte[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_written_in_place() {
        let mut buf = [0xffu8; 24];
        // SAFETY: the buffer has room for 20 digits and a NUL.
        let n = unsafe { child::write_decimal(buf.as_mut_ptr(), 4_194_304) };
        assert_eq!(&buf[..n + 1], b"4194304\0");
        // SAFETY: as above.
        let n = unsafe { child::write_decimal(buf.as_mut_ptr(), 0) };
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
