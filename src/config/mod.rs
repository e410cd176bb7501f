//! Configuration: TOML text -> raw serde structs -> `validate()` -> the `Config` types.
//!
//! Only `types` is seen by the rest of socketd. `parse` drives the reading, `raw` holds the serde
//! structs (the list of keys), `validate` every rule (`across` those
//! between listeners), `values` the value formats and `error` the
//! diagnostics; all problems in a file are reported at once, each with file, line, column,
//! listener and key.

mod across;
mod catalog;
mod error;
mod ops;
mod parse;
mod protection;
mod raw;
#[cfg(test)]
mod tests;
pub mod tls;
pub mod types;
mod validate;
mod values;

pub use catalog::{BuildContext, Catalog, Problem, SettingsError};
pub use error::{ConfigError, Diagnostic};
pub use ops::{AccessLogTarget, ControlConfig};
#[cfg(test)]
pub(crate) use protection::parse_network;
pub use protection::{protection_defaults, Rate, SocketFile};
pub(crate) use protection::{resolve_group, resolve_user};
pub use types::*;
/// The one duration format (`"500ms"`, `"10s"`), for handler tables that take durations.
pub(crate) use values::parse_duration;

use std::path::Path;

impl Config {
    /// Parse and validate config text; `origin` is used in messages and kept for reloads.
    pub fn from_str(
        text: &str,
        origin: &Path,
        catalog: &dyn Catalog,
    ) -> Result<Config, ConfigError> {
        parse::parse(text, origin, catalog)
    }

    /// Read, parse and validate a config file.
    pub fn load(path: &Path, catalog: &dyn Catalog) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::io(path, e))?;
        Config::from_str(&text, path, catalog)
    }
}
