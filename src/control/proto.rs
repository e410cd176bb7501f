//! The control protocol's messages: versioned JSON, one object per line.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The protocol version this socketd speaks; requests must name it.
pub const VERSION: u64 = 1;

/// The longest request line accepted (the answer to a longer one is an error).
pub const MAX_REQUEST: usize = 64 * 1024;

/// One thing a client asks the daemon to do. The JSON form is the variant's kebab-case name
/// in `command`, with its fields beside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Command {
    /// The daemon and every listener: counters, state, config checksum, last reload.
    Status,
    /// Re-read the config file; the answer says whether it was applied, and why not.
    Reload,
    /// Stop gracefully (like SIGTERM), or at once with `now` (like a second SIGTERM).
    Stop {
        #[serde(default)]
        now: bool,
    },
    /// Stop accepting on a listener; its socket stays open and the kernel queues.
    Pause { listener: String },
    /// Accept again on a paused listener.
    Resume { listener: String },
    /// Close a listener's socket and let its connections finish (until the next reload).
    Drain { listener: String },
    /// Reopen the access log file (after logrotate moved it).
    ReopenLogs,
    /// Replace the binary (as SIGUSR2): the answer comes once the new process serves (its
    /// pid) or has been given up on (why, with its last output).
    Upgrade {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        binary: Option<std::path::PathBuf>,
    },
}

impl Command {
    /// Every command name, for error messages.
    pub const NAMES: &'static [&'static str] = &[
        "status",
        "reload",
        "stop",
        "pause",
        "resume",
        "drain",
        "reopen-logs",
        "upgrade",
    ];

    /// The request line for this command (without its newline).
    pub fn encode(&self) -> String {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Value::Object(m) = &mut v {
            m.insert("version".into(), json!(VERSION));
        }
        v.to_string()
    }

    /// Read a request line; the error is what the client is told.
    pub fn decode(line: &[u8]) -> Result<Command, String> {
        let text = std::str::from_utf8(line).map_err(|_| "the request is not UTF-8".to_string())?;
        let mut v: Value = serde_json::from_str(text.trim()).map_err(|e| {
            format!(
                "the request is not JSON ({e}); send one object per line, e.g. \
                 {{\"version\":{VERSION},\"command\":\"status\"}}"
            )
        })?;
        let Value::Object(m) = &mut v else {
            return Err("the request must be a JSON object".into());
        };
        match m.remove("version") {
            Some(Value::Number(n)) if n.as_u64() == Some(VERSION) => {}
            Some(other) => {
                return Err(format!(
                    "unsupported protocol version {other}; this socketd speaks version {VERSION}"
                ))
            }
            None => return Err(format!("the request has no \"version\" (use {VERSION})")),
        }
        match m.get("command") {
            Some(Value::String(c)) if !Self::NAMES.contains(&c.as_str()) => {
                return Err(format!(
                    "unknown command {c:?}; known commands: {}",
                    Self::NAMES.join(", ")
                ))
            }
            Some(Value::String(_)) => {}
            _ => return Err("the request has no \"command\" string".into()),
        }
        let keys: Vec<String> = m.keys().cloned().collect();
        let command: Command =
            serde_json::from_value(v).map_err(|e| format!("bad request: {e}"))?;
        // serde ignores extra fields beside a unit variant's tag; a typo must not pass.
        let known = serde_json::to_value(&command).unwrap_or(Value::Null);
        if let Some(k) = keys.iter().find(|k| known.get(k.as_str()).is_none()) {
            return Err(format!(
                "bad request: unknown field `{k}` for command {}",
                known["command"]
            ));
        }
        Ok(command)
    }
}

/// What the connection does after the answer is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    Close,
    /// Keep it open until the process exits, so the client sees EOF when the stop is done.
    HoldUntilExit,
}

/// The loop's answer to one command.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub body: Value,
    pub then: Then,
}

impl Reply {
    /// `{"version":1,"ok":true, …fields}`.
    pub fn ok(fields: Value) -> Reply {
        let mut body = json!({"version": VERSION, "ok": true});
        if let (Value::Object(b), Value::Object(f)) = (&mut body, fields) {
            b.extend(f);
        }
        Reply {
            body,
            then: Then::Close,
        }
    }

    /// `{"version":1,"ok":false,"error":…, …fields}`.
    pub fn error(message: impl Into<String>, fields: Value) -> Reply {
        let mut body = json!({"version": VERSION, "ok": false, "error": message.into()});
        if let (Value::Object(b), Value::Object(f)) = (&mut body, fields) {
            b.extend(f);
        }
        Reply {
            body,
            then: Then::Close,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip() {
        for c in [
            Command::Status,
            Command::Reload,
            Command::Stop { now: true },
            Command::Pause {
                listener: "echo".into(),
            },
            Command::Drain {
                listener: "x".into(),
            },
            Command::ReopenLogs,
            Command::Upgrade { binary: None },
            Command::Upgrade {
                binary: Some("/usr/sbin/socketd.new".into()),
            },
        ] {
            let line = c.encode();
            assert!(line.contains("\"version\":1"), "{line}");
            assert_eq!(Command::decode(line.as_bytes()), Ok(c));
        }
        assert_eq!(
            Command::decode(br#"{"version":1,"command":"stop"}"#),
            Ok(Command::Stop { now: false })
        );
        assert_eq!(
            Command::decode(br#"{"version":1,"command":"upgrade"}"#),
            Ok(Command::Upgrade { binary: None })
        );
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let err = |b: &[u8]| Command::decode(b).unwrap_err();
        assert!(err(b"hello").contains("not JSON"));
        assert!(err(b"[1]").contains("JSON object"));
        assert!(err(br#"{"command":"status"}"#).contains("no \"version\""));
        assert!(err(br#"{"version":2,"command":"status"}"#).contains("version 2"));
        assert!(err(br#"{"version":1,"command":"explode"}"#).contains("known commands: status"));
        assert!(err(br#"{"version":1,"command":"pause"}"#).contains("listener"));
        assert!(err(br#"{"version":1,"command":"status","x":1}"#).contains("unknown field"));
        assert!(err(b"\xff\xfe").contains("UTF-8"));
    }
}
