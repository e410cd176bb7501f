//! What a bad config file produces: one `Diagnostic` per problem, all of them in a `ConfigError`.
//!
//! The parser never stops at the first problem; it collects diagnostics through `Diagnostics`,
//! which turns the byte ranges TOML gives into the 1-based line and column an editor shows.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The config file, as it was named to socketd.
    pub file: PathBuf,
    /// 1-based; `None` when the file could not be read at all.
    pub line: Option<usize>,
    /// 1-based, in characters; `None` with `line`.
    pub column: Option<usize>,
    /// The section and key, what is wrong, and what would be right.
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
    /// In file order; never empty.
    pub diagnostics: Vec<Diagnostic>,
}

impl ConfigError {
    /// The file could not be read at all, so there is no line to point at.
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

/// Collects diagnostics for one file, placing byte offsets at their line and column.
#[derive(Debug)]
pub(super) struct Diagnostics<'a> {
    text: &'a str,
    file: &'a Path,
    /// Byte offset where each line starts; `line_starts[0] == 0`.
    line_starts: Vec<usize>,
    found: Vec<Diagnostic>,
}

impl<'a> Diagnostics<'a> {
    pub(super) fn new(text: &'a str, file: &'a Path) -> Diagnostics<'a> {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Diagnostics {
            text,
            file,
            line_starts,
            found: Vec::new(),
        }
    }

    /// The 1-based line and column (in characters) of a byte offset.
    pub(super) fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line_index = self.line_starts.partition_point(|&s| s <= offset).max(1) - 1;
        let start = self.line_starts.get(line_index).copied().unwrap_or(0);
        let column = match self.text.get(start..offset) {
            Some(prefix) => prefix.chars().count(),
            None => offset - start,
        };
        (line_index + 1, column + 1)
    }

    /// The file the diagnostics are about.
    pub(super) fn file(&self) -> &'a Path {
        self.file
    }

    /// The 1-based line of a byte offset, for "defined at line N" messages.
    pub(super) fn line_of(&self, span: &Range<usize>) -> usize {
        self.position(span.start).0
    }

    /// Record a problem at the start of `span`.
    pub(super) fn error(&mut self, span: &Range<usize>, message: String) {
        let (line, column) = self.position(span.start);
        self.found.push(Diagnostic {
            file: self.file.to_path_buf(),
            line: Some(line),
            column: Some(column),
            message,
        });
    }

    /// Whether anything was recorded since the value of `mark()` was taken.
    pub(super) fn grew_since(&self, mark: usize) -> bool {
        self.found.len() > mark
    }

    /// A bookmark for `grew_since`.
    pub(super) fn mark(&self) -> usize {
        self.found.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.found.is_empty()
    }

    /// The text a span covers, for messages that quote what was written.
    pub(super) fn text_at(&self, span: &Range<usize>) -> &'a str {
        self.text.get(span.clone()).unwrap_or("")
    }

    /// All diagnostics, in file order.
    pub(super) fn into_error(mut self) -> ConfigError {
        self.found.sort_by_key(|d| (d.line, d.column));
        ConfigError {
            diagnostics: self.found,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_lines_and_character_columns() {
        let text = "a = 1\nbé = 2\n\nc = 3";
        let d = Diagnostics::new(text, Path::new("f.toml"));
        assert_eq!(d.position(0), (1, 1));
        assert_eq!(d.position(4), (1, 5));
        assert_eq!(d.position(6), (2, 1));
        // `é` is two bytes but one column.
        let eq = text.find("= 2").unwrap_or(0);
        assert_eq!(d.position(eq), (2, 4));
        assert_eq!(d.position(text.len()), (4, 6));
        assert_eq!(d.position(text.len() + 10), (4, 6));
    }

    #[test]
    fn display_is_one_diagnostic_per_line() {
        let mut d = Diagnostics::new("x = 1\ny = 2\n", Path::new("s.toml"));
        d.error(&(0..1), "first".into());
        d.error(&(6..7), "second".into());
        let e = d.into_error();
        assert_eq!(e.to_string(), "s.toml:1:1: first\ns.toml:2:1: second");
        let io = ConfigError::io(Path::new("/nope"), std::io::ErrorKind::NotFound.into());
        assert!(io
            .to_string()
            .starts_with("/nope: cannot read the config file"));
    }
}
