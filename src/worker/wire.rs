//! The messages between the main loop and the fork server, and how they cross the socketpair.
//!
//! The pair is `SOCK_SEQPACKET`, so one `sendmsg` is one message and message boundaries need
//! no framing; file descriptors (an accepted connection, a datagram listener's socket) ride
//! along as `SCM_RIGHTS` and arrive close-on-exec (`MSG_CMSG_CLOEXEC`). The encoding is a small
//! hand-written binary one: both ends are the same binary, so there is no versioning, but the
//! reader still checks every length so a short or garbled message is an error, not a panic.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::conn::{PeerAddr, PeerCred};

/// Room for the largest message: a whole UDP payload plus the job's header.
pub const MAX_MESSAGE: usize = 65_536 + 4096;

/// What a forked child is asked to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// An accepted connection, passed along with the message.
    Stream,
    /// One datagram, carried in the message; replies go out of the listener's socket.
    Datagram,
    /// inetd `wait` mode: the listener's socket itself is handed to an exec program.
    Wait,
}

/// Main loop -> fork server.
#[derive(Debug, Clone, PartialEq)]
pub enum ToServer {
    /// A listener's (new) config as TOML; a datagram listener's socket rides along.
    Listener { slot: u64, config: String },
    /// Serve one connection or datagram in a new child.
    Job {
        job: u64,
        slot: u64,
        kind: JobKind,
        peer: PeerAddr,
        local: Option<SocketAddr>,
        data: Vec<u8>,
    },
    /// The listener is gone: drop its config and socket.
    Forget { slot: u64 },
    /// Send this signal to every child (and each child's process group).
    Signal { signo: i32 },
    /// Fork a new fork server to take the place `index` of one that died, as the daemon's
    /// child (`CLONE_PARENT`); answered by `FromServer::Spawned`.
    Spawn { index: u64 },
    /// A stream listener whose socket came with its config (`Listener`): accept on it
    /// (`true`) or stop (`false`: paused, full, stopping). See `worker::doorway`.
    Watch { slot: u64, on: bool },
    /// Close the listener's socket (stop, reload); its config stays for jobs in flight.
    Unlisten { slot: u64 },
    /// The daemon's answer to `FromServer::Knock` number `knock`: serve the connection as
    /// job `job`, or (`None`) close it unserved.
    Verdict { knock: u64, job: Option<u64> },
}

/// How a job's child ended, as the fork server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Exited(i32),
    Signaled(i32),
    /// No child was started (fork failed, unknown listener, handler could not be built).
    NotStarted(String),
    /// The child was an exec'd program (`exec::direct`); the fork server has logged how it
    /// ended, and a program's own exit status is not a worker failure.
    Program,
}

/// Fork server -> main loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromServer {
    Done {
        job: u64,
        slot: u64,
        pid: i32,
        ending: Ending,
    },
    /// The answer to `Spawn`: the new fork server's pid (its socket rides along), or why
    /// none could be started.
    Spawned {
        index: u64,
        started: Result<i32, String>,
    },
    /// A connection this fork server accepted on slot `slot`'s socket: may it be served?
    /// The connection rides along (the daemon keeps a copy while it is served, for stop and
    /// `max_duration`); the fork server keeps it parked until `ToServer::Verdict`.
    Knock {
        knock: u64,
        slot: u64,
        peer: PeerAddr,
        local: Option<SocketAddr>,
    },
    /// The answer to `ToServer::Unlisten` (and `Forget`): this fork server closed its copy of
    /// the listener's socket.
    Unlistened { slot: u64 },
}

#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn i32(&mut self, v: i32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u64(v.len() as u64);
        self.0.extend_from_slice(v);
        self
    }
}

struct Reader<'a>(&'a [u8]);

fn garbled(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("fork server message: {what}"),
    )
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(garbled("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> io::Result<u64> {
        let mut b = [0; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }
    fn i32(&mut self) -> io::Result<i32> {
        let mut b = [0; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(i32::from_le_bytes(b))
    }
    fn bytes(&mut self) -> io::Result<&'a [u8]> {
        let n = usize::try_from(self.u64()?).map_err(|_| garbled("length"))?;
        self.take(n)
    }
    fn string(&mut self) -> io::Result<String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| garbled("not UTF-8"))
    }
}

fn put_peer(w: &mut Writer, peer: &PeerAddr) {
    match peer {
        PeerAddr::Inet(a) => {
            w.u8(0).bytes(a.to_string().as_bytes());
        }
        PeerAddr::Unix { path, cred } => {
            w.u8(1);
            match path {
                Some(p) => w.u8(1).bytes(p.as_os_str().as_bytes()),
                None => w.u8(0),
            };
            match cred {
                Some(c) => w
                    .u8(1)
                    .i32(c.pid)
                    .u64(u64::from(c.uid))
                    .u64(u64::from(c.gid)),
                None => w.u8(0),
            };
        }
    }
}

fn get_peer(r: &mut Reader<'_>) -> io::Result<PeerAddr> {
    match r.u8()? {
        0 => r
            .string()?
            .parse()
            .map(PeerAddr::Inet)
            .map_err(|_| garbled("address")),
        1 => {
            let path = match r.u8()? {
                0 => None,
                _ => Some(PathBuf::from(std::ffi::OsString::from_vec(
                    r.bytes()?.to_vec(),
                ))),
            };
            let cred = match r.u8()? {
                0 => None,
                _ => {
                    let pid = r.i32()?;
                    let uid = u32::try_from(r.u64()?).map_err(|_| garbled("uid"))?;
                    let gid = u32::try_from(r.u64()?).map_err(|_| garbled("gid"))?;
                    Some(PeerCred { pid, uid, gid })
                }
            };
            Ok(PeerAddr::Unix { path, cred })
        }
        _ => Err(garbled("peer kind")),
    }
}

fn get_local(r: &mut Reader<'_>) -> io::Result<Option<SocketAddr>> {
    Ok(match r.string()?.as_str() {
        "" => None,
        s => Some(s.parse().map_err(|_| garbled("local address"))?),
    })
}

impl ToServer {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            ToServer::Listener { slot, config } => {
                w.u8(b'L').u64(*slot).bytes(config.as_bytes());
            }
            ToServer::Job {
                job,
                slot,
                kind,
                peer,
                local,
                data,
            } => {
                let k = match kind {
                    JobKind::Stream => 0,
                    JobKind::Datagram => 1,
                    JobKind::Wait => 2,
                };
                w.u8(b'J').u64(*job).u64(*slot).u8(k);
                put_peer(&mut w, peer);
                let local = local.map(|a| a.to_string()).unwrap_or_default();
                w.bytes(local.as_bytes()).bytes(data);
            }
            ToServer::Forget { slot } => {
                w.u8(b'F').u64(*slot);
            }
            ToServer::Signal { signo } => {
                w.u8(b'S').i32(*signo);
            }
            ToServer::Spawn { index } => {
                w.u8(b'N').u64(*index);
            }
            ToServer::Watch { slot, on } => {
                w.u8(b'W').u64(*slot).u8(u8::from(*on));
            }
            ToServer::Unlisten { slot } => {
                w.u8(b'U').u64(*slot);
            }
            ToServer::Verdict { knock, job } => {
                w.u8(b'V').u64(*knock);
                match job {
                    Some(j) => w.u8(1).u64(*j),
                    None => w.u8(0),
                };
            }
        }
        w.0
    }

    fn decode(buf: &[u8]) -> io::Result<ToServer> {
        let mut r = Reader(buf);
        Ok(match r.u8()? {
            b'L' => ToServer::Listener {
                slot: r.u64()?,
                config: r.string()?,
            },
            b'J' => {
                let (job, slot) = (r.u64()?, r.u64()?);
                let kind = match r.u8()? {
                    0 => JobKind::Stream,
                    1 => JobKind::Datagram,
                    2 => JobKind::Wait,
                    _ => return Err(garbled("job kind")),
                };
                let peer = get_peer(&mut r)?;
                let local = get_local(&mut r)?;
                let data = r.bytes()?.to_vec();
                ToServer::Job {
                    job,
                    slot,
                    kind,
                    peer,
                    local,
                    data,
                }
            }
            b'F' => ToServer::Forget { slot: r.u64()? },
            b'S' => ToServer::Signal { signo: r.i32()? },
            b'N' => ToServer::Spawn { index: r.u64()? },
            b'W' => ToServer::Watch {
                slot: r.u64()?,
                on: r.u8()? != 0,
            },
            b'U' => ToServer::Unlisten { slot: r.u64()? },
            b'V' => {
                let knock = r.u64()?;
                let job = match r.u8()? {
                    0 => None,
                    _ => Some(r.u64()?),
                };
                ToServer::Verdict { knock, job }
            }
            _ => return Err(garbled("message kind")),
        })
    }
}

impl FromServer {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            FromServer::Done {
                job,
                slot,
                pid,
                ending,
            } => {
                w.u8(b'D').u64(*job).u64(*slot).i32(*pid);
                match ending {
                    Ending::Exited(c) => w.u8(0).i32(*c),
                    Ending::Signaled(s) => w.u8(1).i32(*s),
                    Ending::NotStarted(why) => w.u8(2).bytes(why.as_bytes()),
                    Ending::Program => w.u8(3),
                };
            }
            FromServer::Spawned { index, started } => {
                w.u8(b'N').u64(*index);
                match started {
                    Ok(pid) => w.u8(0).i32(*pid),
                    Err(why) => w.u8(1).bytes(why.as_bytes()),
                };
            }
            FromServer::Knock {
                knock,
                slot,
                peer,
                local,
            } => {
                w.u8(b'K').u64(*knock).u64(*slot);
                put_peer(&mut w, peer);
                let local = local.map(|a| a.to_string()).unwrap_or_default();
                w.bytes(local.as_bytes());
            }
            FromServer::Unlistened { slot } => {
                w.u8(b'C').u64(*slot);
            }
        }
        w.0
    }

    fn decode(buf: &[u8]) -> io::Result<FromServer> {
        let mut r = Reader(buf);
        match r.u8()? {
            b'D' => {}
            b'N' => {
                let index = r.u64()?;
                let started = match r.u8()? {
                    0 => Ok(r.i32()?),
                    _ => Err(r.string()?),
                };
                return Ok(FromServer::Spawned { index, started });
            }
            b'C' => return Ok(FromServer::Unlistened { slot: r.u64()? }),
            b'K' => {
                let (knock, slot) = (r.u64()?, r.u64()?);
                let peer = get_peer(&mut r)?;
                let local = get_local(&mut r)?;
                return Ok(FromServer::Knock {
                    knock,
                    slot,
                    peer,
                    local,
                });
            }
            _ => return Err(garbled("message kind")),
        }
        let (job, slot, pid) = (r.u64()?, r.u64()?, r.i32()?);
        let ending = match r.u8()? {
            0 => Ending::Exited(r.i32()?),
            1 => Ending::Signaled(r.i32()?),
            2 => Ending::NotStarted(r.string()?),
            3 => Ending::Program,
            _ => return Err(garbled("ending")),
        };
        Ok(FromServer::Done {
            job,
            slot,
            pid,
            ending,
        })
    }
}

/// Send one message with up to one descriptor.
fn send_raw(sock: BorrowedFd<'_>, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let iov = [IoSlice::new(bytes)];
    let fds = fd.map(|f| [f.as_raw_fd()]);
    let cmsgs: Vec<ControlMessage<'_>> = fds
        .as_ref()
        .map(|f| ControlMessage::ScmRights(f))
        .into_iter()
        .collect();
    loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receive one message and the descriptors that came with it. `Ok(None)` is end of stream.
fn recv_raw(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: MsgFlags,
) -> io::Result<Option<(usize, Vec<OwnedFd>)>> {
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    loop {
        let mut iov = [IoSliceMut::new(buf)];
        let msg = match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            flags | MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: SCM_RIGHTS installed these descriptors in this process just now;
                    // nothing else owns them, so each gets exactly one owner here.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        if msg.flags.contains(MsgFlags::MSG_TRUNC) {
            return Err(garbled("too long"));
        }
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            // The descriptors did not fit (out of descriptors, most likely): the message is
            // still whole, and every reader copes with a descriptor missing (a job or a
            // knock without its connection is not served).
            log::debug!(
                "a descriptor passed between socketd's processes was lost (out of descriptors?)"
            );
        }
        if msg.bytes == 0 {
            return Ok(None);
        }
        return Ok(Some((msg.bytes, fds)));
    }
}

/// Send a message to the fork server, with the descriptor it needs.
pub fn send_to_server(
    sock: BorrowedFd<'_>,
    msg: &ToServer,
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    send_raw(sock, &msg.encode(), fd)
}

/// Receive a message in the fork server; `Ok(None)` when the main loop has gone.
pub fn recv_in_server(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<Option<(ToServer, Vec<OwnedFd>)>> {
    match recv_raw(sock, buf, MsgFlags::MSG_DONTWAIT)? {
        None => Ok(None),
        Some((n, fds)) => Ok(Some((ToServer::decode(&buf[..n])?, fds))),
    }
}

/// Report to the main loop, with the descriptor it needs (a new fork server's socket).
pub fn send_to_main(
    sock: BorrowedFd<'_>,
    msg: &FromServer,
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    send_raw(sock, &msg.encode(), fd)
}

/// Receive a report in the main process (blocking) and the descriptor that came with it;
/// `Ok(None)` when the fork server has gone.
pub fn recv_in_main(sock: BorrowedFd<'_>) -> io::Result<Option<(FromServer, Option<OwnedFd>)>> {
    let mut buf = [0u8; 4096];
    match recv_raw(sock, &mut buf, MsgFlags::empty())? {
        None => Ok(None),
        Some((n, mut fds)) => Ok(Some((FromServer::decode(&buf[..n])?, fds.pop()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsFd;

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    #[test]
    fn messages_round_trip_with_descriptors() {
        let (a, b) = pair();
        let file = std::fs::File::open("/dev/null").unwrap();
        let job = ToServer::Job {
            job: 7,
            slot: 3,
            kind: JobKind::Stream,
            peer: PeerAddr::Unix {
                path: Some("/tmp/x".into()),
                cred: Some(PeerCred {
                    pid: 9,
                    uid: 1000,
                    gid: 100,
                }),
            },
            local: Some("[::1]:80".parse().unwrap()),
            data: vec![1, 2, 3],
        };
        send_to_server(a.as_fd(), &job, Some(file.as_fd())).unwrap();
        let mut buf = vec![0; MAX_MESSAGE];
        let (got, fds) = recv_in_server(b.as_fd(), &mut buf).unwrap().unwrap();
        assert_eq!(got, job);
        assert_eq!(fds.len(), 1);
        let flags = nix::fcntl::fcntl(&fds[0], nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(
            flags & libc::FD_CLOEXEC,
            0,
            "passed descriptors arrive close-on-exec"
        );

        let big = ToServer::Job {
            job: 1,
            slot: 2,
            kind: JobKind::Datagram,
            peer: PeerAddr::Inet("127.0.0.1:5".parse().unwrap()),
            local: None,
            data: vec![0xab; 65_536],
        };
        send_to_server(a.as_fd(), &big, None).unwrap();
        assert_eq!(recv_in_server(b.as_fd(), &mut buf).unwrap().unwrap().0, big);

        let done = FromServer::Done {
            job: 7,
            slot: 3,
            pid: 42,
            ending: Ending::NotStarted("no".into()),
        };
        send_to_main(b.as_fd(), &done, None).unwrap();
        let got = recv_in_main(a.as_fd())
            .unwrap()
            .map(|(m, fd)| (m, fd.is_some()));
        assert_eq!(got, Some((done, false)));
        let program = FromServer::Done {
            job: 8,
            slot: 3,
            pid: 43,
            ending: Ending::Program,
        };
        send_to_main(b.as_fd(), &program, None).unwrap();
        let got = recv_in_main(a.as_fd())
            .unwrap()
            .map(|(m, fd)| (m, fd.is_some()));
        assert_eq!(got, Some((program, false)));
        let spawn = ToServer::Spawn { index: 2 };
        send_to_server(a.as_fd(), &spawn, None).unwrap();
        assert_eq!(
            recv_in_server(b.as_fd(), &mut buf).unwrap().unwrap().0,
            spawn
        );
        for started in [Ok(77), Err("no fork".to_string())] {
            let spawned = FromServer::Spawned { index: 2, started };
            send_to_main(b.as_fd(), &spawned, Some(file.as_fd())).unwrap();
            let (got, fd) = recv_in_main(a.as_fd()).unwrap().unwrap();
            assert_eq!((got, fd.is_some()), (spawned, true));
        }
        drop(b);
        assert!(
            recv_in_main(a.as_fd()).unwrap().is_none(),
            "end of stream when the peer closes"
        );
    }

    #[test]
    fn garbled_messages_are_errors_not_panics() {
        for bad in [
            &b""[..],
            b"J",
            b"J\x01\x00",
            b"Q",
            b"L\xff\xff\xff\xff\xff\xff\xff\xff",
        ] {
            assert!(ToServer::decode(bad).is_err(), "{bad:?}");
            assert!(FromServer::decode(bad).is_err(), "{bad:?}");
        }
    }
}
