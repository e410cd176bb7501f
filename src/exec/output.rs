//! `stderr = "log"`: a program's stderr read line by line on a small thread and logged with the
//! listener's name and the program's pid, so a failing inetd program explains itself in the
//! daemon's log. Lines are cut at `MAX_LINE` bytes so a program cannot make the daemon buffer
//! without limit.

use std::io::{BufRead, BufReader, Read};
use std::process::ChildStderr;
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

/// The longest stderr line logged in one piece.
pub const MAX_LINE: usize = 4096;

/// How long a finished program's last stderr lines may take to arrive in the log. A program
/// that left a descendant holding its stderr open does not hold the worker up longer.
const DRAIN_WAIT: Duration = Duration::from_millis(500);

/// The thread logging one program's stderr.
#[derive(Debug)]
pub struct LineLogger {
    done: Receiver<()>,
}

impl LineLogger {
    /// Wait briefly for the last lines after the program has exited.
    pub fn finish(self) {
        let _ = self.done.recv_timeout(DRAIN_WAIT);
    }
}

/// Log each line of `err` as `listener `name` pid N: line`.
pub fn log_lines(err: ChildStderr, listener: &str, pid: u32) -> LineLogger {
    let (tx, done) = channel();
    let name = listener.to_string();
    let listener = name.clone();
    let spawned = std::thread::Builder::new()
        .name("socketd:stderr".into())
        .spawn(move || {
            let mut r = BufReader::new(err);
            let mut line = Vec::new();
            loop {
                line.clear();
                match (&mut r).take(MAX_LINE as u64).read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line);
                        log::info!("listener `{listener}` pid {pid}: {}", text.trim_end());
                    }
                }
            }
            let _ = tx.send(());
        });
    if let Err(e) = spawned {
        log::warn!("listener `{name}`: cannot start a stderr reader: {e}");
    }
    LineLogger { done }
}
