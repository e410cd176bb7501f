//! The operator's side of a socketd deployment, for tests under real systemd
//! (`sysd::Container`): install it the way README.md says (`install_by_readme`) or from the
//! Debian package (`build_deb`, then `dpkg -i`), probe every service of the shipped systemd
//! config from outside the service (`assert_shipped_services_answer`), keep echo clients busy
//! while something happens and count what failed (`echo_load`), and read systemd's view
//! (`wait_journal`, `show`). `under_systemd.rs` uses all of it; so can any topic that needs
//! socketd running under systemd (e.g. a binary upgrade).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::sysd::{Container, SHARE};

/// The config a systemd deployment installs as /etc/socketd/socketd.toml.
pub const SYSTEMD_CONFIG: &str = include_str!("../../config/socketd-systemd.toml");
pub const CONFIG: &str = "/etc/socketd/socketd.toml";
/// Listeners in `SYSTEMD_CONFIG`.
pub const LISTENERS: usize = 11;
pub const UNIX_ECHO: &str = "/run/socketd/echo.sock";
/// The shortest time between two exchanges of one `echo_load` thread (4 threads: 1,000/s).
pub const LOAD_PACE: Duration = Duration::from_millis(4);
/// How long a start, reload or stop through systemctl may take here.
pub const SYSTEMCTL: Duration = Duration::from_secs(60);

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One echo exchange over TCP: connect, send, half-close, read all. Errors are returned (a
/// refused connection is an `Err`), never retried.
pub fn tcp_echo(port: u16, msg: &[u8]) -> io::Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&local(port), IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.write_all(msg)?;
    s.shutdown(Shutdown::Write)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

/// Read whatever a send-and-close service (daytime, time) sends on connect.
pub fn tcp_read(port: u16) -> io::Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&local(port), IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

/// One datagram to a UDP service and its answer.
pub fn udp_request(port: u16, msg: &[u8]) -> io::Result<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.connect(local(port))?;
    s.send(msg)?;
    let mut buf = [0u8; 1024];
    let n = s.recv(&mut buf)?;
    Ok(buf[..n].to_vec())
}

/// One echo exchange over a Unix stream socket at `path` (a host path into the container).
pub fn unix_echo(path: &Path, msg: &[u8]) -> io::Result<Vec<u8>> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.write_all(msg)?;
    s.shutdown(Shutdown::Write)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

/// Every service of the shipped systemd config answers, from outside the service.
pub fn assert_shipped_services_answer(c: &Container) {
    c.in_net(|| {
        assert_eq!(tcp_echo(17007, b"echo tcp").unwrap(), b"echo tcp");
        assert_eq!(udp_request(17007, b"echo udp").unwrap(), b"echo udp");
        assert_eq!(tcp_echo(17009, b"into the void").unwrap(), b"");
        let daytime = String::from_utf8(tcp_read(17013).unwrap()).unwrap();
        assert!(
            daytime.ends_with("\r\n") && daytime.len() > 10,
            "{daytime:?}"
        );
        assert_eq!(udp_request(17013, b"?").unwrap().last(), Some(&b'\n'));
        let mut chargen = TcpStream::connect_timeout(&local(17019), IO_TIMEOUT).unwrap();
        chargen.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut line = [0u8; 74];
        chargen.read_exact(&mut line).unwrap();
        assert_eq!(&line[72..], b"\r\n");
        assert_eq!(tcp_read(17037).unwrap().len(), 4);
        assert_eq!(udp_request(17037, b"?").unwrap().len(), 4);
    });
    assert_eq!(
        unix_echo(&c.host_path(UNIX_ECHO), b"echo unix").unwrap(),
        b"echo unix"
    );
    // What the issue's operator typed, and a client that is not root on the unix socket.
    assert_eq!(c.sh("echo hi | nc -N 127.0.0.1 17007"), "hi\n");
    assert_eq!(
        c.sh(&format!(
            "echo hi | setpriv --reuid=nobody --regid=nogroup --clear-groups nc -N -U {UNIX_ECHO}"
        )),
        "hi\n"
    );
}

/// Poll the unit's journal until it holds `needle`; returns the journal. Panics after `timeout`.
#[track_caller]
pub fn wait_journal(c: &Container, unit: &str, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let j = c.journal(unit);
        if j.contains(needle) {
            return j;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the journal of {unit} within {timeout:?}:\n{j}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `systemctl show -p NAME --value socketd`.
pub fn show(c: &Container, property: &str) -> String {
    c.exec(&["systemctl", "show", "-p", property, "--value", "socketd"])
        .stdout
        .trim()
        .to_string()
}

/// The `sh` code block that README.md's "By hand" install gives (the one after the marker).
pub fn readme_install_block() -> String {
    let readme = include_str!("../../README.md");
    let marker = "<!-- tests/it/under_systemd.rs runs this block";
    let after = &readme[readme
        .find(marker)
        .expect("the README marks its install block")..];
    let body = &after[after.find("```sh\n").expect("an sh block after the marker") + 6..];
    body[..body.find("```").expect("the block ends")].to_string()
}

/// The source tree as an operator has it after `cargo build --release`, staged inside.
pub fn stage_source(c: &Container) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for f in [
        "README.md",
        "config/socketd.toml",
        "config/socketd-systemd.toml",
        "systemd/socketd.service",
        "systemd/socketd.socket",
    ] {
        c.stage(&root.join(f), &format!("src/{f}"));
    }
    c.stage(Path::new(SOCKETD), "src/target/release/socketd");
    format!("{SHARE}/src")
}

/// Install socketd the way README.md tells an operator to, every command of its block but
/// `cargo build` (the test's binary stands in for the release build).
pub fn install_by_readme(c: &Container) {
    let src = stage_source(c);
    let block = readme_install_block();
    let script: String = block
        .lines()
        .filter(|l| !l.trim_start().starts_with("cargo "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(script.contains("socketd check"), "{block}");
    let out = c.sh(&format!("cd {src}\n{script}"));
    assert_eq!(
        out.trim(),
        "ok",
        "`socketd check` in the README block printed {out:?}"
    );
}

/// Prints what an `echo_load` saw while `what` happened, and fails (with the first failures
/// and the unit's journal) if any exchange failed.
pub fn assert_load_clean(c: &Container, what: &str, done: usize, failures: &[String]) {
    eprintln!("{what}: {done} echo exchanges, {} failed", failures.len());
    assert!(
        failures.is_empty(),
        "{what}: {} of {done} failed: {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        c.journal("socketd")
    );
}

/// Echo clients on `port` in a loop from `threads` threads (inside the container's network
/// namespace) while `during` runs; returns (exchanges done, failures). Each thread paces itself
/// to one exchange per `LOAD_PACE` at most (every connection is an access line in the journal,
/// and journald drops a unit's lines past its rate limit, lifecycle lines included, until the
/// access log has a sink of its own) and stops after 15,000 exchanges or 60s even if `during`
/// takes longer.
pub fn echo_load<T: Send>(
    c: &Container,
    port: u16,
    threads: usize,
    during: impl FnOnce() -> T + Send,
) -> (usize, Vec<String>, T) {
    let stop = AtomicBool::new(false);
    let done = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let result = std::thread::scope(|s| {
        for t in 0..threads {
            let (stop, done, failures) = (&stop, &done, &failures);
            s.spawn(move || {
                c.enter_net();
                let deadline = Instant::now() + Duration::from_secs(60);
                let msg = format!("load {t}");
                let start = Instant::now();
                for n in 0..15_000u32 {
                    if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                        break;
                    }
                    if let Some(wait) =
                        (start + LOAD_PACE * n).checked_duration_since(Instant::now())
                    {
                        std::thread::sleep(wait);
                    }
                    match tcp_echo(port, msg.as_bytes()) {
                        Ok(reply) if reply == msg.as_bytes() => {}
                        other => failures.lock().unwrap().push(format!("{other:?}")),
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        // Let the load get going, run `during`, then a little more load after it.
        wait_until("load started", Duration::from_secs(10), || {
            done.load(Ordering::Relaxed) >= 20
        });
        let r = during();
        let mark = done.load(Ordering::Relaxed);
        wait_until("load after", Duration::from_secs(10), || {
            done.load(Ordering::Relaxed) >= mark + 20
        });
        stop.store(true, Ordering::Relaxed);
        r
    });
    (done.into_inner(), failures.into_inner().unwrap(), result)
}

/// `packaging/build-deb` around the binary under test (`--profile dev --no-build`) into `out`;
/// the package's path, or `None` (skipped, with the reason) without cargo-deb outside CI.
pub fn build_deb(out: &Path) -> Option<std::path::PathBuf> {
    let cargo = env!("CARGO");
    let mut probe = std::process::Command::new(cargo);
    probe.args(["deb", "--version"]);
    if !run_with_timeout(probe, Duration::from_secs(30))
        .status
        .success()
    {
        let why = "cargo-deb is not installed (`cargo install --locked cargo-deb`)";
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must build the package, but {why}"
        );
        eprintln!("skipped: {why}");
        return None;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = std::process::Command::new(root.join("packaging/build-deb"));
    cmd.args(["--profile", "dev", "--no-build", "--fast", "-q", "-o"])
        .arg(out)
        .env("CARGO", cargo)
        .current_dir(root);
    let built = run_with_timeout(cmd, Duration::from_secs(300));
    assert!(
        built.status.success(),
        "packaging/build-deb failed:\n{}",
        built.describe()
    );
    let deb = std::fs::read_dir(out)
        .expect("the package dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"));
    Some(deb.unwrap_or_else(|| panic!("no .deb in {}:\n{}", out.display(), built.describe())))
}
