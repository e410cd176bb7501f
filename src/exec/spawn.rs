//! The fast way for the fork server to start a program for a connection: `posix_spawn`.
//!
//! glibc's `posix_spawn` starts the child with `CLONE_VM | CLONE_VFORK`: it shares the fork
//! server's memory until its `execve`, so no page tables are copied and no copy-on-write faults
//! are taken on either side, which a profile showed to be most of what socketd itself spent per
//! exec'd connection. Everything the child must do before the exec is expressed as spawn
//! attributes and file actions: its own process group, the daemon's ignored signals (and
//! SIGPIPE) back to their defaults, an empty signal mask, the connection on 0 and 1, stderr on
//! 2, the working directory, and every descriptor from 3 up closed. An exec that fails is
//! reported by `posix_spawn` itself. What it cannot express is an account switch with
//! supplementary groups, so programs with `user`/`group` take the fork path (`direct`). The two
//! glibc extensions used (`addchdir_np`, 2.29; `addclosefrom_np`, 2.34) are looked up at run
//! time, so an older C library also falls back to the fork path instead of failing to start.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::OnceLock;

use nix::sys::signal::Signal;

use super::direct::{pointers, Prepared};
use super::Var;

type AddChdir = unsafe extern "C" fn(*mut libc::posix_spawn_file_actions_t, *const c_char) -> c_int;
type AddClosefrom = unsafe extern "C" fn(*mut libc::posix_spawn_file_actions_t, c_int) -> c_int;

/// The glibc extensions the spawn path needs.
struct Extensions {
    chdir: AddChdir,
    closefrom: AddClosefrom,
}

fn lookup(name: &CStr) -> Option<*mut c_void> {
    // SAFETY: dlsym only reads its NUL-terminated name; RTLD_DEFAULT searches loaded objects.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    (!p.is_null()).then_some(p)
}

fn extensions() -> Option<&'static Extensions> {
    static EXT: OnceLock<Option<Extensions>> = OnceLock::new();
    EXT.get_or_init(|| {
        let chdir = lookup(c"posix_spawn_file_actions_addchdir_np")?;
        let closefrom = lookup(c"posix_spawn_file_actions_addclosefrom_np")?;
        // SAFETY: glibc defines both symbols as functions with exactly these signatures.
        Some(unsafe {
            Extensions {
                chdir: std::mem::transmute::<*mut c_void, AddChdir>(chdir),
                closefrom: std::mem::transmute::<*mut c_void, AddClosefrom>(closefrom),
            }
        })
    })
    .as_ref()
}

/// Whether this C library can do everything the spawn path needs.
pub fn available() -> bool {
    extensions().is_some()
}

fn check(rc: c_int) -> io::Result<()> {
    match rc {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// File actions, destroyed when dropped.
struct Actions(Box<libc::posix_spawn_file_actions_t>);

impl Actions {
    fn new() -> io::Result<Actions> {
        // SAFETY: plain storage for the init call below, which fills it in.
        let mut a = Box::new(unsafe { std::mem::zeroed::<libc::posix_spawn_file_actions_t>() });
        // SAFETY: `a` is valid, writable storage for the object.
        check(unsafe { libc::posix_spawn_file_actions_init(&mut *a) })?;
        Ok(Actions(a))
    }

    fn ptr(&mut self) -> *mut libc::posix_spawn_file_actions_t {
        &mut *self.0
    }
}

impl Drop for Actions {
    fn drop(&mut self) {
        // SAFETY: initialised in `new`, destroyed once here.
        unsafe { libc::posix_spawn_file_actions_destroy(self.ptr()) };
    }
}

/// Spawn attributes, destroyed when dropped.
struct Attributes(Box<libc::posix_spawnattr_t>);

impl Attributes {
    fn new() -> io::Result<Attributes> {
        // SAFETY: plain storage for the init call below, which fills it in.
        let mut a = Box::new(unsafe { std::mem::zeroed::<libc::posix_spawnattr_t>() });
        // SAFETY: `a` is valid, writable storage for the object.
        check(unsafe { libc::posix_spawnattr_init(&mut *a) })?;
        Ok(Attributes(a))
    }

    fn ptr(&mut self) -> *mut libc::posix_spawnattr_t {
        &mut *self.0
    }
}

impl Drop for Attributes {
    fn drop(&mut self) {
        // SAFETY: initialised in `new`, destroyed once here.
        unsafe { libc::posix_spawnattr_destroy(self.ptr()) };
    }
}

fn sigset(signals: &[Signal]) -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset only sets bits of valid signals.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        for s in signals {
            libc::sigaddset(&mut set, *s as c_int);
        }
        set
    }
}

impl Prepared {
    /// Start the program in a new process group with `stdin`, `stdout` and `stderr` (None
    /// keeps the caller's fd 2), the signals in `to_default` at their defaults and nothing
    /// blocked. Returns its pid. Only for programs without an account switch (`can_spawn`).
    pub fn spawn(
        &self,
        conn_env: &[Var],
        stdin: BorrowedFd<'_>,
        stdout: BorrowedFd<'_>,
        stderr: Option<BorrowedFd<'_>>,
        to_default: &[Signal],
    ) -> io::Result<i32> {
        let ext = extensions().ok_or_else(|| {
            io::Error::new(io::ErrorKind::Unsupported, "posix_spawn extensions missing")
        })?;
        if !self.account.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "posix_spawn cannot switch accounts",
            ));
        }
        let envp = self.envp(conn_env);
        let env_ptrs = pointers(&envp);
        let argv_ptrs = pointers(&self.argv);
        let mut actions = Actions::new()?;
        let a = actions.ptr();
        // SAFETY: `a` is an initialised file-actions object; the descriptors are open and
        // (the fork server keeps 0-2 open) above 2, so the dup2 actions cannot clobber each
        // other; the directory is a valid C string, copied by the call.
        unsafe {
            check(libc::posix_spawn_file_actions_adddup2(
                a,
                stdin.as_raw_fd(),
                0,
            ))?;
            check(libc::posix_spawn_file_actions_adddup2(
                a,
                stdout.as_raw_fd(),
                1,
            ))?;
            if let Some(err) = stderr {
                check(libc::posix_spawn_file_actions_adddup2(
                    a,
                    err.as_raw_fd(),
                    2,
                ))?;
            }
            check((ext.chdir)(a, self.cwd.as_ptr()))?;
            check((ext.closefrom)(a, 3))?;
        }
        let mut attr = Attributes::new()?;
        let at = attr.ptr();
        let (defaults, empty) = (sigset(to_default), sigset(&[]));
        let flags = libc::POSIX_SPAWN_SETPGROUP
            | libc::POSIX_SPAWN_SETSIGDEF
            | libc::POSIX_SPAWN_SETSIGMASK;
        // SAFETY: `at` is an initialised attributes object; the sets are copied by the calls.
        unsafe {
            check(libc::posix_spawnattr_setpgroup(at, 0))?;
            check(libc::posix_spawnattr_setsigdefault(at, &defaults))?;
            check(libc::posix_spawnattr_setsigmask(at, &empty))?;
            check(libc::posix_spawnattr_setflags(at, flags as libc::c_short))?;
        }
        let mut pid: libc::pid_t = 0;
        // SAFETY: path, argv and envp are NUL-terminated C strings in NULL-terminated arrays
        // that outlive the call (posix_spawn returns after the child's exec or its failure);
        // the actions and attributes are initialised.
        check(unsafe {
            libc::posix_spawn(
                &mut pid,
                self.path.as_ptr(),
                a,
                at,
                argv_ptrs.as_ptr() as *const *mut c_char,
                env_ptrs.as_ptr() as *const *mut c_char,
            )
        })?;
        Ok(pid)
    }

    /// Whether `spawn` can start this program (no account switch, a recent enough glibc).
    pub fn can_spawn(&self) -> bool {
        self.account.is_none() && available()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Program, StderrMode};
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::path::PathBuf;

    #[test]
    fn spawned_program_gets_the_socket_directory_and_environment() {
        if !available() {
            eprintln!("skipped: this C library lacks the posix_spawn extensions");
            return;
        }
        let program = Program {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "pwd; echo $PROTO; ls /proc/self/fd".into(),
            ],
            env: Vec::new(),
            pass_env: Vec::new(),
            cwd: PathBuf::from("/tmp"),
            uid: None,
            gid: None,
            groups: None,
            stderr: StderrMode::Inherit,
            wait: false,
        };
        let p = Prepared::new(&program, "t").unwrap();
        assert!(p.can_spawn());
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        let vars = [("PROTO".to_string(), "TEST".to_string())];
        let pid = p
            .spawn(
                &vars,
                theirs.as_fd(),
                theirs.as_fd(),
                None,
                &[Signal::SIGPIPE],
            )
            .unwrap();
        drop(theirs);
        let mut out = String::new();
        ours.read_to_string(&mut out).unwrap();
        let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).unwrap();
        assert_eq!(
            status,
            nix::sys::wait::WaitStatus::Exited(nix::unistd::Pid::from_raw(pid), 0)
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[..2], ["/tmp", "TEST"], "{out}");
        // ls sees 0, 1, 2 and its own directory handle: nothing of the test process leaks.
        let fds: Vec<&str> = lines[2..].to_vec();
        assert_eq!(fds, ["0", "1", "2", "3"], "{out}");
    }
}
