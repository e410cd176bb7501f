//! Direct exec in a forked worker: the child the fork server forked for a connection becomes
//! the program itself, so each connection costs one process, not a worker plus its program.
//! This is the fork path, for programs that switch accounts; the others are started with
//! `posix_spawn` (`spawn`), which does the same without copying the fork server's memory map.
//!
//! `Prepared` is built once per listener config, in the fork server, when the config arrives
//! (argv and the fixed part of the environment as C strings, the account, the directory); the
//! child then only adds the connection's variables, puts the connection on stdin and stdout and
//! the chosen stderr on fd 2, changes directory and account, and calls `execve`. The fork
//! server has a single thread, so its children may allocate and log freely before the exec.
//! Everything above fd 2 is marked close-on-exec first (it already is by construction; this is
//! the safety net), so the program holds only its three standard descriptors. A failure before
//! the exec is logged with the listener's name and ends the child with status 127, the shell's
//! "cannot run" code, which the fork server then logs as the program's exit.

use std::collections::BTreeMap;
use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use super::{Account, Program, StderrMode, Var};

/// The exit status of a child that could not become its program.
pub const CANNOT_RUN: i32 = 127;

/// One listener's program, ready to exec without further parsing.
#[derive(Debug)]
pub struct Prepared {
    pub(super) path: CString,
    pub(super) argv: Vec<CString>,
    /// `PATH`, `pass_env`, `env` and `SOCKETD_LISTENER`; the connection's variables go on top.
    env: BTreeMap<OsString, OsString>,
    pub(super) cwd: CString,
    pub(super) account: Account,
    /// Where the program's stderr goes.
    pub stderr: StderrMode,
    /// inetd `wait` mode: the program is handed the listening socket.
    pub wait: bool,
    /// The program's name for the log (`argv[0]`).
    pub name: String,
}

fn c_string(what: &str, bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("exec: {what} contains a NUL byte"),
        )
    })
}

impl Prepared {
    /// Convert `program` for `listener`; a NUL byte in any string is an error.
    pub fn new(program: &Program, listener: &str) -> io::Result<Prepared> {
        let argv = program
            .argv
            .iter()
            .map(|a| c_string("argv", a.as_bytes()))
            .collect::<io::Result<Vec<_>>>()?;
        let path = argv
            .first()
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "exec: empty argv"))?;
        Ok(Prepared {
            path,
            argv,
            env: program.environment(listener, &[]),
            cwd: c_string("cwd", program.cwd.as_os_str().as_bytes())?,
            account: Account::of(program),
            stderr: program.stderr,
            wait: program.wait,
            name: program.argv[0].clone(),
        })
    }

    /// The environment as `NAME=value` strings, with `conn_env` added.
    pub(super) fn envp(&self, conn_env: &[Var]) -> Vec<CString> {
        let mut env = self.env.clone();
        for (k, v) in conn_env {
            env.insert(k.into(), v.into());
        }
        env.into_iter()
            .filter_map(|(k, v)| {
                let mut kv = k.into_encoded_bytes();
                kv.push(b'=');
                kv.extend_from_slice(v.as_encoded_bytes());
                // Names were checked at load time; a value with a NUL cannot be passed.
                CString::new(kv).ok()
            })
            .collect()
    }

    /// In a forked child: become the program, with `stdin`, `stdout` and `stderr` (None keeps
    /// the inherited fd 2) as its standard descriptors. Never returns.
    pub fn exec(
        &self,
        listener: &str,
        conn_env: &[Var],
        stdin: BorrowedFd<'_>,
        stdout: BorrowedFd<'_>,
        stderr: Option<BorrowedFd<'_>>,
    ) -> ! {
        let why = match self.try_exec(conn_env, stdin, stdout, stderr) {
            Err(e) => e,
            Ok(never) => match never {},
        };
        log::error!("listener `{listener}`: cannot run {}: {why}", self.name);
        // SAFETY: end the child without running the fork server's destructors.
        unsafe { libc::_exit(CANNOT_RUN) }
    }

    fn try_exec(
        &self,
        conn_env: &[Var],
        stdin: BorrowedFd<'_>,
        stdout: BorrowedFd<'_>,
        stderr: Option<BorrowedFd<'_>>,
    ) -> Result<std::convert::Infallible, String> {
        let envp = self.envp(conn_env);
        let env_ptrs = pointers(&envp);
        let argv_ptrs = pointers(&self.argv);
        // The fork server ignores SIGPIPE for its own sake; the program starts with the default.
        // SAFETY: installing SIG_DFL runs no code in signal context.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
        // SAFETY: `cwd` is a valid C string for the call.
        if unsafe { libc::chdir(self.cwd.as_ptr()) } != 0 {
            return Err(format!(
                "cannot change directory to {}: {}",
                self.cwd.to_string_lossy(),
                io::Error::last_os_error()
            ));
        }
        self.account
            .switch()
            .map_err(|e| format!("cannot switch account: {e}"))?;
        // Keep the fork server's stderr aside (close-on-exec) to report a failed exec.
        let saved = match stderr {
            // SAFETY: F_DUPFD_CLOEXEC only creates a descriptor; fd 2 is always open here.
            Some(_) => cvt(unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3) })
                .map_err(|e| format!("cannot save stderr: {e}"))?,
            None => -1,
        };
        // The fork server keeps 0, 1 and 2 open, so every descriptor it was handed is above 2
        // and none of these dup2 calls can clobber a source another one still needs.
        install(stdin.as_raw_fd(), 0)?;
        install(stdout.as_raw_fd(), 1)?;
        if let Some(err) = stderr {
            install(err.as_raw_fd(), 2)?;
        }
        cloexec_above_stderr();
        // SAFETY: path, argv and envp are NUL-terminated C strings in NULL-terminated arrays
        // that live until the call, which only returns on failure.
        unsafe { libc::execve(self.path.as_ptr(), argv_ptrs.as_ptr(), env_ptrs.as_ptr()) };
        let e = io::Error::last_os_error();
        if saved >= 0 {
            // SAFETY: `saved` is our copy of the fork server's stderr; put it back for the log.
            unsafe { libc::dup2(saved, 2) };
        }
        Err(e.to_string())
    }
}

/// A NULL-terminated array of pointers into `strings`, as execve takes them.
pub(super) fn pointers(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Make `from` also `to`, inheritable by the program.
fn install(from: RawFd, to: RawFd) -> Result<(), String> {
    let r = if from == to {
        // dup2 onto itself would leave close-on-exec set.
        // SAFETY: clearing descriptor flags of an open descriptor.
        unsafe { libc::fcntl(to, libc::F_SETFD, 0) }
    } else {
        // SAFETY: both descriptors are open; `to` is one of 0, 1, 2 and is replaced atomically.
        unsafe { libc::dup2(from, to) }
    };
    cvt(r)
        .map(drop)
        .map_err(|e| format!("cannot set up descriptor {to}: {e}"))
}

/// Every descriptor above 2 close-on-exec: one call on Linux 5.11+, else one per open fd.
fn cloexec_above_stderr() {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets descriptor flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r != 0 {
        crate::process::cloexec_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn program(argv: &[&str]) -> Program {
        Program {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![("LANG".into(), "C".into()), ("PROTO".into(), "x".into())],
            pass_env: Vec::new(),
            cwd: PathBuf::from("/"),
            uid: None,
            gid: None,
            groups: None,
            stderr: StderrMode::Null,
            wait: false,
        }
    }

    #[test]
    fn environment_is_sorted_and_the_connection_wins() {
        let p = Prepared::new(&program(&["/bin/cat"]), "l").unwrap();
        let env: Vec<String> = p
            .envp(&[("PROTO".into(), "TCP".into())])
            .into_iter()
            .map(|c| c.into_string().unwrap())
            .collect();
        assert_eq!(
            env,
            [
                "LANG=C".to_string(),
                format!("PATH={}", super::super::DEFAULT_PATH),
                "PROTO=TCP".to_string(),
                "SOCKETD_LISTENER=l".to_string(),
            ]
        );
    }

    #[test]
    fn nul_bytes_are_refused() {
        assert!(Prepared::new(&program(&["/bin/cat", "a\0b"]), "l").is_err());
        assert!(Prepared::new(&program(&[]), "l").is_err());
    }
}
