//! Watching the new process of an upgrade: its words on the readiness pipe, its start-up
//! output, its end (through its helper's pidfd), its deadline; and letting it go (`release`)
//! or giving up on it (`abandon`).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// How much of the new process's start-up output is kept for the failure report.
const TAIL: usize = 4096;

/// The new process, started and not yet judged.
#[derive(Debug)]
pub struct Started {
    /// The new process.
    pub pid: Pid,
    /// Its parent until it is ready (`child::helper`), this process's child.
    pub(super) helper: Option<Pid>,
    /// Closing this lets the helper exit (`release`).
    pub(super) release: Option<OwnedFd>,
    pub binary: PathBuf,
    /// The helper's pidfd: readable when it exits, which before the release means the new
    /// process has ended.
    pub pidfd: OwnedFd,
    /// Read ends, non-blocking.
    pub ready: File,
    pub output: File,
    pub deadline: Instant,
    pub(super) timeout: Duration,
    pub(super) ready_text: Vec<u8>,
    pub(super) tail: Vec<u8>,
}

/// What the new process has said so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    Waiting,
    Ready,
    Failed(String),
}

impl Started {
    /// Read what the new process (or its helper) wrote on the readiness pipe.
    pub fn on_ready_pipe(&mut self) -> Progress {
        let mut buf = [0u8; 1024];
        loop {
            match self.ready.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => self.ready_text.extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        // Lines come from the new process (`ok`, `exit CODE why`, `exec-failed ...`) and then
        // maybe from the helper (`exit-status S`); the first decisive one counts.
        let text = String::from_utf8_lossy(&self.ready_text).into_owned();
        let mut lines = text.split_inclusive('\n').filter(|l| l.ends_with('\n'));
        match lines.next() {
            Some(line) => match parse_word(line.trim()) {
                Progress::Failed(why) if line.starts_with("exit-status ") => {
                    self.on_output(); // it has ended: all it wrote is in the pipe
                    Progress::Failed(format!("{why}{}", self.output_said()))
                }
                p => p,
            },
            None => Progress::Waiting,
        }
    }

    /// Copy the new process's start-up output to this process's stderr and keep its tail.
    pub fn on_output(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            match self.output.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => {
                    let _ = io::stderr().write_all(&buf[..k]);
                    self.tail.extend_from_slice(&buf[..k]);
                    if self.tail.len() > TAIL {
                        self.tail.drain(..self.tail.len() - TAIL);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }

    /// The helper exited (its pidfd is readable): the new process has ended. Reap the helper
    /// and say how the new process ended.
    pub fn on_exit(&mut self) -> Progress {
        if let Some(helper) = self.helper.take() {
            let _ = nix::sys::wait::waitpid(helper, None);
        }
        self.on_output();
        match self.on_ready_pipe() {
            Progress::Failed(why) => Progress::Failed(why),
            _ => Progress::Failed(format!(
                "the new process (pid {}) ended before it was ready{}",
                self.pid,
                self.output_said()
            )),
        }
    }

    /// `Some(why)` once the deadline has passed without a word.
    pub fn expired(&mut self, now: Instant) -> Option<String> {
        if now < self.deadline {
            return None;
        }
        self.on_output();
        Some(format!(
            "the new process (pid {}) was not ready within {}{}",
            self.pid,
            humantime::format_duration(self.timeout),
            self.output_said()
        ))
    }

    /// The new process's last lines of output, for a failure message.
    fn output_said(&self) -> String {
        let text = String::from_utf8_lossy(&self.tail);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.is_empty() {
            return "; it printed nothing".to_string();
        }
        let last: Vec<&str> = lines.iter().rev().take(5).rev().copied().collect();
        format!("; its output ended with: {}", last.join(" | "))
    }

    /// The new process serves: let the helper go and wait for it, so the new process is the
    /// service manager's child (re-parented) before it is named the main process.
    pub fn release(&mut self) {
        drop(self.release.take());
        if let Some(helper) = self.helper.take() {
            let _ = nix::sys::wait::waitpid(helper, None);
        }
    }

    /// Give up on the new process: SIGKILL it; its helper reaps it and exits, and is reaped
    /// on a thread here (it may take a moment).
    pub fn abandon(mut self) {
        let _ = nix::sys::signal::kill(self.pid, Signal::SIGKILL);
        let Some(helper) = self.helper.take() else {
            return;
        };
        drop(self.release.take());
        let reaper = std::thread::Builder::new().name("upgrade-reap".into());
        let spawned = reaper.spawn(move || {
            let _ = nix::sys::wait::waitpid(helper, None);
        });
        if spawned.is_err() {
            let _ = nix::sys::wait::waitpid(helper, None);
        }
    }
}

/// A line on the readiness pipe: `ok`, `exit CODE why`, `exec-failed CALL ERRNO`, or the
/// helper's `exit-status S` (a wait status).
pub(super) fn parse_word(line: &str) -> Progress {
    if line == "ok" {
        return Progress::Ready;
    }
    if let Some(rest) = line.strip_prefix("exec-failed ") {
        let (call, errno) = rest.split_once(' ').unwrap_or((rest, ""));
        let e = errno
            .parse()
            .map(io::Error::from_raw_os_error)
            .map_or_else(|_| errno.to_string(), |e| e.to_string());
        return Progress::Failed(format!("cannot start the new binary ({call}: {e})"));
    }
    if let Some(rest) = line.strip_prefix("exit-status ") {
        let how = match rest.parse::<i32>() {
            Ok(s) if libc::WIFEXITED(s) => format!("exited with status {}", libc::WEXITSTATUS(s)),
            Ok(s) if libc::WIFSIGNALED(s) => match Signal::try_from(libc::WTERMSIG(s)) {
                Ok(sig) => format!("was killed by {sig}"),
                Err(_) => format!("was killed by signal {}", libc::WTERMSIG(s)),
            },
            _ => format!("ended (wait status {rest})"),
        };
        return Progress::Failed(format!("the new process {how} before it was ready"));
    }
    if let Some(rest) = line.strip_prefix("exit ") {
        let (code, why) = rest.split_once(' ').unwrap_or((rest, ""));
        return Progress::Failed(format!(
            "the new process failed to start (exit {code}): {why}"
        ));
    }
    Progress::Failed(format!("the new process said {line:?} instead of `ok`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_words_are_read_as_the_detach_pipe_writes_them() {
        assert_eq!(parse_word("ok"), Progress::Ready);
        assert_eq!(
            parse_word("exit 3 listener `a`: cannot listen"),
            Progress::Failed(
                "the new process failed to start (exit 3): listener `a`: cannot listen".into()
            )
        );
        let Progress::Failed(why) = parse_word("exec-failed execve 2") else {
            panic!("not a failure");
        };
        assert!(why.contains("execve: No such file or directory"), "{why}");
    }
}
