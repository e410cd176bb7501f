//! The new process of an upgrade between `fork` and `execve` (see `upgrade`): only
//! async-signal-safe calls here, since the old process has other threads.
//!
//! The old process forks a helper, which forks (raw `clone`, so no `atfork` handler runs in
//! it) the process that becomes the new binary. The helper stays as that process's parent
//! while it starts: if it dies, the helper reaps it and writes its wait status on the
//! readiness pipe (`exit-status S`). Once the new process is ready, the old one closes the
//! release pipe and the helper exits at once, so the new process is re-parented to the
//! service manager (PID 1, or a subreaper) before the old one names it with `MAINPID=`:
//! systemd then supervises it as its own child, as if it had started it (a main process that
//! is not its child is one it cannot wait for at `systemctl stop`).

use std::os::fd::RawFd;

/// The helper: start the new process, then wait for its exit or for the release.
///
/// # Safety
/// Call only in a freshly forked child; see `child` for the rest.
pub(super) unsafe fn helper(release: (RawFd, RawFd), launch: &Launch<'_>) -> ! {
    // Only the old process may hold the release pipe's write end, or it never closes.
    libc::close(release.1);
    let pid = libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_long, 0, 0, 0, 0);
    if pid < 0 {
        fail(launch.report.0, "clone");
    }
    if pid == 0 {
        child(launch);
    }
    let pid = pid as libc::pid_t;
    let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) as RawFd;
    let mut fds = [
        libc::pollfd {
            fd: release.0,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: pidfd,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let watched = if pidfd >= 0 { 2 } else { 1 };
    while libc::poll(fds.as_mut_ptr(), watched, -1) < 0 {
        if *libc::__errno_location() != libc::EINTR {
            break;
        }
    }
    if fds[0].revents == 0 && fds[1].revents != 0 {
        // The new process ended before the release: say how.
        let mut status = 0;
        if libc::waitpid(pid, &mut status, 0) == pid {
            write_line(launch.report.0, b"exit-status ", status as u32 as u64);
        }
    }
    libc::_exit(0)
}

/// What the new process is started with, prepared by the old process before the fork (no
/// allocation after it): `path`, `argv`, `envp` NUL-terminated as execve wants; `pid_slot`
/// (or null) has room for a pid and a NUL.
pub(super) struct Launch<'a> {
    /// Descriptor moves (`dup2(from, to)`) into the new process's places.
    pub plan: &'a [(RawFd, RawFd)],
    /// The readiness pipe before and after the moves, for a failure word.
    pub report: (RawFd, RawFd),
    /// Every descriptor at or above this is closed before `execve`.
    pub base: RawFd,
    pub path: *const libc::c_char,
    pub argv: &'a [*const libc::c_char],
    pub envp: &'a [*const libc::c_char],
    /// Where `LISTEN_PID`'s value goes in `envp`.
    pub pid_slot: *mut u8,
}

/// The new process: its pid first on the readiness pipe, descriptors into place, the rest
/// closed, signals as a fresh process has them, `LISTEN_PID` filled in, then `execve`.
///
/// # Safety
/// Call only in a freshly forked child, with `launch` as its doc says.
unsafe fn child(launch: &Launch<'_>) -> ! {
    let Launch {
        plan,
        report,
        base,
        path,
        argv,
        envp,
        pid_slot,
    } = *launch;
    let pid = libc::getpid() as u64;
    write_line(report.0, b"pid ", pid);
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
        write_decimal(pid_slot, pid);
    }
    libc::execve(path, argv.as_ptr(), envp.as_ptr());
    fail(ready_at, "execve")
}

/// Tell the old process which call failed and how (`exec-failed CALL ERRNO`), then exit 127.
unsafe fn fail(ready_fd: RawFd, call: &str) -> ! {
    let errno = *libc::__errno_location();
    let mut head = [0u8; 32];
    let mut at = 0;
    for &b in b"exec-failed ".iter().chain(call.as_bytes()).chain(b" ") {
        if at < head.len() {
            head[at] = b;
            at += 1;
        }
    }
    write_line(ready_fd, &head[..at], errno.max(0) as u64);
    libc::_exit(127)
}

/// Write `prefix`, `n` in decimal and a newline to `fd` in one write.
unsafe fn write_line(fd: RawFd, prefix: &[u8], n: u64) {
    let mut msg = [0u8; 64];
    let len = prefix.len().min(msg.len() - 22);
    msg[..len].copy_from_slice(&prefix[..len]);
    let digits = write_decimal(msg.as_mut_ptr().add(len), n);
    msg[len + digits] = b'\n';
    if fd >= 0 {
        libc::write(fd, msg.as_ptr().cast(), len + digits + 1);
    }
}

/// Write `n` in decimal at `out`, NUL-terminated; returns the number of digits.
///
/// # Safety
/// `out` has room for 21 bytes.
pub(super) unsafe fn write_decimal(out: *mut u8, mut n: u64) -> usize {
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
