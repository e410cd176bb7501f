//! Socket activation: listening sockets handed over by systemd (or `systemd-socket-activate`)
//! through `LISTEN_FDS`, `LISTEN_PID` and `LISTEN_FDNAMES`.
//!
//! Each passed socket goes to the listener whose `name` equals its fd name (`FileDescriptorName=`
//! in the .socket unit), or else to the listener whose protocol and address equal the socket's
//! own (read back with `getsockname` and `SO_TYPE`). Sockets no listener wants are reported and
//! closed. The variables are removed from the environment once read, so programs socketd starts
//! never believe the sockets are theirs.
//!
//! A binary upgrade (`upgrade`, `handover`) hands sockets over the same way. Those are adopted
//! by name only when protocol and address still fit the listener (a port-0 listener takes any
//! port on its IP; a socket the old process had from the manager fits wherever it is bound);
//! otherwise the listener binds afresh and the old socket closes with the old process.

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::config::{ListenAddr, ListenerConfig, Protocol};
use crate::daemon::upgrade::{
    decode_paths, ENV_MANAGER as UP_MANAGER, ENV_OWNED as UP_OWNED, ENV_PATHS as UP_PATHS,
    ENV_PAUSED as UP_PAUSED,
};

/// One socket passed by the service manager, with what it turned out to be.
#[derive(Debug)]
struct Passed {
    fd: OwnedFd,
    name: String,
    kind: Option<(Protocol, ListenAddr)>,
    /// Handed over by an upgrade (not by the service manager).
    handed: bool,
    /// Handed over: a unix socket file socketd created.
    owned_file: bool,
    /// Handed over: the old process had it from the service manager.
    from_manager: bool,
    /// Handed over: its listener was paused in the old process.
    paused: bool,
}

/// A passed socket a listener claimed.
#[derive(Debug)]
pub struct Taken {
    pub fd: OwnedFd,
    /// The name it was passed under.
    pub name: String,
    /// Handed over by the old process of an upgrade (its pid), not by the service manager.
    pub upgrade_from: Option<u32>,
    /// A unix socket file socketd created: removed when this process stops for good.
    pub owned_file: bool,
    /// The service manager passed it (to this process, or to the old one of an upgrade).
    pub from_manager: bool,
    /// Handed over: the unix socket's path as the old process's listener had it.
    pub path: Option<PathBuf>,
    /// Handed over: paused (`socketd pause`) in the old process; stays paused.
    pub paused: bool,
}

/// The sockets socketd was started with, until listeners claim them.
#[derive(Debug, Default)]
pub struct Inherited {
    passed: Vec<Passed>,
}

impl Inherited {
    /// Take the passed sockets (if `LISTEN_PID` is this process) and clear the variables.
    /// Call while single-threaded: it writes the environment.
    pub fn from_env() -> Inherited {
        let fds = sd_notify::listen_fds_with_names();
        let list = |var: &str| -> Vec<String> {
            let v = std::env::var(var).unwrap_or_default();
            v.split(':')
                .filter(|n| !n.is_empty())
                .map(String::from)
                .collect()
        };
        let (owned, manager, paused) = (list(UP_OWNED), list(UP_MANAGER), list(UP_PAUSED));
        let paths = decode_paths(&std::env::var(UP_PATHS).unwrap_or_default());
        let handed = crate::daemon::handover::from_pid().is_some();
        for var in [
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
            UP_OWNED,
            UP_MANAGER,
            UP_PATHS,
            UP_PAUSED,
        ] {
            std::env::remove_var(var);
        }
        let fds: Vec<(i32, String)> = match fds {
            Ok(fds) => fds.collect(),
            Err(e) => {
                log::error!("socket activation: cannot use the passed sockets: {e}");
                return Inherited::default();
            }
        };
        let passed = fds
            .into_iter()
            .map(|(raw, name)| {
                // SAFETY: sd_listen_fds(3): fds 3..3+LISTEN_FDS belong to this process (the
                // crate checked LISTEN_PID) and nothing else owns them; each is taken once.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                let mut kind = socket_kind(&fd).ok();
                let path = paths.iter().find(|(n, _)| *n == name).map(|(_, p)| p);
                if let (true, Some(p), Some((_, addr))) = (handed, path, kind.as_mut()) {
                    // Bound elsewhere and renamed into place (a socket file with a mode).
                    *addr = ListenAddr::Path(p.clone());
                }
                Passed {
                    fd,
                    handed,
                    owned_file: handed && owned.contains(&name),
                    paused: handed && paused.contains(&name),
                    from_manager: !handed || manager.contains(&name),
                    name,
                    kind,
                }
            })
            .collect();
        Inherited { passed }
    }

    /// The passed socket for `cfg`: by fd name first, else by protocol and address.
    pub fn take_for(&mut self, cfg: &ListenerConfig) -> Option<Taken> {
        let by_name = self
            .passed
            .iter()
            .position(|p| p.name == cfg.name && (!p.handed || still_fits(p, cfg)));
        let by_addr = || {
            self.passed.iter().position(|p| {
                p.kind.as_ref().is_some_and(|(proto, addr)| {
                    *proto == cfg.protocol && same_address(addr, &cfg.address)
                })
            })
        };
        let at = by_name.or_else(by_addr)?;
        let p = self.passed.remove(at);
        Some(Taken {
            fd: p.fd,
            name: p.name,
            upgrade_from: if p.handed {
                crate::daemon::handover::from_pid()
            } else {
                None
            },
            owned_file: p.owned_file,
            from_manager: p.from_manager,
            paused: p.paused,
            path: match (p.handed, p.kind) {
                (true, Some((_, ListenAddr::Path(path)))) => Some(path),
                _ => None,
            },
        })
    }

    /// Log every socket no listener claimed; they are closed when `self` drops.
    pub fn report_unmatched(&self) {
        for p in &self.passed {
            if p.handed {
                log::info!(
                    "upgrade: the old process's listener `{}` is not in this config (or moved); \
                     its socket closes with the old process",
                    p.name
                );
                continue;
            }
            let what = match &p.kind {
                Some((proto, addr)) => format!("{proto} {addr}"),
                None => "not a socket socketd can serve".to_string(),
            };
            log::warn!(
                "socket activation: passed socket `{}` ({what}) matches no listener by name or \
                 address; closing it. Name the listener `{}` or give it that address.",
                p.name,
                p.name
            );
        }
    }
}

/// An upgrade's socket still suits the listener of its name: same protocol, and the same
/// address (any port for a port-0 listener), or wherever the manager bound it.
fn still_fits(p: &Passed, cfg: &ListenerConfig) -> bool {
    let Some((proto, addr)) = &p.kind else {
        return false;
    };
    if *proto != cfg.protocol {
        return false;
    }
    if p.from_manager {
        return true;
    }
    match (addr, &cfg.address) {
        (ListenAddr::Inet(a), ListenAddr::Inet(b)) if b.port() == 0 => a.ip() == b.ip(),
        _ => same_address(addr, &cfg.address),
    }
}

/// What kind of socket `fd` is and where it is bound, in the config's terms.
pub(crate) fn socket_kind(fd: &impl AsFd) -> std::io::Result<(Protocol, ListenAddr)> {
    let sock = socket2::SockRef::from(fd);
    let stream = match sock.r#type()? {
        socket2::Type::STREAM => true,
        socket2::Type::DGRAM => false,
        other => return Err(unsupported(format!("socket type {other:?}"))),
    };
    let addr = sock.local_addr()?;
    if let Some(ip) = addr.as_socket() {
        let proto = if stream { Protocol::Tcp } else { Protocol::Udp };
        return Ok((proto, ListenAddr::Inet(ip)));
    }
    if addr.is_unix() {
        let path = addr
            .as_pathname()
            .map(Path::to_path_buf)
            .ok_or_else(|| unsupported("an unnamed or abstract unix socket".to_string()))?;
        let proto = if stream {
            Protocol::Unix
        } else {
            Protocol::UnixDgram
        };
        return Ok((proto, ListenAddr::Path(path)));
    }
    Err(unsupported(format!("address family {:?}", addr.domain())))
}

fn unsupported(what: String) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        format!("{what} is not supported"),
    )
}

/// Addresses equal as the config means them: unix paths compared after making them absolute.
fn same_address(socket: &ListenAddr, config: &ListenAddr) -> bool {
    match (socket, config) {
        (ListenAddr::Inet(a), ListenAddr::Inet(b)) => a == b,
        (ListenAddr::Path(a), ListenAddr::Path(b)) => absolute(a) == absolute(b),
        _ => false,
    }
}

fn absolute(p: &Path) -> PathBuf {
    let joined = std::env::current_dir()
        .map(|d| d.join(p))
        .unwrap_or_else(|_| p.to_path_buf());
    // Resolve symlinks in the directory (e.g. /var/run -> /run), not in the socket itself.
    match (
        joined.parent().and_then(|d| d.canonicalize().ok()),
        joined.file_name(),
    ) {
        (Some(dir), Some(name)) => dir.join(std::ffi::OsStr::from_bytes(name.as_bytes())),
        _ => joined,
    }
}
