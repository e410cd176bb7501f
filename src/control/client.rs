//! The client side: `socketd status|reload|stop|pause|resume|drain|reopen-logs`. Finds the
//! socket (`--control PATH`, or `[daemon] control` in the config file), sends one request,
//! prints the answer for a person (or the JSON with `--json`), and exits 0 when the daemon
//! did it, 1 when it refused (a reload's errors are printed), 3 when it cannot be reached.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::Command;

/// Exit code: the daemon answered and refused (an invalid config for `reload`, an unknown
/// listener).
pub const EXIT_REFUSED: u8 = 1;
/// Exit code: the daemon could not be reached or did not answer.
pub const EXIT_UNREACHABLE: u8 = 3;

/// How long the client waits for an answer (a reload binds sockets; allow for it).
const ANSWER_WAIT: Duration = Duration::from_secs(65);
/// After `stop`, how much longer than `shutdown_timeout` to wait for the exit.
const STOP_SLACK: Duration = Duration::from_secs(10);

/// Where the control socket is: `--control`, else `[daemon] control` read from the config
/// file's text alone (a file that does not validate must not stop `socketd reload` from
/// reaching the daemon to be told why).
pub fn find_socket(config: &Path, control: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = control {
        return Ok(p.to_path_buf());
    }
    let text = std::fs::read_to_string(config).map_err(|e| {
        format!(
            "cannot read {} to find the control socket: {e}; pass --control PATH",
            config.display()
        )
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        format!(
            "cannot read [daemon] control from {}: {}; pass --control PATH",
            config.display(),
            e.message()
        )
    })?;
    match table
        .get("daemon")
        .and_then(|d| d.get("control"))
        .and_then(|c| c.as_str())
    {
        Some(p) => Ok(PathBuf::from(p)),
        None => Err(format!(
            "{} has no control socket: set control = \"/run/socketd/control\" in [daemon] \
             (and restart), or pass --control PATH",
            config.display()
        )),
    }
}

/// Send `command` to the daemon at `socket`; returns the answer and the open stream.
pub fn request(socket: &Path, command: &Command) -> Result<(Value, UnixStream), String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot connect to the control socket {}: {e}",
            socket.display()
        )
    })?;
    let _ = stream.set_write_timeout(Some(ANSWER_WAIT));
    let _ = stream.set_read_timeout(Some(ANSWER_WAIT));
    stream
        .write_all(format!("{}\n", command.encode()).as_bytes())
        .map_err(|e| format!("cannot send to {}: {e}", socket.display()))?;
    let mut line = String::new();
    let mut reader = BufReader::new(&stream);
    reader
        .read_line(&mut line)
        .map_err(|e| format!("no answer from {}: {e}", socket.display()))?;
    if line.is_empty() {
        return Err(format!("{} closed without answering", socket.display()));
    }
    let v: Value = serde_json::from_str(&line)
        .map_err(|e| format!("the daemon's answer is not JSON ({e}): {line}"))?;
    Ok((v, stream))
}

/// Run one client subcommand.
pub fn run(socket: &Path, command: Command, json: bool) -> ExitCode {
    let (answer, stream) = match request(socket, &command) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("socketd: {e}");
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    if json {
        println!("{answer}");
    }
    if answer["ok"] != Value::Bool(true) {
        if !json {
            eprintln!(
                "socketd: {}",
                answer["error"].as_str().unwrap_or("the daemon refused")
            );
            for e in answer["reload"]["errors"].as_array().into_iter().flatten() {
                eprintln!("  {}", e.as_str().unwrap_or_default());
            }
        }
        return ExitCode::from(EXIT_REFUSED);
    }
    if !json {
        print_human(&command, &answer);
    }
    if let Command::Stop { .. } = command {
        return wait_stopped(stream, &answer, json);
    }
    ExitCode::SUCCESS
}

/// The daemon keeps the connection open until it exits: EOF means stopped.
fn wait_stopped(stream: UnixStream, answer: &Value, json: bool) -> ExitCode {
    let timeout = answer["stop"]["shutdown_timeout_seconds"]
        .as_f64()
        .map_or(Duration::from_secs(30), Duration::from_secs_f64)
        + STOP_SLACK;
    let deadline = Instant::now() + timeout;
    let mut reader = BufReader::new(&stream);
    let mut sink = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            eprintln!("socketd: still stopping after {}s", timeout.as_secs());
            return ExitCode::from(EXIT_UNREACHABLE);
        }
        let _ = stream.set_read_timeout(Some(left));
        sink.clear();
        match reader.read_line(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break, // reset: gone all the same
        }
    }
    if !json {
        println!("stopped");
    }
    ExitCode::SUCCESS
}

fn print_human(command: &Command, a: &Value) {
    match command {
        Command::Status => print_status(&a["status"]),
        Command::Reload => println!(
            "reloaded: {}",
            a["reload"]["summary"].as_str().unwrap_or_default()
        ),
        Command::Stop { now } => println!(
            "stopping{} (pid {}, {} connections in flight)",
            if *now { " now" } else { "" },
            a["stop"]["pid"],
            a["stop"]["in_flight"]
        ),
        Command::Pause { listener } => println!("listener `{listener}` paused"),
        Command::Resume { listener } => println!("listener `{listener}` accepting"),
        Command::Drain { listener } => println!(
            "listener `{listener}` closed; draining {} connections",
            a["draining"]
        ),
        Command::ReopenLogs => println!(
            "access log reopened ({})",
            a["reopened"].as_str().unwrap_or_default()
        ),
        Command::Upgrade { .. } => println!(
            "upgraded: pid {} -> pid {}",
            a["upgrade"]["from"], a["upgrade"]["pid"]
        ),
    }
}

fn mib(v: &Value) -> String {
    v.as_f64()
        .map_or("?".into(), |b| format!("{:.1} MiB", b / 1_048_576.0))
}

fn print_status(s: &Value) {
    let p = &s["process"];
    let up = p["uptime_seconds"].as_f64().unwrap_or(0.0);
    println!(
        "socketd {} pid {}: {}, up {}",
        p["version"].as_str().unwrap_or("?"),
        p["pid"],
        s["state"].as_str().unwrap_or("?"),
        humantime::format_duration(Duration::from_secs(up as u64))
    );
    println!("process: {} fds, RSS {}", p["fds"], mib(&p["rss_bytes"]));
    println!(
        "config: {} (sha256 {})",
        s["config"]["path"].as_str().unwrap_or("?"),
        s["config"]["sha256"].as_str().unwrap_or("?")
    );
    let r = &s["reloads"];
    let last = &r["last"];
    let last_text = if last.is_null() {
        "none".to_string()
    } else if last["ok"] == Value::Bool(true) {
        format!("ok ({})", last["summary"].as_str().unwrap_or_default())
    } else {
        let errors: Vec<&str> = last["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        format!("refused: {}", errors.join("; "))
    };
    println!(
        "reloads: {} ok, {} refused; last: {last_text}",
        r["ok"], r["refused"]
    );
    let al = &s["access_log"];
    println!(
        "access log: {}, {} lines written, {} dropped",
        al["target"].as_str().unwrap_or("?"),
        al["written"],
        al["dropped"]
    );
    if let Some(m) = s["metrics"].as_str() {
        println!("metrics: http://{m}/metrics");
    }
    println!(
        "{:<16} {:<10} {:<24} {:<9} {:<10} {:>6} {:>9} {:>9} {:>8} {:>7}",
        "LISTENER",
        "PROTO",
        "ADDRESS",
        "WORKERS",
        "STATE",
        "OPEN",
        "BUSY/MAX",
        "ACCEPTED",
        "REFUSED",
        "ERRORS"
    );
    for l in s["listeners"].as_array().into_iter().flatten() {
        let refused: u64 = l["refused"]
            .as_object()
            .map(|m| m.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0);
        println!(
            "{:<16} {:<10} {:<24} {:<9} {:<10} {:>6} {:>9} {:>9} {:>8} {:>7}",
            l["name"].as_str().unwrap_or("?"),
            l["protocol"].as_str().unwrap_or("?"),
            l["address"].as_str().unwrap_or("-"),
            l["workers"].as_str().unwrap_or("?"),
            l["state"].as_str().unwrap_or("?"),
            l["open"].to_string(),
            format!("{}/{}", l["busy"], l["max_workers"]),
            l["accepted"].to_string(),
            refused,
            l["handler_errors"].to_string()
        );
        if let Some(m) = l["refused"].as_object() {
            let by: Vec<String> = m
                .iter()
                .filter(|(_, v)| v.as_u64().unwrap_or(0) > 0)
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            if !by.is_empty() {
                println!("{:<16} refused: {}", "", by.join(", "));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(text: &str) -> Result<PathBuf, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).expect("write");
        find_socket(&path, None)
    }

    #[test]
    fn the_socket_comes_from_the_daemon_table_even_in_an_invalid_file() {
        assert_eq!(
            find("[daemon]\ncontrol = \"/run/x/control\"\nbogus = 1\n[[listener]]\nname = 5\n"),
            Ok(PathBuf::from("/run/x/control"))
        );
        assert!(find("[daemon]\n")
            .unwrap_err()
            .contains("has no control socket"));
        assert!(find("[daemon\n")
            .unwrap_err()
            .contains("pass --control PATH"));
        assert_eq!(
            find_socket(Path::new("/nonexistent.toml"), Some(Path::new("/s"))),
            Ok(PathBuf::from("/s")),
            "--control wins without reading the file"
        );
    }
}
