//! sd_notify(3): tell the service manager (systemd `Type=notify`) when socketd is ready, is
//! reloading or stopping, what it is doing (`STATUS=`), and that it is alive (`WATCHDOG=1`).
//!
//! The `sd-notify` crate formats the messages and reads `WATCHDOG_USEC`, but it connects a
//! fresh blocking socket per message and does not understand an abstract (`@name`)
//! `NOTIFY_SOCKET`. Here one unbound, non-blocking datagram socket is made at start and every
//! message is sent with `MSG_DONTWAIT`: a manager that stops reading costs a dropped message,
//! never a stalled event loop. Without `NOTIFY_SOCKET` every call is a no-op.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// The service manager's notification socket, if socketd was given one.
#[derive(Debug, Default)]
pub struct Notify {
    target: Option<(UnixDatagram, SocketAddr)>,
    /// Half the manager's watchdog interval, when it asked for keep-alives.
    watchdog_every: Option<Duration>,
    next_watchdog: Option<Instant>,
    /// A failed send is logged once, not on every message.
    warned: bool,
    /// The last `STATUS=` sent and when, so refreshes are rate-limited and skip repeats.
    last_status: String,
    status_at: Option<Instant>,
    /// `NOTIFY_SOCKET` and `WATCHDOG_USEC` as given, for the new process of a binary upgrade.
    inherited: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    /// The new process of an upgrade: the old one says `READY=1` (with `MAINPID=`) for it.
    defer_ready: bool,
}

/// How often the loop may refresh `STATUS=` as connections come and go.
pub const STATUS_EVERY: Duration = Duration::from_secs(2);

impl Notify {
    /// Read `NOTIFY_SOCKET` and `WATCHDOG_USEC`/`WATCHDOG_PID`, then remove them from the
    /// environment so exec'd programs do not talk to the manager in socketd's name.
    /// Call while the process is still single-threaded (environment writes are not
    /// thread-safe).
    pub fn from_env() -> Notify {
        let watchdog = sd_notify::watchdog_enabled();
        let path = std::env::var_os("NOTIFY_SOCKET");
        let inherited: Vec<_> = ["NOTIFY_SOCKET", "WATCHDOG_USEC"]
            .into_iter()
            .filter_map(|k| Some((k.into(), std::env::var_os(k)?)))
            .filter(|(k, _)| k != "WATCHDOG_USEC" || watchdog.is_some())
            .collect();
        for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            std::env::remove_var(var);
        }
        let Some(path) = path else {
            return Notify::default();
        };
        let target = match open(path.as_encoded_bytes()) {
            Ok(t) => Some(t),
            Err(e) => {
                log::warn!(
                    "NOTIFY_SOCKET={}: {e}; not notifying the service manager",
                    path.to_string_lossy()
                );
                None
            }
        };
        let watchdog_every = watchdog.filter(|_| target.is_some()).map(|d| d / 2);
        Notify {
            target,
            watchdog_every,
            inherited,
            ..Notify::default()
        }
    }

    /// The manager's variables for the new process of a binary upgrade (it becomes the main
    /// process, so it notifies and feeds the watchdog in turn).
    pub fn child_env(&self) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
        self.inherited.clone()
    }

    /// This is the new process of an upgrade: its first `ready` only starts the watchdog
    /// clock, since the manager takes notifications from the main process only until the old
    /// one names this one with `MAINPID=` (`handed_over`).
    pub fn defer_first_ready(&mut self) {
        self.defer_ready = true;
    }

    /// Upgrade done: tell the manager `pid` is the main process now and ready, then go quiet
    /// (this process's further messages would be refused, and the new one feeds the
    /// watchdog).
    pub fn handed_over(&mut self, pid: u32, status: &str) {
        // WATCHDOG=1 too: the new process's keep-alives count only from now on, so the
        // manager's clock restarts here rather than at this process's last one.
        let mut states = vec![
            NotifyState::MainPid(pid),
            NotifyState::Ready,
            NotifyState::Status(status),
        ];
        if self.watchdog_every.is_some() {
            states.push(NotifyState::Watchdog);
        }
        self.send(&states);
        self.target = None;
        self.next_watchdog = None;
        self.watchdog_every = None;
    }

    /// Whether a service manager is listening at all.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// `READY=1` with a status line; also starts the watchdog clock.
    pub fn ready(&mut self, status: &str) {
        self.last_status = status.to_string();
        self.status_at = Some(Instant::now());
        if !std::mem::take(&mut self.defer_ready) {
            self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
        }
        if let Some(every) = self.watchdog_every {
            self.next_watchdog = Some(Instant::now() + every);
        }
    }

    /// `RELOADING=1` with the `MONOTONIC_USEC` systemd 253+ requires next to it.
    pub fn reloading(&mut self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[
                NotifyState::Reloading,
                now,
                NotifyState::Status("reloading"),
            ]),
            Err(_) => self.send(&[NotifyState::Reloading, NotifyState::Status("reloading")]),
        }
    }

    /// `STOPPING=1`: a stop has begun.
    pub fn stopping(&mut self, status: &str) {
        self.send(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }

    /// `FDSTORE=1` with `FDNAME=name`: keep `fd` in the manager's file-descriptor store (it
    /// passes it back with `LISTEN_FDS` on the next start). Without a manager, a no-op.
    pub fn store_fd(&mut self, name: &str, fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
        let Some((socket, addr)) = &self.target else {
            return Ok(());
        };
        let msg = format!("FDSTORE=1\nFDNAME={name}\n");
        let raw = [std::os::fd::AsRawFd::as_raw_fd(&fd)];
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&raw)];
        let iov = [io::IoSlice::new(msg.as_bytes())];
        let to = nix_addr(addr)?;
        nix::sys::socket::sendmsg(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            &iov,
            &cmsg,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            Some(&to),
        )?;
        Ok(())
    }

    /// `FDSTOREREMOVE=1` with `FDNAME=name`: the listener is gone; drop its stored socket.
    pub fn remove_stored_fd(&mut self, name: &str) {
        let name = format!("FDNAME={name}");
        self.send(&[
            NotifyState::Custom("FDSTOREREMOVE=1"),
            NotifyState::Custom(&name),
        ]);
    }

    /// `STATUS=`: what `systemctl status` shows.
    pub fn status(&mut self, status: &str) {
        self.last_status = status.to_string();
        self.status_at = Some(Instant::now());
        self.send(&[NotifyState::Status(status)]);
    }

    /// Whether a `STATUS=` refresh may be sent: enabled and none within `STATUS_EVERY`.
    /// Cheap enough to ask on every loop pass.
    pub fn status_due(&self, now: Instant) -> bool {
        self.target.is_some() && self.status_at.is_none_or(|t| now >= t + STATUS_EVERY)
    }

    /// Send `line` as `STATUS=` unless it is what the manager already shows.
    pub fn refresh_status(&mut self, line: &str) {
        if line != self.last_status {
            self.status(line);
        }
    }

    /// When the loop must wake up next to send a keep-alive, if the manager wants them.
    pub fn watchdog_due(&self) -> Option<Instant> {
        self.next_watchdog
    }

    /// Send `WATCHDOG=1` if it is due; the loop calls this on every pass.
    pub fn tick(&mut self, now: Instant) {
        if let (Some(due), Some(every)) = (self.next_watchdog, self.watchdog_every) {
            if now >= due {
                self.send(&[NotifyState::Watchdog]);
                self.next_watchdog = Some(now + every);
            }
        }
    }

    fn send(&mut self, states: &[NotifyState]) {
        let Some((socket, addr)) = &self.target else {
            return;
        };
        let mut msg = String::new();
        for s in states {
            msg.push_str(&s.to_string());
            msg.push('\n');
        }
        // The socket is non-blocking, so this is a MSG_DONTWAIT send.
        if let Err(e) = socket.send_to_addr(msg.as_bytes(), addr) {
            if !self.warned {
                self.warned = true;
                log::warn!("cannot notify the service manager: {e} (further failures not logged)");
            }
        }
    }
}

/// The manager's address as nix wants it for `sendmsg`.
fn nix_addr(addr: &SocketAddr) -> io::Result<nix::sys::socket::UnixAddr> {
    if let Some(path) = addr.as_pathname() {
        return Ok(nix::sys::socket::UnixAddr::new(path)?);
    }
    if let Some(name) = addr.as_abstract_name() {
        return Ok(nix::sys::socket::UnixAddr::new_abstract(name)?);
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        "an unnamed notify socket address",
    ))
}

/// An unbound non-blocking datagram socket and the manager's address: a path, or an abstract
/// name when the variable starts with `@` (systemd's spelling of a leading NUL).
fn open(path: &[u8]) -> io::Result<(UnixDatagram, SocketAddr)> {
    let addr = match path.split_first() {
        Some((b'@', name)) => SocketAddr::from_abstract_name(name)?,
        Some((b'/', _)) => SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(path))?,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not an absolute path or @name",
            ));
        }
    };
    let socket = UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    Ok((socket, addr))
}
