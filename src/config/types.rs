//! The validated configuration: the only shape of the config the rest of socketd sees.
//!
//! `validate()` (in `config::validate`, driven by `config::parse`) is the single place that turns text into these types, so
//! every other module can trust them: addresses parse, names are unique, limits are positive.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use super::protection::Protection;

/// Defaults live here, in one place, and are documented in `config/socketd.toml`.
pub mod defaults {
    use std::time::Duration;
    /// How long in-flight connections may run on after a stop begins.
    pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
    /// How long the new process of a binary upgrade has to become ready before it is killed
    /// and the old one carries on.
    pub const UPGRADE_TIMEOUT: Duration = Duration::from_secs(30);
    /// Threads or children one listener may use at once.
    pub const MAX_WORKERS: usize = 64;
    /// Kernel accept queue length for stream listeners.
    pub const BACKLOG: i32 = 1024;
    /// How a listener runs its handlers when `workers` is not given.
    pub const WORKERS: super::WorkerModel = super::WorkerModel::Threaded;
    /// `max_workers` of an `event` listener (open connections) when not given: event
    /// connections cost a few hundred bytes, not a thread.
    pub const EVENT_MAX_CONNECTIONS: usize = 10_000;
    /// Event loops per `event` listener when `threads` is not given: one per core.
    pub fn threads() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// Everything socketd was told to run, after validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where the text came from; reloads re-read this path.
    pub origin: PathBuf,
    /// `[daemon]`.
    pub daemon: DaemonConfig,
    /// Every `[[listener]]`, in file order.
    pub listeners: Vec<ListenerConfig>,
}

/// `[daemon]`: process-wide settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    /// How long in-flight connections may run on after a stop begins.
    pub shutdown_timeout: Duration,
    /// How long the new process of a binary upgrade may take to become ready.
    pub upgrade_timeout: Duration,
    /// Keep every listening socket in systemd's file-descriptor store (`FDSTORE=1`), so a
    /// `systemctl restart` gets them back and refuses nothing; unix socket files stay.
    pub fd_store: bool,
    /// Where the pid is written (locked), if anywhere.
    pub pidfile: Option<PathBuf>,
    /// The account to run as after binding.
    pub user: Option<String>,
    /// The group to run as after binding (default: the user's).
    pub group: Option<String>,
    /// Where log lines go.
    pub log: LogTarget,
    /// The most detailed level logged.
    pub log_level: log::LevelFilter,
    /// `[daemon.syslog]`: used when `log = "syslog"`.
    pub syslog: SyslogConfig,
    /// The control socket (`control`, `control_mode`, `control_group`).
    pub control: super::ops::ControlConfig,
    /// `access_log`: where the per-connection lines go.
    pub access_log: super::ops::AccessLogTarget,
    /// `[daemon.metrics] address`: the Prometheus endpoint, off when `None`.
    pub metrics: Option<std::net::SocketAddr>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            shutdown_timeout: defaults::SHUTDOWN_TIMEOUT,
            upgrade_timeout: defaults::UPGRADE_TIMEOUT,
            fd_store: false,
            pidfile: None,
            user: None,
            group: None,
            log: LogTarget::Stderr,
            log_level: log::LevelFilter::Info,
            syslog: SyslogConfig::default(),
            control: super::ops::ControlConfig {
                path: None,
                mode: super::ops::CONTROL_MODE,
                group: None,
            },
            access_log: super::ops::AccessLogTarget::Off,
            metrics: None,
        }
    }
}

/// `[daemon.syslog]`: where syslog lines go and how they look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyslogConfig {
    /// Where syslog lines are sent.
    pub address: SyslogAddr,
    /// The syslog facility code (0 kern .. 23 local7), from `SyslogConfig::FACILITIES`.
    pub facility: u8,
    /// RFC 3164 or RFC 5424 lines.
    pub format: SyslogFormat,
}

impl SyslogConfig {
    /// Facility names, indexed by their code (RFC 5424 section 6.2.1).
    pub const FACILITIES: &'static [&'static str] = &[
        "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron",
        "authpriv", "ftp", "ntp", "audit", "alert", "clock", "local0", "local1", "local2",
        "local3", "local4", "local5", "local6", "local7",
    ];
}

impl Default for SyslogConfig {
    fn default() -> Self {
        SyslogConfig {
            address: SyslogAddr::Unix("/dev/log".into()),
            facility: 3,
            format: SyslogFormat::Rfc3164,
        }
    }
}

/// Where the syslog daemon listens: `unix:PATH`, `udp:IP:PORT` or `tcp:IP:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyslogAddr {
    /// A local datagram socket (`/dev/log`).
    Unix(PathBuf),
    /// A syslog server over UDP.
    Udp(SocketAddr),
    /// A syslog server over TCP.
    Tcp(SocketAddr),
}

impl fmt::Display for SyslogAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SyslogAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            SyslogAddr::Udp(a) => write!(f, "udp:{a}"),
            SyslogAddr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// The syslog message format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyslogFormat {
    /// BSD syslog: `<PRI>Mmm dd hh:mm:ss socketd[PID]: text`.
    Rfc3164,
    /// `<PRI>1 TIMESTAMP HOST socketd PID MSGID - text`.
    Rfc5424,
}

impl SyslogFormat {
    /// The config file's names, for "valid values".
    pub const NAMES: &'static [&'static str] = &["rfc3164", "rfc5424"];

    /// The format a config name stands for.
    pub fn from_name(s: &str) -> Option<SyslogFormat> {
        match s {
            "rfc3164" => Some(SyslogFormat::Rfc3164),
            "rfc5424" => Some(SyslogFormat::Rfc5424),
            _ => None,
        }
    }
}

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    /// One line per event on stderr.
    Stderr,
    /// To syslog (`[daemon.syslog]`).
    Syslog,
}

impl LogTarget {
    /// Every valid config spelling, for error messages.
    pub const NAMES: &'static [&'static str] = &["stderr", "syslog"];

    /// The target a config spelling names, if any.
    pub fn from_name(s: &str) -> Option<LogTarget> {
        match s {
            "stderr" => Some(LogTarget::Stderr),
            "syslog" => Some(LogTarget::Syslog),
            _ => None,
        }
    }

    /// The config spelling, for messages and logs.
    pub fn name(self) -> &'static str {
        match self {
            LogTarget::Stderr => "stderr",
            LogTarget::Syslog => "syslog",
        }
    }
}

/// The four socket kinds socketd serves, as named in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Protocol {
    /// TCP stream sockets.
    Tcp,
    /// UDP datagram sockets.
    Udp,
    /// Unix stream sockets.
    Unix,
    /// Unix datagram sockets.
    UnixDgram,
}

impl Protocol {
    /// Every valid config spelling, for error messages.
    pub const NAMES: &'static [&'static str] = &["tcp", "udp", "unix", "unix-dgram"];

    /// The protocol a config name stands for.
    pub fn from_name(s: &str) -> Option<Protocol> {
        match s {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            "unix" => Some(Protocol::Unix),
            "unix-dgram" => Some(Protocol::UnixDgram),
            _ => None,
        }
    }

    /// The config file's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Unix => "unix",
            Protocol::UnixDgram => "unix-dgram",
        }
    }

    /// Datagram listeners hand one datagram to a handler instead of a connection.
    pub fn is_datagram(self) -> bool {
        matches!(self, Protocol::Udp | Protocol::UnixDgram)
    }

    /// Unix kinds take a filesystem path instead of ip:port.
    pub fn is_unix(self) -> bool {
        matches!(self, Protocol::Unix | Protocol::UnixDgram)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a listener binds: an IP socket address or a filesystem path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ListenAddr {
    /// An IP address and port (port 0: any free port).
    Inet(SocketAddr),
    /// A filesystem path, for the unix kinds.
    Path(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Inet(a) => write!(f, "{a}"),
            ListenAddr::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

/// How a listener runs its handlers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WorkerModel {
    /// A bounded pool of threads (socketserver's ThreadingMixIn).
    Threaded,
    /// One child process per connection or datagram (ForkingMixIn).
    Forked,
    /// Built-in services as state machines on `threads` event loops (no socketserver twin).
    Event,
}

impl WorkerModel {
    /// The config file's names, for "valid values".
    pub const NAMES: &'static [&'static str] = &["threaded", "forked", "event"];

    /// The model a config name stands for.
    pub fn from_name(s: &str) -> Option<WorkerModel> {
        match s {
            "threaded" => Some(WorkerModel::Threaded),
            "forked" => Some(WorkerModel::Forked),
            "event" => Some(WorkerModel::Event),
            _ => None,
        }
    }

    /// The config file's name for it.
    pub fn name(self) -> &'static str {
        match self {
            WorkerModel::Threaded => "threaded",
            WorkerModel::Forked => "forked",
            WorkerModel::Event => "event",
        }
    }
}

/// One `[[listener]]`, validated. Serde lets the main loop hand it to the fork server on start
/// and reload (`worker::forked`), so every field's type needs Serialize and Deserialize too.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ListenerConfig {
    /// Unique; the listener's identity across reloads.
    pub name: String,
    /// The socket kind.
    pub protocol: Protocol,
    /// Where it listens.
    pub address: ListenAddr,
    /// A built-in or registered handler name (checked against the registry).
    pub handler: String,
    /// How requests are run: threads, forked children, or event loops.
    pub workers: WorkerModel,
    /// Threads or children at once; with `workers = "event"`, open connections at once.
    pub max_workers: usize,
    /// Event loops for `workers = "event"` (ignored by the other models).
    pub threads: usize,
    /// Admission control, limits, timeouts and socket file permissions (all optional).
    pub protect: Protection,
    /// The table named after the handler (`exec = {...}`), if the listener has one.
    pub handler_settings: Option<toml::Table>,
    /// `tls = { ... }`: terminate TLS before the handler (stream listeners only).
    pub tls: Option<super::tls::TlsSettings>,
}

impl ListenerConfig {
    /// A listener built in code rather than read from a file: the defaults a config file
    /// would get for every key not given (threaded workers, `MAX_WORKERS`, no protection
    /// beyond the defaults, no handler settings).
    pub fn new(name: &str, protocol: Protocol, address: ListenAddr, handler: &str) -> Self {
        ListenerConfig {
            name: name.to_string(),
            protocol,
            address,
            handler: handler.to_string(),
            workers: defaults::WORKERS,
            max_workers: defaults::MAX_WORKERS,
            threads: defaults::threads(),
            protect: Protection::default(),
            handler_settings: None,
            tls: None,
        }
    }
}
