//! Real systemd as PID 1, for tests that need the service manager itself: `systemctl start`,
//! `reload`, `stop`, socket units, the watchdog, journald, `dpkg -i` of a package.
//!
//! `Container::boot("label")` boots this machine's own `/lib/systemd/systemd` as PID 1 of a
//! throw-away container made of plain namespaces (pid, mount, uts, ipc, cgroup, and a network
//! namespace with only `lo`), over an overlay of `/` whose upper layer is a tmpfs: everything
//! systemd and the services write (units, /etc, /var, the journal) vanishes with it, and the
//! host is never written. Booting to `running` takes about 0.3 s here and `stop` (or `Drop`)
//! about 0.2 s; both check that no process, mount or cgroup directory is left behind.
//!
//! ```ignore
//! let Some(c) = Container::boot_or_skip("reload") else { return };  // not root: skipped
//! c.stage(Path::new(SOCKETD), "socketd");                          // -> /mnt/host/socketd
//! c.sh("install -m0755 /mnt/host/socketd /usr/bin/socketd");       // panics unless exit 0
//! c.write("/etc/socketd/socketd.toml", config);                    // atomic, through /proc
//! c.sh("systemctl start socketd");
//! let reply = c.in_net(|| { /* std sockets here reach the container's 127.0.0.1 */ });
//! let out = c.exec(&["systemctl", "reload", "socketd"]);          // CmdOutput, any exit
//! println!("{}", c.journal("socketd"));
//! c.stop();                                                        // panics on leftovers
//! ```
//!
//! How it is built (the facts come from `shared/systemd-pid1.md`):
//! - a fresh cgroup2 directory `socketd-it-PID-N` under the host's cgroup2 mount; the launcher
//!   enters it before `unshare --cgroup`, so it is the root of the container's cgroup namespace
//!   and systemd runs in unified mode;
//! - `unshare --pid --fork --kill-child --mount --propagation private --uts --ipc --net
//!   --cgroup` runs `sysd/init.sh` as PID 1 of the new pid namespace: it mounts the overlay,
//!   a fresh /proc with /proc/sys read-only (systemd-sysctl cannot touch the host kernel), a
//!   read-only sysfs, cgroup2, a small /dev whose console is a pty this process reads, binds the
//!   staging dir at /mnt/host, masks every unit the host has enabled (so no host service starts
//!   inside), pivots into the overlay, drops the capabilities nspawn drops (CAP_SYS_MODULE...)
//!   and execs systemd;
//! - the launcher has `PR_SET_PDEATHSIG`=SIGKILL: if the thread that booted the container dies
//!   (a killed test binary), `unshare --kill-child` takes the whole pid namespace with it (and
//!   the next boot removes the cgroup directory it left). So a `Container` must be stopped or
//!   dropped on the thread that booted it;
//! - commands run inside through `nsenter -t PID1 -a` with a clean environment and a deadline;
//!   threads join the network namespace with `setns(2)` (`in_net`, `enter_net`), so clients
//!   written with std sockets talk to the container's loopback; files are read and written
//!   through `/proc/PID1/root`.
//!
//! Never boot systemd on the host's own `/`: systemd-tmpfiles would empty the host's /tmp and
//! systemd-binfmt would register handlers kernel-wide. The overlay is what prevents that.

#![allow(dead_code)] // a toolbox: the upgrade tests use parts this file does not

mod host;

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use self::host::Console;
use self::host::{
    cgroup2_mount, pid_ns, processes_in, remove_cgroup_tree, remove_stale_cgroups, which,
};
use crate::harness::{run_with_timeout, CmdOutput, TestDir, POLL};

/// How long systemd may take from launch to `is-system-running` answering.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default deadline of one command run inside (`exec`, `sh`).
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the container may take to stop before PID 1 gets SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Where the staging dir appears inside the container.
pub const SHARE: &str = "/mnt/host";
/// PATH for commands run inside.
const INSIDE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Prefix of the cgroup directories the harness creates (stale ones are removed at boot).
pub(crate) const CGROUP_PREFIX: &str = "socketd-it-";

/// The container's init (`sysd/init.sh`): run as PID 1 of the new pid namespace, inside the
/// new private mount namespace; it ends by exec'ing systemd. Arguments: the base dir, the
/// console pty's path.
const INIT: &str = include_str!("sysd/init.sh");

/// Why real-systemd tests cannot run here, or `None` when they can.
pub fn skip_reason() -> Option<String> {
    // SAFETY: geteuid(2) has no side effects.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (booting systemd in namespaces needs root)".into());
    }
    for tool in [
        "/lib/systemd/systemd",
        "/usr/bin/systemctl",
        "/usr/bin/journalctl",
    ] {
        if !Path::new(tool).exists() {
            return Some(format!("{tool} is missing (Debian package `systemd`)"));
        }
    }
    for tool in ["unshare", "nsenter", "setpriv", "mount", "pivot_root"] {
        if which(tool).is_none() {
            return Some(format!(
                "`{tool}` is missing (Debian package util-linux/mount)"
            ));
        }
    }
    if cgroup2_mount().is_none() {
        return Some("no cgroup2 hierarchy is mounted".into());
    }
    None
}

/// A running systemd-as-PID-1 container. See the module docs.
pub struct Container {
    label: String,
    base: TestDir,
    cgroup: PathBuf,
    launcher: Child,
    pid1: i32,
    ns: u64,
    console: Console,
    stopped: bool,
}

impl std::fmt::Debug for Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Container")
            .field("label", &self.label)
            .field("pid1", &self.pid1)
            .finish()
    }
}

impl Container {
    /// `boot`, or `None` after printing why real-systemd tests cannot run here. Under CI
    /// (`CI` set) a reason to skip is a failure instead: CI runs as root and must run them.
    pub fn boot_or_skip(label: &str) -> Option<Container> {
        if let Some(why) = skip_reason() {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run the real-systemd tests, but: {why}"
            );
            eprintln!("skipped: {why}");
            return None;
        }
        Some(Container::boot(label))
    }

    /// Boot systemd as PID 1 in fresh namespaces and wait until it is running (or degraded).
    /// Panics with what the launcher and the console printed if it does not get there.
    pub fn boot(label: &str) -> Container {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let root = cgroup2_mount().expect("a cgroup2 hierarchy");
        remove_stale_cgroups(&root);
        let cgroup = root.join(format!(
            "{CGROUP_PREFIX}{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&cgroup).unwrap_or_else(|e| panic!("mkdir {}: {e}", cgroup.display()));
        let base = TestDir::new();
        for d in ["ovl", "root", "share"] {
            std::fs::create_dir(base.path().join(d)).expect("container dirs");
        }
        let console = Console::open();
        let procs = CString::new(
            cgroup
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .expect("no NUL in the cgroup path");
        // One open file for both streams, so their lines interleave instead of overwriting.
        let log = File::create(base.path().join("launcher.log")).expect("launcher log");
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--pid",
            "--fork",
            "--kill-child",
            "--mount",
            "--propagation",
            "private",
            "--uts",
            "--ipc",
            "--net",
            "--cgroup",
            "/bin/sh",
            "-c",
            INIT,
            "sh",
        ])
        .arg(base.path())
        .arg(&console.path)
        .env_clear()
        .env("PATH", INSIDE_PATH)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("launcher log"))
        .stderr(log);
        // SAFETY: between fork and exec this calls only async-signal-safe functions (setsid,
        // prctl, open, write, close) on memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                libc::setsid();
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                // "0" moves the writing process: the cgroup namespace unshare makes is rooted here.
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                Ok(())
            });
        }
        let launcher = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                remove_cgroup_tree(&cgroup);
                panic!("cannot start unshare: {e}");
            }
        };
        let mut c = Container {
            label: label.to_string(),
            base,
            cgroup,
            launcher,
            pid1: 0,
            ns: 0,
            console,
            stopped: false,
        };
        c.wait_booted();
        c
    }

    fn wait_booted(&mut self) {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let ours = pid_ns(std::process::id() as i32);
        let launcher = self.launcher.id() as i32;
        // PID 1 is the launcher's only child; it is systemd once the init script exec'd it.
        loop {
            if let Ok(Some(status)) = self.launcher.try_wait() {
                panic!(
                    "the container's launcher exited ({status}) before systemd ran\n{}",
                    self.dump()
                );
            }
            let child =
                std::fs::read_to_string(format!("/proc/{launcher}/task/{launcher}/children"))
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse::<i32>().ok());
            if let Some(pid) = child {
                let ns = pid_ns(pid);
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if ns != 0 && ns != ours && comm.trim() == "systemd" {
                    self.pid1 = pid;
                    self.ns = ns;
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "systemd did not start\n{}",
                self.dump()
            );
            std::thread::sleep(POLL);
        }
        let bus = self.host_path("/run/systemd/private");
        while !bus.exists() {
            assert!(
                Instant::now() < deadline && Path::new(&format!("/proc/{}", self.pid1)).exists(),
                "systemd never opened its private bus\n{}",
                self.dump()
            );
            std::thread::sleep(POLL);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let out = self.exec_timeout(&["systemctl", "is-system-running", "--wait"], left);
        let state = out.stdout.trim();
        assert!(
            state == "running" || state == "degraded",
            "systemd did not finish booting: {}\n{}",
            out.describe(),
            self.dump()
        );
    }

    /// The host pid of the container's systemd.
    pub fn pid1(&self) -> i32 {
        self.pid1
    }

    /// The staging dir on the host; it is `SHARE` (/mnt/host) inside.
    pub fn share(&self) -> PathBuf {
        self.base.path().join("share")
    }

    /// Copy a host file into the staging dir as `name`; returns its path inside.
    pub fn stage(&self, from: &Path, name: &str) -> String {
        let to = self.share().join(name);
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir).expect("staging subdir");
        }
        std::fs::copy(from, &to)
            .unwrap_or_else(|e| panic!("stage {} as {name}: {e}", from.display()));
        format!("{SHARE}/{name}")
    }

    /// The host path of a path inside the container (through /proc/PID1/root). Also good for
    /// connecting to unix sockets the container's services create.
    pub fn host_path(&self, inside: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.pid1)).join(inside.trim_start_matches('/'))
    }

    /// Write a file inside the container atomically (a sibling, then rename), creating its
    /// directory, as an operator's editor or config tool would.
    pub fn write(&self, inside: &str, contents: &str) {
        let path = self.host_path(inside);
        let dir = path.parent().expect("a file path");
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir for {inside}: {e}"));
        let tmp = dir.join(format!(
            ".{}.tmp",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("f")
        ));
        std::fs::write(&tmp, contents).unwrap_or_else(|e| panic!("write {inside}: {e}"));
        std::fs::rename(&tmp, &path).unwrap_or_else(|e| panic!("rename into {inside}: {e}"));
    }

    /// Read a file inside the container.
    pub fn read(&self, inside: &str) -> String {
        std::fs::read_to_string(self.host_path(inside))
            .unwrap_or_else(|e| panic!("read {inside} in the container: {e}"))
    }

    /// A `Command` that runs `argv` inside (every namespace of PID 1, clean environment).
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.pid1.to_string(), "-a", "env", "-i"])
            .arg(format!("PATH={INSIDE_PATH}"))
            .args([
                "TERM=dumb",
                "SYSTEMD_PAGER=cat",
                "SYSTEMD_COLORS=0",
                "LANG=C.UTF-8",
            ])
            .args(argv)
            .env_clear()
            .env("PATH", INSIDE_PATH)
            .stdin(Stdio::null());
        cmd
    }

    /// Run `argv` inside and return how it went, whatever its exit code (`EXEC_TIMEOUT`).
    pub fn exec(&self, argv: &[&str]) -> CmdOutput {
        self.exec_timeout(argv, EXEC_TIMEOUT)
    }

    /// `exec` with its own deadline.
    pub fn exec_timeout(&self, argv: &[&str], timeout: Duration) -> CmdOutput {
        run_with_timeout(self.command(argv), timeout)
    }

    /// Run a shell script inside; panics (with the journal) unless it exits 0. Returns stdout.
    #[track_caller]
    pub fn sh(&self, script: &str) -> String {
        let out = self.exec(&["sh", "-ec", script]);
        assert!(
            out.status.success(),
            "in the container: {script}\n{}\n{}",
            out.describe(),
            self.journal_tail()
        );
        out.stdout
    }

    /// Start `argv` inside without waiting (e.g. a `systemctl stop` that blocks while the
    /// test keeps a connection open). Wait for it with `Background::wait`.
    pub fn spawn(&self, argv: &[&str]) -> Background {
        let dir = TestDir::new();
        let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
        let mut cmd = self.command(argv);
        cmd.stdout(File::create(&out).expect("stdout file"));
        cmd.stderr(File::create(&err).expect("stderr file"));
        let child = cmd.spawn().expect("spawn nsenter");
        Background {
            child,
            dir,
            what: argv.join(" "),
        }
    }

    /// Everything journald holds for `unit` (`-o cat`: messages only).
    pub fn journal(&self, unit: &str) -> String {
        self.exec(&["journalctl", "--no-pager", "-o", "cat", "-u", unit])
            .stdout
    }

    /// The last lines of the whole journal, for failure messages.
    pub fn journal_tail(&self) -> String {
        let out = self.exec(&["journalctl", "--no-pager", "-n", "80"]);
        format!("--- journal (last 80 lines) ---\n{}", out.stdout)
    }

    /// Make the calling thread use the container's network namespace (only `lo`): every
    /// socket it opens from now on talks to the container's loopback. Do it in threads of your
    /// own that end before the container stops; `in_net` does it in a scoped thread.
    pub fn enter_net(&self) {
        let ns = File::open(format!("/proc/{}/ns/net", self.pid1)).expect("the container's netns");
        // SAFETY: setns(2) on a valid namespace fd changes only this thread's network namespace.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }

    /// Run `f` on a thread inside the container's network namespace and return its result.
    pub fn in_net<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter_net();
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// What systemd printed on the console, the launcher's output and the journal's tail.
    pub fn dump(&self) -> String {
        let launcher =
            std::fs::read_to_string(self.base.path().join("launcher.log")).unwrap_or_default();
        format!(
            "--- container `{}` launcher ---\n{launcher}--- console ---\n{}",
            self.label,
            self.console.text()
        )
    }

    /// Stop the container (`systemctl exit`, so every unit stops as on a poweroff), wait for
    /// PID 1 to exit, remove its cgroup tree, and panic if any process, mount or cgroup
    /// directory is left. Returns how long the stop took.
    #[track_caller]
    pub fn stop(mut self) -> Duration {
        let t = Instant::now();
        let leftovers = self.shutdown();
        assert!(
            leftovers.is_empty(),
            "the container left behind: {leftovers:#?}"
        );
        t.elapsed()
    }

    fn shutdown(&mut self) -> Vec<String> {
        if self.stopped {
            return Vec::new();
        }
        self.stopped = true;
        let mut left = Vec::new();
        let launched = matches!(self.launcher.try_wait(), Ok(None));
        if launched && self.pid1 != 0 {
            let asked = self
                .exec_timeout(&["systemctl", "exit", "0"], Duration::from_secs(30))
                .status
                .success();
            // Signal only a systemd in the container's pid namespace, never a recycled pid.
            if !asked && pid_ns(self.pid1) == self.ns {
                // SAFETY: kill(2) has no memory effects; the pid is the container's PID 1.
                unsafe { libc::kill(self.pid1, libc::SIGRTMIN() + 4) };
            }
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match self.launcher.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    left.push(format!(
                        "PID 1 still running after {STOP_TIMEOUT:?}: SIGKILL"
                    ));
                    // SAFETY: as above; killing PID 1 of a pid namespace ends all of it.
                    if self.pid1 != 0 && pid_ns(self.pid1) == self.ns {
                        unsafe { libc::kill(self.pid1, libc::SIGKILL) };
                    }
                    let _ = self.launcher.kill();
                    let _ = self.launcher.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(POLL),
            }
        }
        // The kernel kills the rest of a pid namespace when its PID 1 exits; wait for that.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ns != 0 && !processes_in(self.ns).is_empty() && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        if self.ns != 0 {
            let procs = processes_in(self.ns);
            if !procs.is_empty() {
                left.push(format!(
                    "processes in the container's pid namespace: {procs:?}"
                ));
            }
        }
        // cgroup dirs can be removed once their last (zombie) process is gone: retry a while.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut cg = remove_cgroup_tree(&self.cgroup);
        while !cg.is_empty() && Instant::now() < deadline {
            std::thread::sleep(POLL);
            cg = remove_cgroup_tree(&self.cgroup);
        }
        left.extend(
            cg.iter()
                .map(|p| format!("cgroup directory {}", p.display())),
        );
        let base = self.base.path().display().to_string();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        left.extend(
            mounts
                .lines()
                .filter(|l| l.contains(&base))
                .map(|l| format!("mount: {l}")),
        );
        self.console.slave = None;
        left
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        if std::thread::panicking() && self.pid1 != 0 {
            eprintln!("{}\n{}", self.dump(), self.journal_tail());
        }
        let left = self.shutdown();
        if !left.is_empty() {
            eprintln!("container `{}` left behind: {left:#?}", self.label);
            assert!(
                std::thread::panicking(),
                "the container left behind: {left:#?}"
            );
        }
    }
}

/// A command started inside with `Container::spawn`.
pub struct Background {
    child: Child,
    dir: TestDir,
    what: String,
}

impl Background {
    /// Whether it has exited.
    pub fn finished(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Wait for it (panics after `timeout`) and return how it went.
    #[track_caller]
    pub fn wait(mut self, timeout: Duration) -> CmdOutput {
        let deadline = Instant::now() + timeout;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
                other => panic!(
                    "`{}` did not finish within {timeout:?}: {other:?}",
                    self.what
                ),
            }
        };
        let read = |n: &str| {
            String::from_utf8_lossy(&std::fs::read(self.dir.path().join(n)).unwrap_or_default())
                .into_owned()
        };
        CmdOutput {
            status,
            stdout: read("stdout"),
            stderr: read("stderr"),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Only a leftover (the test failed): nsenter is our own child.
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The harness on its own: boot, run a command, see the container's own loopback, stop, and
/// nothing is left behind.
#[test]
fn systemd_container_boots_runs_and_leaves_nothing() {
    let Some(c) = Container::boot_or_skip("harness") else {
        return;
    };
    let t = Instant::now();
    assert_eq!(c.exec(&["cat", "/proc/1/comm"]).stdout.trim(), "systemd");
    assert_eq!(c.sh("hostname").trim(), "socketd-it");
    c.write("/etc/socketd-it/probe", "inside only\n");
    assert_eq!(c.sh("cat /etc/socketd-it/probe"), "inside only\n");
    assert!(
        !Path::new("/etc/socketd-it").exists(),
        "a write inside reached the host"
    );
    let links = c.sh("ip -o link show");
    assert_eq!(
        links.lines().count(),
        1,
        "only lo in the container: {links}"
    );
    let listener = c.in_net(|| std::net::TcpListener::bind("127.0.0.1:0").expect("bind inside"));
    let port = listener.local_addr().unwrap().port();
    // A socket a thread opened after `enter_net` is in the container's network namespace.
    let ss = c.sh("ss -Hltn");
    assert!(ss.contains(&format!("127.0.0.1:{port} ")), "{ss}");
    drop(listener);
    let cgroup = c.cgroup.clone();
    let pid1 = c.pid1();
    let took = c.stop();
    assert!(!cgroup.exists());
    assert!(!Path::new(&format!("/proc/{pid1}")).exists() || pid_ns(pid1) == 0);
    eprintln!(
        "container: up and down in {:?} (stop {took:?})",
        t.elapsed()
    );
}
