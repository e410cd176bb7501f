//! `validate()`: raw structs -> the `Config` types, with every semantic rule and every message.
//!
//! Each key is one line here, through a `Check` helper (`required`, `choice`, `positive`,
//! `duration`, `text`) that reports at the key's own line and keeps going with a default, so all
//! problems in a file come out together. Rules that span listeners are in `across`.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use toml::Spanned;

use super::error::Diagnostics;
use super::raw::{RawDaemon, RawListener};
use super::types::*;
use super::values::{parse_duration, parse_inet, parse_unix_path, suggest};
use super::{BuildContext, Catalog};

/// Where in the file a problem is, as the first words of its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Section {
    Top,
    Daemon,
    /// `number` is 1-based, in file order; `name` is the listener's `name` if it has a usable one.
    Listener {
        number: usize,
        name: Option<String>,
    },
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Section::Top => f.write_str("top level"),
            Section::Daemon => f.write_str("[daemon]"),
            Section::Listener {
                name: Some(name), ..
            } => write!(f, "listener `{name}`"),
            Section::Listener { number, .. } => write!(f, "listener #{number}"),
        }
    }
}

/// Reports problems for one section and turns raw values into checked ones, with defaults.
pub(super) struct Check<'d, 'a> {
    pub diags: &'d mut Diagnostics<'a>,
    pub section: Section,
    /// Keys written in the table, valid or not: one with a wrong type (already reported) is
    /// not also "missing".
    pub present: Vec<String>,
}

impl Check<'_, '_> {
    /// Report `detail` about `key` at `span`.
    pub fn error(&mut self, span: &Range<usize>, key: &str, detail: impl fmt::Display) {
        let message = format!("{}: key `{key}`: {detail}", self.section);
        self.diags.error(span, message);
    }

    /// A key that must be present; reported at the table's header when it is missing.
    pub fn required<T>(
        &mut self,
        value: &Option<Spanned<T>>,
        key: &str,
        table: &Range<usize>,
        example: &str,
    ) {
        if value.is_none() && !self.present.iter().any(|k| k == key) {
            let message = format!(
                "{}: missing required key `{key}`; add e.g. {key} = {example}",
                self.section
            );
            self.diags.error(table, message);
        }
    }

    /// One of a fixed set of names (`names`), turned into `T` by `from_name`.
    pub fn choice<T>(
        &mut self,
        value: &Option<Spanned<String>>,
        key: &str,
        (noun, names): (&str, &[&str]),
        from_name: impl Fn(&str) -> Option<T>,
    ) -> Option<T> {
        let value = value.as_ref()?;
        let found = from_name(value.get_ref());
        if found.is_none() {
            let typo = match suggest(value.get_ref(), names) {
                Some(near) => format!("did you mean {near:?}? "),
                None => String::new(),
            };
            let detail = format!(
                "unknown {noun} {:?}; {typo}valid values: {}",
                value.get_ref(),
                names.join(", ")
            );
            self.error(&value.span(), key, detail);
        }
        found
    }

    /// A count that must be 1 or more.
    pub fn positive(&mut self, value: &Option<Spanned<i64>>, key: &str, default: usize) -> usize {
        let Some(value) = value else { return default };
        match usize::try_from(*value.get_ref()) {
            Ok(n) if n > 0 => n,
            _ => {
                let detail = format!(
                    "must be a whole number of 1 or more, found {}; e.g. {key} = {default} (the default)",
                    value.get_ref()
                );
                self.error(&value.span(), key, detail);
                default
            }
        }
    }

    /// A duration string such as "10s".
    pub fn duration(
        &mut self,
        value: &Option<Spanned<String>>,
        key: &str,
        default: Duration,
    ) -> Duration {
        let Some(value) = value else { return default };
        parse_duration(value.get_ref()).unwrap_or_else(|detail| {
            self.error(&value.span(), key, detail);
            default
        })
    }

    /// A string that must not be empty (names, users, paths).
    pub fn text(&mut self, value: &Option<Spanned<String>>, key: &str) -> Option<String> {
        let value = value.as_ref()?;
        if value.get_ref().trim().is_empty() {
            self.error(&value.span(), key, "must not be empty");
            return None;
        }
        Some(value.get_ref().clone())
    }
}

/// A noun for messages and the valid spellings, for `Check::choice`.
type Choices<'n> = (&'n str, &'n [&'n str]);

const PROTOCOLS: Choices = ("protocol", Protocol::NAMES);
const WORKER_MODELS: Choices = ("worker model", WorkerModel::NAMES);
const LOG_TARGETS: Choices = ("log target", LogTarget::NAMES);
const LOG_LEVELS: Choices = ("log level", &["error", "warn", "info", "debug", "trace"]);

fn log_level(name: &str) -> Option<log::LevelFilter> {
    match name {
        "error" => Some(log::LevelFilter::Error),
        "warn" => Some(log::LevelFilter::Warn),
        "info" => Some(log::LevelFilter::Info),
        "debug" => Some(log::LevelFilter::Debug),
        "trace" => Some(log::LevelFilter::Trace),
        _ => None,
    }
}

/// `[daemon]`: every key optional, defaults from `DaemonConfig::default()`.
pub(super) fn validate_daemon(raw: &RawDaemon, c: &mut Check<'_, '_>) -> DaemonConfig {
    let d = DaemonConfig::default();
    let (control, access_log, metrics) = super::ops::validate_ops(raw, c);
    DaemonConfig {
        control,
        access_log,
        metrics,
        shutdown_timeout: c.duration(
            &raw.shutdown_timeout,
            "shutdown_timeout",
            d.shutdown_timeout,
        ),
        upgrade_timeout: c.duration(&raw.upgrade_timeout, "upgrade_timeout", d.upgrade_timeout),
        fd_store: raw.fd_store.as_ref().map_or(d.fd_store, |v| *v.get_ref()),
        pidfile: c.text(&raw.pidfile, "pidfile").map(PathBuf::from),
        user: c.text(&raw.user, "user"),
        group: c.text(&raw.group, "group"),
        log: c
            .choice(&raw.log, "log", LOG_TARGETS, LogTarget::from_name)
            .unwrap_or(d.log),
        log_level: c
            .choice(&raw.log_level, "log_level", LOG_LEVELS, log_level)
            .unwrap_or(d.log_level),
        syslog: validate_syslog(raw.syslog.as_ref(), c),
    }
}

const SYSLOG_FORMATS: Choices = ("syslog format", SyslogFormat::NAMES);
const SYSLOG_FACILITIES: Choices = ("syslog facility", SyslogConfig::FACILITIES);

/// `[daemon.syslog]`: every key optional.
fn validate_syslog(raw: Option<&super::raw::RawSyslog>, c: &mut Check<'_, '_>) -> SyslogConfig {
    let d = SyslogConfig::default();
    let Some(raw) = raw else { return d };
    let facility = |name: &str| SyslogConfig::FACILITIES.iter().position(|f| *f == name);
    let address = raw
        .address
        .as_ref()
        .and_then(|a| match parse_syslog_addr(a.get_ref()) {
            Ok(addr) => Some(addr),
            Err(detail) => {
                c.error(&a.span(), "syslog.address", detail);
                None
            }
        });
    SyslogConfig {
        address: address.unwrap_or(d.address),
        facility: c
            .choice(
                &raw.facility,
                "syslog.facility",
                SYSLOG_FACILITIES,
                facility,
            )
            .and_then(|f| u8::try_from(f).ok())
            .unwrap_or(d.facility),
        format: c
            .choice(
                &raw.format,
                "syslog.format",
                SYSLOG_FORMATS,
                SyslogFormat::from_name,
            )
            .unwrap_or(d.format),
    }
}

/// `unix:/dev/log`, `udp:127.0.0.1:514`, `tcp:[::1]:601`.
fn parse_syslog_addr(text: &str) -> Result<SyslogAddr, String> {
    let usage = "valid forms: \"unix:/dev/log\" (the default), \"udp:IP:PORT\", \"tcp:IP:PORT\"";
    let Some((scheme, rest)) = text.split_once(':') else {
        return Err(format!(
            "{text:?} has no `unix:`, `udp:` or `tcp:` prefix; {usage}"
        ));
    };
    match scheme {
        "unix" => parse_unix_path(rest).map(SyslogAddr::Unix),
        "udp" => parse_inet(rest).map(SyslogAddr::Udp),
        "tcp" => parse_inet(rest).map(SyslogAddr::Tcp),
        other => Err(format!("unknown scheme `{other}:` in {text:?}; {usage}")),
    }
}

/// The table named after a listener's handler, already converted, with its key's span.
pub(super) struct HandlerSettings {
    pub key: Range<usize>,
    pub table: toml::Table,
    /// Where each of the table's keys is written, so a problem with one is shown there.
    pub key_spans: std::collections::BTreeMap<String, Range<usize>>,
}

/// One listener's own keys and its handler (not cross-listener rules). `None` when anything
/// is wrong, after reporting all of it.
pub(super) fn validate_listener(
    raw: &RawListener,
    table: &Range<usize>,
    settings: Option<HandlerSettings>,
    registry: &dyn Catalog,
    c: &mut Check<'_, '_>,
) -> Option<ListenerConfig> {
    let mark = c.diags.mark();
    c.required(&raw.name, "name", table, "\"echo\"");
    c.required(&raw.protocol, "protocol", table, "\"tcp\"");
    c.required(&raw.address, "address", table, "\"127.0.0.1:7007\"");
    c.required(&raw.handler, "handler", table, "\"echo\"");
    let name = raw.name.as_ref().and_then(|n| listener_name(n, c));
    let protocol = c.choice(&raw.protocol, "protocol", PROTOCOLS, Protocol::from_name);
    let address = match (protocol, &raw.address) {
        (Some(protocol), Some(text)) => listen_addr(protocol, text, c),
        _ => None,
    };
    let handlers = ("handler", &registry.names()[..]);
    let known = |n: &str| registry.contains(n).then(|| n.to_string());
    let handler = c.choice(&raw.handler, "handler", handlers, known);
    let workers = c.choice(
        &raw.workers,
        "workers",
        WORKER_MODELS,
        WorkerModel::from_name,
    );
    let max_workers = c.positive(&raw.max_workers, "max_workers", defaults::MAX_WORKERS);
    let event = workers == Some(WorkerModel::Event);
    let max_workers = match (event, &raw.max_workers) {
        (true, None) => defaults::EVENT_MAX_CONNECTIONS,
        _ => max_workers,
    };
    let threads = c.positive(&raw.threads, "threads", defaults::threads());
    if let (true, Some(h), Some(span)) = (event, &handler, &raw.workers) {
        if !registry.has_event(h) {
            let detail = format!(
                "handler `{h}` has no event-loop implementation (it blocks a thread per \
                 request); workers = \"event\" serves the built-ins {}; use workers = \
                 \"threaded\" or \"forked\" for `{h}`",
                registry.event_names().join(", ")
            );
            c.error(&span.span(), "workers", detail);
        }
    }
    let protect = super::protection::validate(raw, protocol, c);
    let tls = super::tls::validate(raw.tls.as_ref(), protocol, c);

    if let (Some(protocol), Some(handler), Some(span)) = (protocol, &handler, &raw.handler) {
        let label = name.clone().unwrap_or_else(|| c.section.to_string());
        let ctx = BuildContext {
            listener: &label,
            protocol,
            settings: settings.as_ref().map(|s| &s.table),
        };
        build_handler(registry, handler, &ctx, settings.as_ref(), &span.span(), c);
    }
    if c.diags.grew_since(mark) {
        return None;
    }
    Some(ListenerConfig {
        name: name?,
        protocol: protocol?,
        address: address?,
        handler: handler?,
        workers: workers.unwrap_or(defaults::WORKERS),
        max_workers,
        threads,
        protect,
        handler_settings: settings.map(|s| s.table),
        tls,
    })
}

/// Run the handler's builder, which checks its own settings, so `check` catches those too.
/// Its complaint goes on the handler's table if there is one, else on the `handler` key.
fn build_handler(
    registry: &dyn Catalog,
    handler: &str,
    ctx: &BuildContext<'_>,
    settings: Option<&HandlerSettings>,
    handler_span: &Range<usize>,
    c: &mut Check<'_, '_>,
) {
    let Err(refused) = registry.check(handler, ctx) else {
        return;
    };
    for problem in refused.problems {
        let at_key = problem
            .key
            .as_ref()
            .and_then(|k| Some((k, settings?.key_spans.get(k)?)));
        match (at_key, settings) {
            (Some((k, span)), _) => c.error(span, &format!("{handler}.{k}"), problem.message),
            (None, Some(s)) => c.error(&s.key, handler, problem.message),
            (None, None) => c.error(handler_span, "handler", problem.message),
        }
    }
}

/// Names are identities across reloads and socket-activation names (LISTEN_FDNAMES, which is
/// colon-separated), so they must be non-empty and free of `:` and control characters.
fn listener_name(name: &Spanned<String>, c: &mut Check<'_, '_>) -> Option<String> {
    let text = name.get_ref();
    let bad = text.trim().is_empty() || text.contains(|ch: char| ch == ':' || ch.is_control());
    if bad {
        let detail = format!(
            "{text:?} is not a usable listener name; use a non-empty name without `:` or \
             control characters, e.g. name = \"echo\""
        );
        c.error(&name.span(), "name", detail);
        return None;
    }
    Some(text.clone())
}

/// The address in the form its protocol needs, reported on the `address` key if it is not.
fn listen_addr(
    protocol: Protocol,
    text: &Spanned<String>,
    c: &mut Check<'_, '_>,
) -> Option<ListenAddr> {
    match parse_listen_addr(protocol, text.get_ref()) {
        Ok(addr) => Some(addr),
        Err(detail) => {
            c.error(&text.span(), "address", detail);
            None
        }
    }
}

/// The address text in the form `protocol` needs, or what is wrong with it.
pub(super) fn parse_listen_addr(protocol: Protocol, text: &str) -> Result<ListenAddr, String> {
    if protocol.is_unix() {
        parse_unix_path(text).map(ListenAddr::Path)
    } else {
        parse_inet(text).map(ListenAddr::Inet)
    }
}
