//! Accepted connections and peer addresses, unified over TCP and Unix sockets.
//!
//! Handlers see one `Conn` type whatever the listener's protocol, the way socketserver hands a
//! request socket to `BaseRequestHandler`; `#[cfg]`-free because socketd is Unix-only.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A connected, blocking stream socket handed to a handler.
#[derive(Debug)]
pub enum Conn {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix stream connection.
    Unix(UnixStream),
}

impl Conn {
    /// A second handle on the same socket, so reading and writing can be buffered separately.
    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }

    /// Half-close or close; `Write` after `Shutdown::Write` tells the peer we are done.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.shutdown(how),
            Conn::Unix(s) => s.shutdown(how),
        }
    }

    /// How long a read may wait (`None`: for ever).
    pub fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(d),
            Conn::Unix(s) => s.set_read_timeout(d),
        }
    }

    /// How long a write may wait (`None`: for ever).
    pub fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_write_timeout(d),
            Conn::Unix(s) => s.set_write_timeout(d),
        }
    }

    /// Non-blocking mode on or off.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_nonblocking(on),
            Conn::Unix(s) => s.set_nonblocking(on),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Conn::Tcp(s) => s.as_fd(),
            Conn::Unix(s) => s.as_fd(),
        }
    }
}

impl AsRawFd for Conn {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

/// One connection shared by a request's reader and writer (and anyone else who needs the
/// socket) without a second descriptor; the socket closes when the last handle drops.
#[derive(Debug, Clone)]
pub struct SharedConn(Arc<Conn>);

impl SharedConn {
    /// Share `conn`.
    pub fn new(conn: Conn) -> SharedConn {
        SharedConn(Arc::new(conn))
    }
}

impl std::ops::Deref for SharedConn {
    type Target = Conn;

    fn deref(&self) -> &Conn {
        &self.0
    }
}

impl Read for SharedConn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &*self.0 {
            Conn::Tcp(s) => (&*s).read(buf),
            Conn::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for SharedConn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &*self.0 {
            Conn::Tcp(s) => (&*s).write(buf),
            Conn::Unix(s) => (&*s).write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Credentials of a Unix peer from SO_PEERCRED, taken at accept time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// The peer process id.
    pub pid: i32,
    /// The peer's user id.
    pub uid: u32,
    /// The peer's group id.
    pub gid: u32,
}

/// Who is on the other end: logged, matched and passed on as an address, never a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAddr {
    /// An IP peer.
    Inet(SocketAddr),
    /// A Unix peer: its bound path if it has one (datagram senders may), and its credentials
    /// when the kernel gives them (stream sockets).
    Unix {
        /// The path the peer bound, if any.
        path: Option<PathBuf>,
        /// SO_PEERCRED, when the kernel gives it.
        cred: Option<PeerCred>,
    },
}

impl PeerAddr {
    /// The IP address, with IPv4-mapped IPv6 shown as plain IPv4 so logs and rules agree.
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        match self {
            PeerAddr::Inet(a) => Some(canonical_ip(a.ip())),
            PeerAddr::Unix { .. } => None,
        }
    }
}

/// `::ffff:a.b.c.d` is the IPv4 host a.b.c.d; treat it as such everywhere.
pub fn canonical_ip(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => std::net::IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAddr::Inet(a) => {
                let ip = canonical_ip(a.ip());
                write!(f, "{}", SocketAddr::new(ip, a.port()))
            }
            PeerAddr::Unix { path, cred } => {
                match path {
                    Some(p) => write!(f, "unix:{}", p.display())?,
                    None => write!(f, "unix")?,
                }
                if let Some(c) = cred {
                    write!(f, "(pid={},uid={},gid={})", c.pid, c.uid, c.gid)?;
                }
                Ok(())
            }
        }
    }
}

/// The largest datagram socketd reads: the whole UDP payload.
pub const MAX_DATAGRAM: usize = 65_536;

/// Where datagram replies go: a handle on the listening socket.
#[derive(Debug, Clone)]
pub enum DatagramSocket {
    /// A UDP listener's socket.
    Udp(Arc<std::net::UdpSocket>),
    /// A Unix datagram listener's socket.
    Unix(Arc<UnixDatagram>),
}
