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
    fn check(&self, name: &str, ctx: &BuildContext<'_>) -> Result<(), SettingsError>;
}

/// One thing wrong with a handler's settings: on `key` of its table when it names one (shown
/// at that key's line and column), else on the table as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The key of the handler's table the problem is about, if it is about one.
    pub key: Option<String>,
    /// What is wrong and what would be right.
    pub message: String,
}

/// Why a handler refused its settings: every problem found, not just the first, so `check`
/// can show each at its own place.
#[derive(Debug, Clone, PartialEq, Eq, Default, thiserror::Error)]
#[error("{}", self.problems.iter().map(|p| p.message.as_str()).collect::<Vec<_>>().join("; "))]
pub struct SettingsError {
    /// At least one problem.
    pub problems: Vec<Problem>,
}

impl SettingsError {
    /// One problem with `key`.
    pub fn at(key: &str, message: impl Into<String>) -> SettingsError {
        SettingsError {
            problems: vec![Problem {
                key: Some(key.to_string()),
                message: message.into(),
            }],
        }
    }

    /// Problems written the built-ins' way, each naming its key first in backticks
    /// (`` `argv` is required ``, `` unknown key `exec.bogus` ``): the key is taken from there
    /// when `table` has it, so the message is shown at that key.
    pub fn from_messages(
        handler: &str,
        table: Option<&toml::Table>,
        messages: Vec<String>,
    ) -> Self {
        let key_of = |m: &str| {
            let named = m.split('`').nth(1)?;
            let named = named.strip_prefix(&format!("{handler}.")).unwrap_or(named);
            let key = named.split(['.', '[', ' ']).next()?;
            table
                .filter(|t| t.contains_key(key))
                .map(|_| key.to_string())
        };
        SettingsError {
            problems: messages
                .into_iter()
                .map(|message| Problem {
                    key: key_of(&message),
                    message,
                })
                .collect(),
        }
    }
}

impl From<String> for SettingsError {
    /// One problem about the table as a whole.
    fn from(message: String) -> SettingsError {
        SettingsError {
            problems: vec![Problem { key: None, message }],
        }
    }
}

impl From<&str> for SettingsError {
    fn from(message: &str) -> SettingsError {
        SettingsError::from(message.to_string())
    }
}
