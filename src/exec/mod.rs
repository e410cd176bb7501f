//! Running an external program for a connection, inetd style: the mechanics behind
//! `handler = "exec"` (settings and the handler itself are in `handler::exec`).
//!
//! A program is started with `std::process::Command` (fork+exec done by std, safe from any
//! thread), never through a shell, with a cleared environment plus what the listener's
//! settings and the connection provide. Every running program is tracked by pid so a stop can
//! signal it; under threaded workers each program leads its own process group (so the signal
//! reaches what it started too), inside a forked worker it stays in the child's group, which the
//! fork server signals. The waiter never reaps before removing the pid from the table (it waits
//! with `WNOWAIT` first), so a stop can never signal a pid the kernel has already reused.
//!
//! Under `workers = "forked"` a stream connection's or a `wait` listener's program is not started
//! with `Command` at all: the forked child becomes the program itself (`direct`), and the fork
//! server logs its stderr and exit status (`worker::programs`). One process per connection
//! instead of two. Both paths build the environment with `Program::environment` and switch
//! accounts with `switch_account`, which sets the account's supplementary groups (std's `uid`
//! would drop them all).

pub mod direct;
mod env;
pub(crate) mod output;
pub mod spawn;

pub use env::{connection_env, socket_env, Var};

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, FromRawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{self, killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;

/// How long a program may outlive its connection's `max_duration` before SIGTERM, and SIGTERM
/// before SIGKILL (both worker models).
pub const CUT_GRACE: Duration = Duration::from_secs(1);

/// Where a program's stderr goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StderrMode {
    /// Each line logged with the listener's name and the program's pid.
    Log,
    Null,
    /// The daemon's own stderr.
    Inherit,
}

impl StderrMode {
    pub const NAMES: &'static [&'static str] = &["log", "null", "inherit"];

    pub fn from_name(s: &str) -> Option<StderrMode> {
        match s {
            "log" => Some(StderrMode::Log),
            "null" => Some(StderrMode::Null),
            "inherit" => Some(StderrMode::Inherit),
            _ => None,
        }
    }
}

/// A validated program to run: what `exec = {...}` says, with accounts resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    pub argv: Vec<String>,
    /// `env` entries, in the order given.
    pub env: Vec<(String, String)>,
    /// Names copied from the daemon's environment when set.
    pub pass_env: Vec<String>,
    pub cwd: PathBuf,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// The supplementary groups to set when `user` or `group` is given: the user's groups as
    /// `initgroups` would set them, or just `group`; resolved when the config is loaded.
    pub groups: Option<Vec<u32>>,
    pub stderr: StderrMode,
    /// inetd `wait` mode (datagram listeners only).
    pub wait: bool,
}

/// The PATH a program gets unless `env` or `pass_env` gives one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Programs running now (pid -> leads its own process group), for stop.
static RUNNING: Mutex<Option<HashMap<i32, bool>>> = Mutex::new(None);

/// Send `sig` to every running program (and its process group); returns how many.
pub fn signal_all(sig: Signal) -> usize {
    let Ok(guard) = RUNNING.lock() else { return 0 };
    let Some(map) = guard.as_ref() else { return 0 };
    for (pid, group) in map {
        let pid = Pid::from_raw(*pid);
        if *group {
            let _ = signal::killpg(pid, sig);
        }
        let _ = signal::kill(pid, sig);
    }
    map.len()
}

impl Program {
    /// The program's whole environment, sorted by name, later sources overriding earlier ones:
    /// `PATH`, then `pass_env`, `env`, the connection's variables and `SOCKETD_LISTENER`.
    pub fn environment(&self, listener: &str, conn_env: &[Var]) -> BTreeMap<OsString, OsString> {
        let mut vars = BTreeMap::new();
        vars.insert("PATH".into(), DEFAULT_PATH.into());
        for name in &self.pass_env {
            if let Some(v) = std::env::var_os(name) {
                vars.insert(name.into(), v);
            }
        }
        for (k, v) in self.env.iter().chain(conn_env) {
            vars.insert(k.into(), v.into());
        }
        vars.insert("SOCKETD_LISTENER".into(), listener.into());
        vars
    }

    /// The command with argv, environment, directory and account set; stdio left to the caller.
    pub fn command(&self, listener: &str, conn_env: &[Var]) -> io::Result<Command> {
        let (path, args) = self
            .argv
            .split_first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "exec: empty argv"))?;
        let mut cmd = Command::new(path);
        cmd.args(args)
            .env_clear()
            .envs(self.environment(listener, conn_env));
        cmd.current_dir(&self.cwd);
        if self.uid.is_some() || self.gid.is_some() {
            // Not `cmd.uid()`: std then drops every supplementary group (setgroups(0)), and its
            // own `groups()` is unstable. Everything the closure uses is allocated here.
            let account = Account::of(self);
            // SAFETY: the closure runs in the child between fork and exec and only makes the
            // setgroups, setgid and setuid system calls on memory allocated before the fork.
            unsafe { cmd.pre_exec(move || account.switch()) };
        }
        if !crate::process::in_forked_child() {
            cmd.process_group(0);
        }
        cmd.stderr(match self.stderr {
            StderrMode::Log => Stdio::piped(),
            StderrMode::Null => Stdio::null(),
            StderrMode::Inherit => Stdio::inherit(),
        });
        Ok(cmd)
    }

    /// Start `cmd`, log its stderr if asked, and track it until it ends.
    pub fn spawn(&self, mut cmd: Command, listener: &str) -> io::Result<Running> {
        let own_group = !crate::process::in_forked_child();
        let mut child = cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot run {}: {e}", self.argv[0])))?;
        if !own_group {
            // A forked worker and its program share a process group, which a stop signals as a
            // whole: the program decides whether SIGTERM ends it, the worker waits for it, and
            // the SIGKILL round ends both.
            // SAFETY: installing SIG_IGN runs no code in signal context; the program has been
            // started already, with the default disposition.
            let _ = unsafe { signal::signal(Signal::SIGTERM, signal::SigHandler::SigIgn) };
        }
        // A stop signalling between spawn and here misses this one; its SIGKILL round does not.
        if let Ok(mut g) = RUNNING.lock() {
            g.get_or_insert_with(HashMap::new)
                .insert(child.id() as i32, own_group);
        }
        let logger = child
            .stderr
            .take()
            .map(|err| output::log_lines(err, listener, child.id()));
        Ok(Running {
            child,
            logger,
            listener: listener.to_string(),
            name: self.argv[0].clone(),
        })
    }
}

/// A started program.
#[derive(Debug)]
pub struct Running {
    pub child: Child,
    logger: Option<output::LineLogger>,
    listener: String,
    name: String,
}

impl Running {
    /// Like `wait`, but the program is held to the listener's limits: once its connection has
    /// had no data either way for `idle_timeout` (TCP, read from the kernel's counters, since
    /// the program does the I/O) the connection is shut down; a program still running
    /// `CUT_GRACE` after that, or after `max_duration`, gets SIGTERM to its process group, and
    /// SIGKILL `CUT_GRACE` later. A program that ignores its connection cannot hold a worker.
    pub fn wait_limited(
        self,
        max_duration: Option<Duration>,
        idle_timeout: Option<Duration>,
        conn: &crate::conn::Conn,
    ) -> io::Result<ExitStatus> {
        if max_duration.is_some() || idle_timeout.is_some() {
            let cut = max_duration.map(|d| Instant::now() + d + CUT_GRACE);
            self.supervise(cut, idle_timeout.map(|d| (d, conn)));
        }
        self.wait_for(Some(conn))
    }

    /// Block until the program exits, enforcing the limits of `wait_limited`. Waits on a
    /// pidfd, which does not reap, so the pid stays this program's while it is signalled.
    fn supervise(&self, cut: Option<Instant>, mut idle: Option<(Duration, &crate::conn::Conn)>) {
        let pid = self.child.id() as i32;
        // SAFETY: pidfd_open takes a pid and flags (none: a pidfd is always close-on-exec) and
        // returns a new descriptor or -1; no memory is shared with the kernel.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) };
        let raw = std::os::fd::RawFd::try_from(raw).unwrap_or(-1);
        if raw < 0 {
            let e = io::Error::last_os_error();
            log::warn!(
                "listener `{}`: cannot watch pid {pid} for its limits: {e}",
                self.listener
            );
            return;
        }
        // SAFETY: `raw` is a descriptor the syscall above just opened for us alone.
        let pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let (mut deadline, mut next) = (cut, Signal::SIGTERM);
        let mut reason = "max_duration";
        loop {
            let now = Instant::now();
            if deadline.is_some_and(|d| d <= now) {
                let _ = killpg(Pid::from_raw(pid), next);
                log::warn!(
                    "listener `{}`: {} (pid {pid}) still running after {reason}: {next} sent",
                    self.listener,
                    self.name
                );
                if next == Signal::SIGKILL {
                    return;
                }
                (deadline, next) = (Some(now + CUT_GRACE), Signal::SIGKILL);
                continue;
            }
            let mut wake = deadline.map(|d| d - now);
            if let Some((limit, conn)) = idle {
                match idle_check(conn, limit, &self.listener, &self.name, pid) {
                    IdleCheck::Cut => {
                        let grace = now + CUT_GRACE;
                        if deadline.is_none_or(|d| grace < d) {
                            (deadline, reason) = (Some(grace), "idle_timeout");
                        }
                        idle = None;
                        continue;
                    }
                    IdleCheck::Again(check) => wake = Some(wake.map_or(check, |w| w.min(check))),
                    IdleCheck::Unknown => idle = None,
                }
            }
            let timeout = match wake {
                Some(w) => {
                    PollTimeout::from(u16::try_from(w.as_millis().max(1)).unwrap_or(u16::MAX))
                }
                None => PollTimeout::NONE,
            };
            let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, timeout) {
                Ok(n) if n > 0 => return, // exited
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(_) => return,
            }
        }
    }

    /// Wait for the program, untrack it, log how it ended and return that.
    pub fn wait(self) -> io::Result<ExitStatus> {
        self.wait_for(None)
    }

    /// `wait`, telling the log whether the client of `conn` had left when the program ended.
    fn wait_for(mut self, conn: Option<&crate::conn::Conn>) -> io::Result<ExitStatus> {
        let pid = self.child.id() as i32;
        // Wait without reaping, untrack, then reap: the pid stays ours until it is untracked.
        loop {
            match waitid(
                Id::Pid(Pid::from_raw(pid)),
                WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
            ) {
                Ok(_) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    untrack(pid);
                    return Err(e.into());
                }
            }
        }
        // Exited but not reaped: how the client stands now is how it stood at the end.
        let client = conn.map_or(Client::Unknown, |c| Client::of(c.as_fd()));
        untrack(pid);
        let status = self.child.wait()?;
        if let Some(l) = self.logger.take() {
            l.finish();
        }
        log_exit(
            &self.listener,
            &self.name,
            pid,
            status.code(),
            status.signal(),
            client,
        );
        Ok(status)
    }
}

/// What the idle watch on an exec program's connection found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IdleCheck {
    /// Idle past the limit: the connection has been shut down and logged.
    Cut,
    /// Still moving: look again after this long.
    Again(Duration),
    /// Not TCP: the kernel keeps no counters; the socket timeouts are all there is.
    Unknown,
}

/// Check an exec program's connection for `idle_timeout` (the program does the I/O, so the
/// kernel's TCP counters tell), shutting it down when it has been idle too long. Shared by
/// both worker models.
pub(crate) fn idle_check(
    conn: &crate::conn::Conn,
    limit: Duration,
    listener: &str,
    name: &str,
    pid: i32,
) -> IdleCheck {
    match crate::access::tcp_idle(conn) {
        Some(quiet) if quiet >= limit => {
            let _ = conn.shutdown(std::net::Shutdown::Both);
            log::info!(
                "listener `{listener}`: {name} (pid {pid}): no data for {}, connection closed",
                humantime::format_duration(limit)
            );
            IdleCheck::Cut
        }
        Some(quiet) => IdleCheck::Again((limit - quiet).max(Duration::from_millis(50))),
        None => IdleCheck::Unknown,
    }
}

/// How a program's client stood when the program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// No connection (a datagram or `wait` program), or it could not be looked at.
    Unknown,
    /// Still connected: a failure is the program's own.
    There,
    /// Had closed its side (or reset) before the program ended.
    Left,
}

impl Client {
    /// Whether the peer of `conn` has closed its side or reset the connection (POLLRDHUP,
    /// POLLHUP, POLLERR; looked at without waiting or reading).
    pub fn of(conn: std::os::fd::BorrowedFd<'_>) -> Client {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd {
            fd: conn.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, a borrowed open descriptor, no waiting (nix's PollFlags
        // lacks POLLRDHUP).
        match unsafe { libc::poll(&mut pfd, 1, 0) } {
            n if n < 0 => Client::Unknown,
            _ if pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 => {
                Client::Left
            }
            _ => Client::There,
        }
    }
}

/// Log how a program ended: status 0 at info; a non-zero status at warn, unless the client
/// had already left: then the status is the client's doing (`sshd -i` exits 255 whenever its
/// client disconnects) and it is logged at info, saying so. Signals are always a warn.
pub fn log_exit(
    listener: &str,
    name: &str,
    pid: i32,
    code: Option<i32>,
    signal: Option<i32>,
    client: Client,
) {
    match (code, signal) {
        (Some(0), _) => {
            log::info!("listener `{listener}`: {name} (pid {pid}) exited with status 0")
        }
        (Some(c), _) if client == Client::Left => log::info!(
            "listener `{listener}`: {name} (pid {pid}) exited with status {c} after the client \
             had closed the connection"
        ),
        (Some(c), _) => {
            log::warn!("listener `{listener}`: {name} (pid {pid}) exited with status {c}")
        }
        (None, Some(s)) => {
            let sig = Signal::try_from(s).map(|s| s.as_str()).unwrap_or("unknown");
            log::warn!("listener `{listener}`: {name} (pid {pid}) killed by signal {s} ({sig})")
        }
        (None, None) => log::warn!("listener `{listener}`: {name} (pid {pid}) ended"),
    }
}

fn untrack(pid: i32) {
    if let Ok(mut g) = RUNNING.lock() {
        if let Some(m) = g.as_mut() {
            m.remove(&pid);
        }
    }
}

/// The account a program runs as, in the form the system calls take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    groups: Option<Vec<libc::gid_t>>,
    gid: Option<libc::gid_t>,
    uid: Option<libc::uid_t>,
}

impl Account {
    /// `program`'s `user`/`group`; `switch` does nothing when neither is set.
    pub fn of(program: &Program) -> Account {
        Account {
            groups: program.groups.clone(),
            gid: program.gid,
            uid: program.uid,
        }
    }

    /// True when the program runs as the daemon's own account.
    pub fn is_none(&self) -> bool {
        self.groups.is_none() && self.gid.is_none() && self.uid.is_none()
    }

    /// Set the supplementary groups, then the group, then the user (the order that keeps the
    /// right to make each call). Only system calls: safe between fork and exec.
    pub fn switch(&self) -> io::Result<()> {
        if let Some(groups) = &self.groups {
            // SAFETY: the pointer and length describe `groups`, which outlives the call.
            if unsafe { libc::setgroups(groups.len(), groups.as_ptr()) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if let Some(gid) = self.gid {
            // SAFETY: setgid has no memory preconditions.
            if unsafe { libc::setgid(gid) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if let Some(uid) = self.uid {
            // SAFETY: setuid has no memory preconditions.
            if unsafe { libc::setuid(uid) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// Switch a shared socket between the blocking mode programs expect and the loop's mode.
pub(crate) fn set_blocking(fd: &std::os::fd::OwnedFd, blocking: bool) -> io::Result<()> {
    let sock = socket2::SockRef::from(fd);
    sock.set_nonblocking(!blocking)
}
