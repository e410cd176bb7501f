//! Process helpers every layer may use: whether this process is a forked worker, and marking
//! inherited descriptors close-on-exec before anything is forked or executed. Ground: imports
//! nothing of socketd's.

use std::sync::atomic::{AtomicBool, Ordering};

static IN_CHILD: AtomicBool = AtomicBool::new(false);

/// Called first thing in a forked worker.
pub(crate) fn mark_child() {
    IN_CHILD.store(true, Ordering::Relaxed);
}

/// True inside a forked worker: exec programs then stay in the child's process group, which
/// the fork server signals as a whole at stop.
pub fn in_forked_child() -> bool {
    IN_CHILD.load(Ordering::Relaxed)
}

/// Mark every descriptor above stderr close-on-exec, including any the daemon inherited from
/// whoever started it, so programs the daemon runs get only what is handed to them.
pub fn cloexec_all() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds.into_iter().filter(|fd| *fd > 2) {
        use nix::fcntl::{fcntl, FcntlArg, FdFlag};
        // SAFETY: called while the process has one thread, so `fd` (just listed, maybe the
        // directory handle, now closed: then fcntl fails harmlessly) cannot change meaning.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        if let Ok(flags) = fcntl(fd, FcntlArg::F_GETFD) {
            let flags = FdFlag::from_bits_truncate(flags) | FdFlag::FD_CLOEXEC;
            let _ = fcntl(fd, FcntlArg::F_SETFD(flags));
        }
    }
}
