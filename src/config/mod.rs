//! Configuration: TOML text -> raw serde structs -> `validate()` -> the `Config` types.
//!
//! Only `types` is seen by the rest of socketd; `parse` holds the raw layer and every check, and
//! reports all problems in a file at once, each with file, line, column, listener and key.

mod parse;
pub mod types;

pub use parse::{ConfigError, Diagnostic};
pub use types::*;

use std::path::Path;

use crate::handler::Registry;

impl Config {
    /// Parse and validate config text; `origin` is used in messages and kept for reloads.
    pub fn from_str(text: &str, origin: &Path, registry: &Registry) -> Result<Config, ConfigError> {
        parse::parse(text, origin, registry)
    }

    /// Read, parse and validate a config file.
    pub fn load(path: &Path, registry: &Registry) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::io(path, e))?;
        Config::from_str(&text, path, registry)
    }
}
