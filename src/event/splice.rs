//! Zero-copy relaying for the event proxy: `splice(2)` from one socket into a pipe and from
//! the pipe into the other socket, so bulk bytes never enter user space.
//!
//! A direction starts with plain copies (cheapest for small request/response traffic, and it
//! costs no descriptors) and switches to a pipe once it has carried `SWITCH_AFTER` bytes. If
//! the pipe cannot be made (descriptors exhausted) the direction simply keeps copying.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{splice, OFlag, SpliceFFlags};

/// Bytes a direction copies before it is worth two extra descriptors to splice.
pub const SWITCH_AFTER: u64 = 256 * 1024;
/// The most one splice call moves.
const CHUNK: usize = 1 << 20;
/// Asked-for pipe capacity: fewer, larger splices for bulk streams (best effort).
const PIPE_SIZE: libc::c_int = 1 << 20;

/// A pipe and how many bytes sit in it.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    held: usize,
}

impl Pipe {
    /// A non-blocking pipe, enlarged when the system allows.
    pub fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Larger pipes mean fewer calls per MiB; refusal (pipe-max-size) is fine.
        let _ = nix::fcntl::fcntl(write.as_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        Ok(Pipe {
            read,
            write,
            held: 0,
        })
    }
}

/// What a splice pump ended on.
#[derive(Debug, PartialEq, Eq)]
pub enum Pumped {
    /// One side would block; wait for the next event.
    Blocked,
    /// `src` reached EOF and the pipe is empty.
    Eof,
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

/// Move bytes `src` -> pipe -> `dst` until one side would block or `src` ends.
pub fn pump(src: impl AsFd, dst: impl AsFd, pipe: &mut Pipe) -> io::Result<Pumped> {
    loop {
        while pipe.held > 0 {
            match splice(
                pipe.read.as_fd(),
                None,
                dst.as_fd(),
                None,
                pipe.held,
                flags(),
            ) {
                Ok(n) => pipe.held -= n,
                Err(Errno::EAGAIN) => return Ok(Pumped::Blocked),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // The pipe is empty here, so EAGAIN below can only mean `src` has nothing.
        match splice(src.as_fd(), None, pipe.write.as_fd(), None, CHUNK, flags()) {
            Ok(0) => return Ok(Pumped::Eof),
            Ok(n) => pipe.held += n,
            Err(Errno::EAGAIN) => return Ok(Pumped::Blocked),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}
