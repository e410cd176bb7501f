//! `[daemon]` settings for operating a running daemon: the control socket (`control`,
//! `control_mode`, `control_group`), the access log sink (`access_log`) and the Prometheus
//! endpoint (`[daemon.metrics] address`). Types here, checks in `validate_ops`.

use std::net::SocketAddr;
use std::path::PathBuf;

use toml::Spanned;

use super::raw::RawDaemon;
use super::validate::Check;
use super::values::{parse_inet, parse_unix_path};

/// Mode of the control socket file when neither `control_mode` nor `control_group` is set:
/// only the daemon's own user (and root) may connect.
pub const CONTROL_MODE: u32 = 0o600;
/// Mode when `control_group` is set and `control_mode` is not: that group may connect too.
pub const CONTROL_GROUP_MODE: u32 = 0o660;

/// The control socket (`socketd status`, `reload`, …); off unless `control` is set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ControlConfig {
    /// Where the socket is (`control`); `None`: no control socket.
    pub path: Option<PathBuf>,
    /// The socket file's mode.
    pub mode: u32,
    /// The socket file's group (name or number), if not the daemon's own.
    pub group: Option<String>,
}

/// Where access lines (one per connection) go: their own sink, never the daemon's log.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AccessLogTarget {
    /// No access lines (the default: see README, "Access log").
    #[default]
    Off,
    /// To the daemon's stderr (the foreground; under journald it shares the daemon's stream).
    Stderr,
    /// The syslog destination of `[daemon.syslog]`.
    Syslog,
    /// Appended to a file, reopened on SIGHUP and `socketd reopen-logs`.
    File(PathBuf),
}

impl AccessLogTarget {
    /// The config spelling.
    pub fn describe(&self) -> String {
        match self {
            AccessLogTarget::Off => "off".into(),
            AccessLogTarget::Stderr => "stderr".into(),
            AccessLogTarget::Syslog => "syslog".into(),
            AccessLogTarget::File(p) => format!("file:{}", p.display()),
        }
    }

    fn parse(text: &str) -> Result<AccessLogTarget, String> {
        let usage = "valid values: \"off\" (the default), \"stderr\", \"syslog\", \"file:PATH\" \
                     (an absolute path, e.g. \"file:/var/log/socketd/access.log\")";
        match text {
            "off" => Ok(AccessLogTarget::Off),
            "stderr" => Ok(AccessLogTarget::Stderr),
            "syslog" => Ok(AccessLogTarget::Syslog),
            _ => match text.strip_prefix("file:") {
                Some(path) if path.starts_with('/') => Ok(AccessLogTarget::File(path.into())),
                Some(path) => Err(format!("{path:?} is not an absolute path; {usage}")),
                None => Err(format!("unknown access log target {text:?}; {usage}")),
            },
        }
    }
}

/// `[daemon]`'s operating settings, read from the same raw table as the rest of `[daemon]`.
pub(super) fn validate_ops(
    raw: &RawDaemon,
    c: &mut Check<'_, '_>,
) -> (ControlConfig, AccessLogTarget, Option<SocketAddr>) {
    let path = raw.control.as_ref().and_then(|p| {
        parse_unix_path(p.get_ref())
            .map_err(|detail| c.error(&p.span(), "control", detail))
            .ok()
    });
    let group = c.text(&raw.control_group, "control_group");
    if let (Some(g), Some(span)) = (&group, raw.control_group.as_ref().map(Spanned::span)) {
        if super::resolve_group(g).is_err() {
            c.error(
                &span,
                "control_group",
                format!("no group {g:?} on this system; name an existing group or a number"),
            );
        }
    }
    let default_mode = if group.is_some() {
        CONTROL_GROUP_MODE
    } else {
        CONTROL_MODE
    };
    let mode = raw.control_mode.as_ref().map_or(default_mode, |m| {
        let digits = m.get_ref().strip_prefix("0o").unwrap_or(m.get_ref());
        match u32::from_str_radix(digits, 8) {
            Ok(mode) if mode <= 0o777 && !digits.is_empty() => mode,
            _ => {
                let detail = format!(
                    "{:?} is not an octal file mode; e.g. control_mode = \"0600\" (only the \
                     daemon's user) or \"0660\" (and control_group)",
                    m.get_ref()
                );
                c.error(&m.span(), "control_mode", detail);
                default_mode
            }
        }
    });
    let access = raw.access_log.as_ref().map_or(AccessLogTarget::Off, |a| {
        AccessLogTarget::parse(a.get_ref()).unwrap_or_else(|detail| {
            c.error(&a.span(), "access_log", detail);
            AccessLogTarget::Off
        })
    });
    let metrics = raw
        .metrics
        .as_ref()
        .and_then(|m| m.address.as_ref())
        .and_then(|a| {
            parse_inet(a.get_ref())
                .map_err(|detail| {
                    c.error(
                        &a.span(),
                        "metrics.address",
                        format!("{detail}; e.g. address = \"127.0.0.1:9107\""),
                    )
                })
                .ok()
        });
    (ControlConfig { path, mode, group }, access, metrics)
}
