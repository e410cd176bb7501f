//! Listening sockets of the four kinds, bound from config and registered on the mio poll.
//!
//! Sockets are kept as std types set non-blocking and registered through `SourceFd`, so an
//! accepted connection comes out of `accept4` blocking and close-on-exec, ready for a worker
//! thread with no extra syscall; event-mode code sets its own connections non-blocking. A unix
//! socket file the daemon created is unlinked when its `Listener` is dropped.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mio::unix::SourceFd;
use mio::{Interest, Registry as PollRegistry, Token};
use socket2::{Domain, Socket, Type};

use crate::config::{defaults, ListenAddr, ListenerConfig, Protocol};
use crate::conn::DatagramSocket;
use crate::conn::{Conn, PeerAddr, PeerCred};

/// Why a listener could not be bound, with the listener named so the operator knows which.
#[derive(Debug)]
pub struct BindError {
    pub listener: String,
    pub address: String,
    pub source: io::Error,
}

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "listener `{}`: cannot listen on {}: {}",
            self.listener, self.address, self.source
        )
    }
}

impl std::error::Error for BindError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// The socket itself, by kind.
#[derive(Debug)]
pub enum Socket4 {
    Tcp(TcpListener),
    Udp(UdpSocket),
    Unix(UnixListener),
    UnixDgram(UnixDatagram),
}

/// A bound listening socket plus what is needed to clean it up.
#[derive(Debug)]
pub struct Listener {
    socket: Socket4,
    /// The address actually bound (port 0 resolved).
    local: ListenAddr,
    /// A unix socket file we created and must remove on close.
    unlink: Option<PathBuf>,
    /// Passed by the service manager (socket activation, fd store), not bound here.
    from_manager: bool,
    /// Handed over by an upgrade with a socket file socketd created: this process's to
    /// remove only once it has taken over (`claim_file`), never if it fails to start.
    pending_file: Option<PathBuf>,
}

/// One accepted stream connection or received datagram.
#[derive(Debug)]
pub enum Incoming {
    Stream(Conn, PeerAddr),
    Datagram(usize, PeerAddr),
}

impl Listener {
    /// Bind the socket a listener config asks for.
    pub fn bind(cfg: &ListenerConfig) -> Result<Listener, BindError> {
        let err = |source: io::Error| BindError {
            listener: cfg.name.clone(),
            address: format!("{} {}", cfg.protocol, cfg.address),
            source,
        };
        let listener = match (&cfg.address, cfg.protocol) {
            (ListenAddr::Inet(addr), Protocol::Tcp) => {
                let s = inet_socket(*addr, Type::STREAM).map_err(err)?;
                s.listen(defaults::BACKLOG).map_err(err)?;
                let l: TcpListener = s.into();
                let local = ListenAddr::Inet(l.local_addr().map_err(err)?);
                Listener {
                    socket: Socket4::Tcp(l),
                    local,
                    unlink: None,
                    from_manager: false,
                    pending_file: None,
                }
            }
            (ListenAddr::Inet(addr), Protocol::Udp) => {
                let s = inet_socket(*addr, Type::DGRAM).map_err(err)?;
                let u: UdpSocket = s.into();
                let local = ListenAddr::Inet(u.local_addr().map_err(err)?);
                Listener {
                    socket: Socket4::Udp(u),
                    local,
                    unlink: None,
                    from_manager: false,
                    pending_file: None,
                }
            }
            (ListenAddr::Path(path), Protocol::Unix) => {
                clear_stale_socket(path).map_err(err)?;
                let file = &cfg.protect.socket_file;
                let l =
                    crate::protect::socket_file::bind(path, file, |p: &Path| UnixListener::bind(p))
                        .map_err(err)?;
                l.set_nonblocking(true).map_err(err)?;
                Listener {
                    socket: Socket4::Unix(l),
                    local: ListenAddr::Path(path.clone()),
                    unlink: Some(path.clone()),
                    from_manager: false,
                    pending_file: None,
                }
            }
            (ListenAddr::Path(path), Protocol::UnixDgram) => {
                clear_stale_socket(path).map_err(err)?;
                let file = &cfg.protect.socket_file;
                let d =
                    crate::protect::socket_file::bind(path, file, |p: &Path| UnixDatagram::bind(p))
                        .map_err(err)?;
                d.set_nonblocking(true).map_err(err)?;
                Listener {
                    socket: Socket4::UnixDgram(d),
                    local: ListenAddr::Path(path.clone()),
                    unlink: Some(path.clone()),
                    from_manager: false,
                    pending_file: None,
                }
            }
            (addr, proto) => {
                return Err(err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("address {addr} does not suit protocol {proto}"),
                )))
            }
        };
        Ok(listener)
    }

    /// Take over a socket the service manager passed (socket activation) for `cfg`. Its
    /// protocol must be the listener's; its address is whatever it is bound to (the unit file
    /// decides). An adopted unix socket file belongs to the manager and is never unlinked.
    pub fn adopt(fd: std::os::fd::OwnedFd, cfg: &ListenerConfig) -> Result<Listener, BindError> {
        let err = |source: io::Error| BindError {
            listener: cfg.name.clone(),
            address: format!(
                "{} {} (socket passed by the service manager)",
                cfg.protocol, cfg.address
            ),
            source,
        };
        let (protocol, local) = crate::daemon::activation::socket_kind(&fd).map_err(err)?;
        if protocol != cfg.protocol {
            return Err(err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the passed socket is {protocol} {local}, but the listener is {}",
                    cfg.protocol
                ),
            )));
        }
        let socket = match protocol {
            Protocol::Tcp => Socket4::Tcp(TcpListener::from(fd)),
            Protocol::Udp => Socket4::Udp(UdpSocket::from(fd)),
            Protocol::Unix => Socket4::Unix(UnixListener::from(fd)),
            Protocol::UnixDgram => Socket4::UnixDgram(UnixDatagram::from(fd)),
        };
        let listener = Listener {
            socket,
            local,
            unlink: None,
            from_manager: true,
            pending_file: None,
        };
        let nonblocking = match &listener.socket {
            Socket4::Tcp(s) => s.set_nonblocking(true),
            Socket4::Udp(s) => s.set_nonblocking(true),
            Socket4::Unix(s) => s.set_nonblocking(true),
            Socket4::UnixDgram(s) => s.set_nonblocking(true),
        };
        nonblocking.map_err(err)?;
        Ok(listener)
    }

    /// The address actually bound, with port 0 resolved to the real port.
    pub fn local_addr(&self) -> &ListenAddr {
        &self.local
    }

    /// The unix socket file socketd created for this listener (not one it adopted).
    pub fn own_socket_file(&self) -> Option<&Path> {
        self.unlink.as_deref()
    }

    /// Whether the service manager passed this socket (to this process or, before a binary
    /// upgrade, to the old one).
    pub fn from_manager(&self) -> bool {
        self.from_manager
    }

    /// Set where an adopted socket came from, when an upgrade handed it over: `owned_file`
    /// makes its unix socket file this process's to remove when it stops for good, once it
    /// has taken over (`claim_file`); `path` is where the old process had the socket.
    pub fn set_origin(&mut self, owned_file: bool, from_manager: bool, path: Option<PathBuf>) {
        self.from_manager = from_manager;
        if let Some(p) = path {
            // The old process's listener path (the socket may have been bound elsewhere and
            // renamed into place, so its own address is not it).
            self.local = ListenAddr::Path(p);
        }
        if let (true, ListenAddr::Path(p)) = (owned_file, &self.local) {
            self.pending_file = Some(p.clone());
        }
    }

    /// This process serves now: a socket file handed over with the socket is its to remove.
    pub fn claim_file(&mut self) {
        if let Some(p) = self.pending_file.take() {
            self.unlink = Some(p);
        }
    }

    /// Leave the unix socket file in place on close: another process serves it now.
    pub fn release_file(&mut self) {
        self.unlink = None;
    }

    /// The local IP address, for handlers and exec environments.
    pub fn local_inet(&self) -> Option<SocketAddr> {
        match self.local {
            ListenAddr::Inet(a) => Some(a),
            ListenAddr::Path(_) => None,
        }
    }

    pub fn protocol(&self) -> Protocol {
        match self.socket {
            Socket4::Tcp(_) => Protocol::Tcp,
            Socket4::Udp(_) => Protocol::Udp,
            Socket4::Unix(_) => Protocol::Unix,
            Socket4::UnixDgram(_) => Protocol::UnixDgram,
        }
    }

    pub fn socket(&self) -> &Socket4 {
        &self.socket
    }

    /// A second handle on a datagram socket, for workers to send replies from.
    pub fn reply_socket(&self) -> io::Result<Option<DatagramSocket>> {
        Ok(match &self.socket {
            Socket4::Udp(u) => Some(DatagramSocket::Udp(Arc::new(u.try_clone()?))),
            Socket4::UnixDgram(d) => Some(DatagramSocket::Unix(Arc::new(d.try_clone()?))),
            _ => None,
        })
    }

    /// Accept one connection or receive one datagram into `buf`.
    /// `WouldBlock` means drained; callers treat `Interrupted` as "again".
    pub fn next(&self, buf: &mut [u8]) -> io::Result<Incoming> {
        match &self.socket {
            Socket4::Tcp(l) => {
                let (s, a) = l.accept()?;
                Ok(Incoming::Stream(Conn::Tcp(s), PeerAddr::Inet(a)))
            }
            Socket4::Unix(l) => {
                let (s, a) = l.accept()?;
                let peer = unix_peer(&s, a.as_pathname());
                Ok(Incoming::Stream(Conn::Unix(s), peer))
            }
            Socket4::Udp(u) => {
                let (n, a) = u.recv_from(buf)?;
                Ok(Incoming::Datagram(n, PeerAddr::Inet(a)))
            }
            Socket4::UnixDgram(d) => {
                let (n, a) = d.recv_from(buf)?;
                let path = a.as_pathname().map(Path::to_path_buf);
                Ok(Incoming::Datagram(n, PeerAddr::Unix { path, cred: None }))
            }
        }
    }

    /// A second handle (a `dup`) on a stream listener's socket, for event loops that accept
    /// for themselves; `None` for datagram sockets. Dropping it never removes a socket file.
    pub fn acceptor(&self) -> io::Result<Option<Acceptor>> {
        Ok(match &self.socket {
            Socket4::Tcp(l) => Some(Acceptor::Tcp(l.try_clone()?)),
            Socket4::Unix(l) => Some(Acceptor::Unix(l.try_clone()?)),
            Socket4::Udp(_) | Socket4::UnixDgram(_) => None,
        })
    }

    /// Watch for connections or datagrams.
    pub fn register(&self, poll: &PollRegistry, token: Token) -> io::Result<()> {
        poll.register(&mut SourceFd(&self.as_raw_fd()), token, Interest::READABLE)
    }

    /// Stop watching (back-pressure, or before closing).
    pub fn deregister(&self, poll: &PollRegistry) -> io::Result<()> {
        poll.deregister(&mut SourceFd(&self.as_raw_fd()))
    }
}

/// A stream listener's socket as an event loop holds it (see `Listener::acceptor`).
#[derive(Debug)]
pub enum Acceptor {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Acceptor {
    /// Accept one connection for an event loop: TCP connections come non-blocking already
    /// (`accept4(SOCK_NONBLOCK)`, saving an `ioctl` per connection; the flag says so).
    pub fn accept_for_loop(&self) -> io::Result<(Conn, PeerAddr, bool)> {
        let Acceptor::Tcp(l) = self else {
            let (c, p) = self.accept()?;
            return Ok((c, p, false));
        };
        let fd = l.as_raw_fd();
        // SAFETY: `try_init` hands a zeroed storage and its length; accept4 fills at most
        // that much and returns a new descriptor we own (or -1).
        let (conn, addr) = unsafe {
            socket2::SockAddr::try_init(|storage, len| {
                let r = libc::accept4(
                    fd,
                    storage.cast(),
                    len,
                    libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                );
                if r < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(std::net::TcpStream::from_raw_fd(r))
            })?
        };
        let peer = addr
            .as_socket()
            .ok_or_else(|| io::Error::other("accepted a connection with no inet address"))?;
        Ok((Conn::Tcp(conn), PeerAddr::Inet(peer), true))
    }

    /// Accept one connection (the socket is non-blocking: `WouldBlock` when none waits).
    pub fn accept(&self) -> io::Result<(Conn, PeerAddr)> {
        match self {
            Acceptor::Tcp(l) => {
                let (s, a) = l.accept()?;
                Ok((Conn::Tcp(s), PeerAddr::Inet(a)))
            }
            Acceptor::Unix(l) => {
                let (s, a) = l.accept()?;
                let peer = unix_peer(&s, a.as_pathname());
                Ok((Conn::Unix(s), peer))
            }
        }
    }
}

impl AsRawFd for Acceptor {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Acceptor::Tcp(l) => l.as_raw_fd(),
            Acceptor::Unix(l) => l.as_raw_fd(),
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.socket {
            Socket4::Tcp(s) => s.as_fd(),
            Socket4::Udp(s) => s.as_fd(),
            Socket4::Unix(s) => s.as_fd(),
            Socket4::UnixDgram(s) => s.as_fd(),
        }
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(path) = self.unlink.take() {
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    log::warn!("cannot remove socket file {}: {e}", path.display());
                }
            }
        }
    }
}

/// A non-blocking, close-on-exec IP socket with SO_REUSEADDR, bound to `addr`.
fn inet_socket(addr: SocketAddr, ty: Type) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), ty, None)?;
    if ty == Type::STREAM {
        s.set_reuse_address(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

/// A socket file left by a dead process is removed; a live one, or anything that is not a
/// socket, is left alone and refused, so socketd never steals or destroys someone's path.
pub(crate) fn clear_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; remove it or choose another path",
                path.display()
            ),
        ));
    }
    // A non-blocking probe: a blocking connect to a listener whose backlog is full waits for
    // room, and this runs on the main loop (a reload that adds a listener).
    let probe = Socket::new(Domain::UNIX, Type::STREAM.nonblocking(), None)?;
    let live = match probe.connect(&socket2::SockAddr::unix(path)?) {
        Ok(()) => true,
        // EAGAIN: a listener whose backlog is full is alive all the same.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
        Err(e) if e.raw_os_error() == Some(libc::EPROTOTYPE) => UnixDatagram::unbound()
            .and_then(|d| d.connect(path))
            .is_ok(),
        Err(_) => false,
    };
    if live {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("another process is listening on {}", path.display()),
        ));
    }
    std::fs::remove_file(path)
}

/// The Unix peer with SO_PEERCRED credentials taken at accept time.
fn unix_peer(s: &UnixStream, path: Option<&Path>) -> PeerAddr {
    let cred = nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::PeerCredentials)
        .ok()
        .map(|c| PeerCred {
            pid: c.pid(),
            uid: c.uid(),
            gid: c.gid(),
        });
    PeerAddr::Unix {
        path: path.map(Path::to_path_buf),
        cred,
    }
}

/// Connections accepted (or datagrams read) per readiness event before other listeners get a
/// turn; the rest are picked up on the next loop pass, so one flood cannot starve the others.
pub const FAIR_BATCH: usize = 64;

/// How long to wait before accepting again after the process ran out of file descriptors.
pub const FD_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

/// The line an out-of-descriptors episode starts with, the same from every place that
/// accepts (main loop, event loops, fork servers, the daemon's fork-server door); logged once
/// per episode, so a long exhaustion cannot flood the log. `who` names the listener (and the
/// fork server).
pub fn log_accept_paused(who: std::fmt::Arguments<'_>, why: &dyn std::fmt::Display) {
    log::error!(
        "{who}: accept failed: {why}; pausing, retrying every {}ms",
        FD_RETRY.as_millis()
    );
}

/// The line an out-of-descriptors episode ends with.
pub fn log_accept_resumed(listener: &str) {
    log::info!("listener `{listener}`: accepting again");
}

/// EMFILE/ENFILE/ENOBUFS/ENOMEM: the process or system is out of resources for now.
pub fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

/// Errors about one connection or one datagram that say nothing about the listener: a client
/// that gave up before accept, an ICMP error reported on a UDP socket.
pub fn transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNABORTED)
            | Some(libc::EPROTO)
            | Some(libc::ECONNREFUSED)
            | Some(libc::ECONNRESET)
            | Some(libc::EPERM)
            | Some(libc::ENETDOWN)
            | Some(libc::ENETUNREACH)
            | Some(libc::EHOSTUNREACH)
            | Some(libc::EHOSTDOWN)
            | Some(libc::ENONET)
            | Some(libc::EOPNOTSUPP)
            | Some(libc::ETIMEDOUT)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Binding a unix path probes whether someone listens there. A listener with a full
    /// backlog must count as alive, and the probe must not wait for room: it runs on the loop.
    #[test]
    fn a_live_listener_with_a_full_backlog_is_refused_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("busy.sock");
        let busy = Socket::new(Domain::UNIX, Type::STREAM, None).expect("socket");
        busy.bind(&socket2::SockAddr::unix(&path).expect("addr"))
            .expect("bind");
        busy.listen(0).expect("listen");
        let mut pending = Vec::new();
        loop {
            let c = Socket::new(Domain::UNIX, Type::STREAM.nonblocking(), None).expect("socket");
            match c.connect(&socket2::SockAddr::unix(&path).expect("addr")) {
                Ok(()) => pending.push(c),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("filling the backlog: {e}"),
            }
            assert!(pending.len() < 1000, "the backlog never filled");
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let probe_path = path.clone();
        std::thread::spawn(move || {
            let _ = tx.send(clear_stale_socket(&probe_path));
        });
        let result = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the stale-socket probe blocked on a full backlog");
        let e = result.expect_err("a live listener must not be removed");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        assert!(path.exists(), "the live listener's socket file was removed");
    }
}
