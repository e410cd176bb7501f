//! The daemon's side of the control socket: bind (with its mode and group in place before
//! anyone can connect), accept on a thread, one bounded thread per client, and the link that
//! hands decoded commands to the loop.

use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Sender, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::Waker;
use serde_json::json;

use super::proto::{Command, Reply, Then, MAX_REQUEST};
use crate::config::{ControlConfig, SocketFile};

/// How long a client may take to send its whole request line.
pub const READ_DEADLINE: Duration = Duration::from_secs(5);
/// How long a client thread waits for the loop's answer before giving up with an error.
pub const ANSWER_DEADLINE: Duration = Duration::from_secs(60);
/// Clients served at once; one more gets a "busy" error at once.
pub const MAX_CLIENTS: usize = 16;

/// A command on its way to the loop, with where the answer goes.
#[derive(Debug)]
pub struct Ask {
    pub command: Command,
    pub reply: SyncSender<Reply>,
}

/// How threads hand commands to the loop: a channel plus the loop's waker.
#[derive(Debug, Clone)]
pub struct LoopLink {
    tx: Sender<Ask>,
    waker: Arc<Waker>,
}

impl LoopLink {
    pub fn new(tx: Sender<Ask>, waker: Arc<Waker>) -> LoopLink {
        LoopLink { tx, waker }
    }

    /// Ask the loop and wait for its answer, at most `deadline`.
    pub fn ask(&self, command: Command, deadline: Duration) -> Result<Reply, String> {
        let (reply, answer) = sync_channel(1);
        self.tx
            .send(Ask { command, reply })
            .map_err(|_| "the daemon is stopping".to_string())?;
        let _ = self.waker.wake();
        answer.recv_timeout(deadline).map_err(|_| {
            format!(
                "the daemon did not answer within {}s",
                deadline.as_secs_f64()
            )
        })
    }
}

/// The bound control socket; its file is removed when this is dropped (if it is still ours).
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    ino: u64,
    /// The new process of a binary upgrade binds beside the old process's socket and renames
    /// its own over it when it starts serving (`publish`): until then the old one answers.
    unpublished: Option<PathBuf>,
}

impl ControlSocket {
    /// Bind `cfg.path` with its mode and group applied before it appears (a stale file from
    /// a dead daemon is replaced; a live one is refused). `None` when no path is configured.
    pub fn bind(cfg: &ControlConfig) -> io::Result<Option<ControlSocket>> {
        let Some(path) = &cfg.path else {
            return Ok(None);
        };
        let context = |e: io::Error| {
            io::Error::new(e.kind(), format!("control socket {}: {e}", path.display()))
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.is_dir() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "control socket {}: the directory {} does not exist; create it (under \
                         systemd, RuntimeDirectory=socketd makes /run/socketd) or change \
                         [daemon] control",
                        path.display(),
                        dir.display()
                    ),
                ));
            }
        }
        let upgrade = crate::daemon::handover::from_pid().is_some();
        let at = if upgrade {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            path.with_file_name(format!(".{name}.{}", std::process::id()))
        } else {
            path.clone()
        };
        crate::listener::clear_stale_socket(&at).map_err(context)?;
        let file = SocketFile {
            mode: Some(cfg.mode),
            owner: None,
            group: cfg.group.clone(),
        };
        let listener =
            crate::protect::socket_file::bind(&at, &file, |p: &Path| UnixListener::bind(p))
                .map_err(context)?;
        let ino = std::fs::metadata(&at).map_err(context)?.ino();
        Ok(Some(ControlSocket {
            listener,
            path: path.clone(),
            ino,
            unpublished: upgrade.then_some(at),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Put the socket at its path if it is not there yet (the new process of an upgrade
    /// replaces the old process's file in one rename: no moment without a socket).
    pub fn publish(&mut self) -> io::Result<()> {
        if let Some(at) = self.unpublished.take() {
            std::fs::rename(&at, &self.path)?;
        }
        Ok(())
    }

    /// Accept clients on a thread of their own from now on.
    pub fn serve(&self, link: LoopLink) -> io::Result<()> {
        let listener = self.listener.try_clone()?;
        let active = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("socketd:control".into())
            .spawn(move || accept_loop(&listener, &link, &active))?;
        Ok(())
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        // Only our own file: a newer daemon may have replaced it meanwhile.
        let path = self.unpublished.as_ref().unwrap_or(&self.path);
        if std::fs::metadata(path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn accept_loop(listener: &UnixListener, link: &LoopLink, active: &Arc<AtomicUsize>) {
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // EMFILE and the like: wait a little rather than spin.
                log::warn!("control socket: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::Relaxed) >= MAX_CLIENTS {
            active.fetch_sub(1, Ordering::Relaxed);
            let _ = stream.set_nonblocking(true);
            let busy = Reply::error(
                format!("busy: {MAX_CLIENTS} control clients are being served; try again"),
                json!({}),
            );
            let _ = (&stream).write_all(format!("{}\n", busy.body).as_bytes());
            continue;
        }
        let (link, active) = (link.clone(), Arc::clone(active));
        let spawned = std::thread::Builder::new()
            .name("socketd:ctl-client".into())
            .spawn(move || {
                serve_client(stream, &link);
                active.fetch_sub(1, Ordering::Relaxed);
            });
        if let Err(e) = spawned {
            log::warn!("control socket: cannot start a client thread: {e}");
        }
    }
}

/// Read one request line within `READ_DEADLINE`, at most `MAX_REQUEST` bytes.
fn read_request(stream: &mut UnixStream) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + READ_DEADLINE;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timeout_message(&buf));
        }
        let _ = stream.set_read_timeout(Some(left));
        match stream.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Err("no request: the connection closed".into()),
            Ok(0) => return Ok(buf), // a last line without its newline
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = buf.iter().position(|b| *b == b'\n') {
                    buf.truncate(end);
                    return Ok(buf);
                }
                if buf.len() > MAX_REQUEST {
                    return Err(format!(
                        "the request is longer than {MAX_REQUEST} bytes without a newline"
                    ));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timeout_message(&buf))
            }
            Err(e) => return Err(format!("cannot read the request: {e}")),
        }
    }
}

fn timeout_message(buf: &[u8]) -> String {
    if buf.is_empty() {
        format!("timed out: no request within {}s", READ_DEADLINE.as_secs())
    } else {
        format!(
            "timed out: the request ({} bytes) did not end with a newline within {}s",
            buf.len(),
            READ_DEADLINE.as_secs()
        )
    }
}

fn serve_client(mut stream: UnixStream, link: &LoopLink) {
    let _ = stream.set_write_timeout(Some(READ_DEADLINE));
    let reply = match read_request(&mut stream).and_then(|line| Command::decode(&line)) {
        Ok(command) => {
            let status = command == Command::Status;
            match link.ask(command, ANSWER_DEADLINE) {
                Ok(mut r) => {
                    if status {
                        add_process(&mut r.body);
                    }
                    r
                }
                Err(e) => Reply::error(e, json!({})),
            }
        }
        Err(e) => Reply::error(e, json!({})),
    };
    if stream
        .write_all(format!("{}\n", reply.body).as_bytes())
        .is_err()
    {
        return;
    }
    if reply.then == Then::HoldUntilExit {
        // The descriptor closes when the process exits: the client's EOF means "stopped".
        std::mem::forget(stream);
    }
}

/// The process's own numbers, read here rather than on the loop (a directory listing of
/// thousands of descriptors is not the loop's business).
pub fn add_process(body: &mut serde_json::Value) {
    if let Some(p) = body
        .get_mut("status")
        .and_then(|s| s.get_mut("process"))
        .and_then(|p| p.as_object_mut())
    {
        p.insert("fds".into(), json!(crate::stats::open_fds()));
        p.insert("rss_bytes".into(), json!(crate::stats::rss_bytes()));
        p.insert(
            "tls_handshake_failures".into(),
            json!(crate::tls::front::handshake_failures()),
        );
    }
}
