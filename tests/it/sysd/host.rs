//! The host side of a sysd container: which tools and cgroup2 mount it needs, pid namespaces
//! and cgroup trees (to find and remove what a container leaves), and the console pty.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::CGROUP_PREFIX;

/// `tool` on PATH, if it is there.
pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// Where the host's cgroup2 hierarchy is mounted (`/sys/fs/cgroup/unified` on a hybrid host,
/// `/sys/fs/cgroup` on a unified one).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let point = pre.split(' ').nth(4)?;
        (post.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(point))
    })
}

/// The inode of a process's pid namespace (0 if it is gone).
pub fn pid_ns(pid: i32) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/ns/pid")).map_or(0, |m| m.ino())
}

/// Every pid whose pid namespace is `ns`.
pub fn processes_in(ns: u64) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid_ns(pid) == ns)
        .collect()
}

/// Remove a cgroup directory tree, deepest first. Returns what could not be removed.
pub fn remove_cgroup_tree(dir: &Path) -> Vec<PathBuf> {
    let mut left = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                left.extend(remove_cgroup_tree(&e.path()));
            }
        }
    }
    if dir.exists() && std::fs::remove_dir(dir).is_err() {
        left.push(dir.to_path_buf());
    }
    left
}

/// Remove cgroup dirs of containers whose test process died without cleaning up (SIGKILL).
pub fn remove_stale_cgroups(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(owner) = name
            .strip_prefix(CGROUP_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{owner}")).exists() {
            remove_cgroup_tree(&e.path());
        }
    }
}

/// The container's /dev/console: a pty whose output a thread collects.
pub struct Console {
    /// Kept open so that writes to the console never fail with EIO; closed at stop, which ends
    /// the reader thread.
    pub slave: Option<OwnedFd>,
    pub path: String,
    text: Arc<Mutex<Vec<u8>>>,
}

impl Console {
    pub fn open() -> Console {
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: openpty writes two fds into the pointers; name/termios/winsize may be null.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both fds were just returned by openpty and are owned by nobody else.
        let (master, slave) = unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        // SAFETY: a zeroed termios is valid storage for tcgetattr to fill.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(slave.as_raw_fd(), &mut t) == 0 {
                libc::cfmakeraw(&mut t);
                libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t);
            }
        }
        let path = std::fs::read_link(format!("/proc/self/fd/{}", slave.as_raw_fd()))
            .expect("the pty's path")
            .display()
            .to_string();
        let text = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&text);
        std::thread::spawn(move || {
            let mut master = master;
            let mut buf = [0u8; 8192];
            // Ends with EIO once the last slave fd (ours, after the container) is closed.
            while let Ok(n @ 1..) = master.read(&mut buf) {
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(&buf[..n]);
            }
        });
        Console {
            slave: Some(slave),
            path,
            text,
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.text.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}
