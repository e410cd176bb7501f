//! fork_echo: the benchmark's "process per connection" line, what the forked rows are measured
//! against the way the event rows are measured against epoll_echo. A minimal blocking accept
//! loop that starts one process per connection and does nothing else (no limits, no logging,
//! no bookkeeping), so it costs about what the kernel charges for a process per connection on
//! this machine:
//!
//! - `fork_echo --tcp IP:PORT` forks a child that echoes until EOF and `_exit`s (what xinetd's
//!   internal echo and socketd's forked echo do);
//! - `fork_echo --tcp IP:PORT --exec PROGRAM` starts PROGRAM with the connection as stdin and
//!   stdout through `std::process::Command` (posix_spawn, vfork-class, as socketd's forked exec).
//!
//! Children are reaped with `waitpid` after every accept (not by ignoring SIGCHLD: the kernel
//! would then drop their CPU time, which the bench reads from this process's cutime).
//! Prints `ready` once bound.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};

fn echo(mut s: TcpStream) -> ! {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    // SAFETY: end the child at once, running nothing of the parent's.
    unsafe { libc::_exit(0) }
}

fn main() -> io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut addr, mut exec) = (None, None);
    while let Some(a) = args.next() {
        let v = args
            .next()
            .ok_or_else(|| io::Error::other(format!("{a} needs a value")))?;
        match a.as_str() {
            "--tcp" => addr = Some(v),
            "--exec" => exec = Some(v),
            _ => return Err(io::Error::other(format!("unknown argument {a}"))),
        }
    }
    let addr = addr.ok_or_else(|| io::Error::other("--tcp IP:PORT is required"))?;
    let listener = TcpListener::bind(addr)?;
    println!("ready");
    loop {
        let (s, _) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => continue,
        };
        // SAFETY: waitpid with WNOHANG only collects children that have exited.
        while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
        let _ = s.set_nodelay(true);
        match &exec {
            Some(program) => {
                let out = OwnedFd::from(s.try_clone()?);
                let _ = Command::new(program)
                    .stdin(Stdio::from(OwnedFd::from(s)))
                    .stdout(Stdio::from(out))
                    .spawn();
            }
            // SAFETY: this process has one thread, so the child starts with every lock free;
            // it only reads, writes and `_exit`s.
            None => match unsafe { libc::fork() } {
                0 => echo(s),
                _ => drop(s),
            },
        }
    }
}
