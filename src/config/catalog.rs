//! What config validation needs to know about handlers, and nothing more: which names exist,
//! which have an event-loop implementation, and whether a name accepts a listener's settings.
//!
//! `config` sits below the handlers, so it never names them; the caller passes a `Catalog`
//! (`handler::Registry` implements it) and validation asks it.

use super::Protocol;

/// What a handler builder is told about the listener it is building for, so it can refuse
/// settings or a protocol it does not support with a message that `check` shows the operator.
#[derive(Debug, Clone, Copy)]
pub struct BuildContext<'a> {
    /// The listener's name.
    pub listener: &'a str,
    /// The listener's protocol.
    pub protocol: Protocol,
    /// The table named after the handler, if the listener has one.
    pub settings: Option<&'a toml::Table>,
}

/// The handler names a config may use, and a check of each one's settings.
pub trait Catalog {
    /// Whether `name` is a known handler.
    fn contains(&self, name: &str) -> bool;

    /// Every known name, for "valid values" in error messages.
    fn names(&self) -> Vec<&str>;

    /// Whether `name` can run with `workers = "event"`.
    fn has_event(&self, name: &str) -> bool;

    /// The names that can run with `workers = "event"`, for error messages.
    fn event_names(&self) -> Vec<&str>;

    /// Check the settings `ctx` gives handler `name`: `Err` says what is wrong and the fix.
    fn check(&self, name: &str, ctx: &BuildContext<'_>) -> Result<(), String>;
}
