//! PLACEHOLDER parser, being replaced by the full validating parser.
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::types::*;
use crate::handler::Registry;

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
            if let Some(c) = self.column {
                write!(f, ":{c}")?;
            }
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in a config file, reported together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub diagnostics: Vec<Diagnostic>,
}

impl ConfigError {
    pub fn io(path: &Path, e: std::io::Error) -> ConfigError {
        ConfigError {
            diagnostics: vec![Diagnostic {
                file: path.to_path_buf(),
                line: None,
                column: None,
                message: format!("cannot read the config file: {e}"),
            }],
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    listener: Vec<RawListener>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: String,
    protocol: String,
    address: String,
    handler: String,
    workers: Option<String>,
    max_workers: Option<usize>,
}

pub(super) fn parse(text: &str, origin: &Path, _registry: &Registry) -> Result<Config, ConfigError> {
    let err = |m: String| ConfigError {
        diagnostics: vec![Diagnostic { file: origin.to_path_buf(), line: None, column: None, message: m }],
    };
    let raw: RawConfig = toml::from_str(text).map_err(|e| err(e.to_string()))?;
    let mut listeners = Vec::new();
    for l in raw.listener {
        let protocol = Protocol::from_name(&l.protocol).ok_or_else(|| err("protocol".into()))?;
        let address = if protocol.is_unix() {
            ListenAddr::Path(l.address.into())
        } else {
            ListenAddr::Inet(l.address.parse().map_err(|_| err("address".into()))?)
        };
        listeners.push(ListenerConfig {
            name: l.name,
            protocol,
            address,
            handler: l.handler,
            workers: l.workers.as_deref().and_then(WorkerModel::from_name).unwrap_or(WorkerModel::Threaded),
            max_workers: l.max_workers.unwrap_or(defaults::MAX_WORKERS),
            handler_settings: None,
        });
    }
    Ok(Config { origin: origin.to_path_buf(), daemon: DaemonConfig::default(), listeners })
}
