//! The parser's driver: TOML text -> spanned document -> each table read into its raw struct
//! (`raw`) -> `validate` -> `Config`, collecting every problem in the file before failing.
//!
//! This file knows the file's shape (a `[daemon]` table, a `[[listener]]` array, each listener's
//! optional table named after its handler); the raw structs know the keys and `validate` knows
//! the rules.

use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use super::across::{check_across, Placed};
use super::error::{ConfigError, Diagnostics};
use super::raw::{field_names, read_table, RawConfig, RawDaemon, RawListener};
use super::types::*;
use super::validate::{validate_daemon, validate_listener, Check, HandlerSettings, Section};
use super::Catalog;

/// Parse and validate `text`; `origin` names the file in every diagnostic.
pub(super) fn parse(
    text: &str,
    origin: &Path,
    registry: &dyn Catalog,
) -> Result<Config, ConfigError> {
    let mut diags = Diagnostics::new(text, origin);
    let (doc, syntax_errors) = DeTable::parse_recoverable(text);
    if !syntax_errors.is_empty() {
        report_syntax(&syntax_errors, &mut diags);
        return Err(diags.into_error());
    }
    let doc = doc.get_ref();

    let top_keys = field_names::<RawConfig>();
    for key in doc
        .keys()
        .filter(|k| !top_keys.contains(&k.get_ref().as_ref()))
    {
        let message = format!(
            "{}: unknown key `{}`; valid keys: {} (a [daemon] table and [[listener]] entries)",
            Section::Top,
            key.get_ref(),
            top_keys.join(", ")
        );
        diags.error(&key.span(), message);
    }

    let daemon = match doc.get("daemon") {
        None => DaemonConfig::default(),
        Some(value) => match table_of(value) {
            Some(table) => {
                let no_hint = |_: &str| String::new();
                let raw: RawDaemon = read_table(&table, &Section::Daemon, &no_hint, &mut diags);
                let mut check = Check {
                    diags: &mut diags,
                    section: Section::Daemon,
                    present: keys_of(&table),
                };
                validate_daemon(&raw, &mut check)
            }
            None => {
                let message = format!(
                    "{}: key `daemon`: must be a table, written as a [daemon] section",
                    Section::Top
                );
                diags.error(&value.span(), message);
                DaemonConfig::default()
            }
        },
    };

    let listeners = match doc.get("listener") {
        None => Vec::new(),
        Some(value) => read_listeners(value, registry, &mut diags),
    };

    if !diags.is_empty() {
        return Err(diags.into_error());
    }
    Ok(Config {
        origin: origin.to_path_buf(),
        daemon,
        listeners,
    })
}

/// TOML syntax errors, one per line: after the first error on a line the parser's recovery
/// tends to report echoes of it.
fn report_syntax(errors: &[toml::de::Error], diags: &mut Diagnostics<'_>) {
    let mut last_line = None;
    for error in errors {
        let span = error.span().unwrap_or(0..0);
        let line = diags.line_of(&span);
        if last_line == Some(line) {
            continue;
        }
        last_line = Some(line);
        let mut message = format!("TOML syntax error: {}", error.message().trim());
        if message.ends_with("duplicate key") {
            let key = diags.text_at(&span);
            message.push_str(&format!(" `{key}`; a key may appear only once in a table"));
        }
        diags.error(&span, message);
    }
}

/// The `listener` value: an array of tables (`[[listener]]` or `listener = [{...}]`).
fn read_listeners(
    value: &Spanned<DeValue<'_>>,
    registry: &dyn Catalog,
    diags: &mut Diagnostics<'_>,
) -> Vec<ListenerConfig> {
    let Some(items) = value.get_ref().as_array() else {
        let message = format!(
            "{}: key `listener`: must be an array of tables; write each listener as a \
             [[listener]] section (two brackets)",
            Section::Top
        );
        diags.error(&value.span(), message);
        return Vec::new();
    };
    let mut raws = Vec::new();
    let mut configs = Vec::new();
    let mut names_seen = Vec::new();
    for (index, item) in items.iter().enumerate() {
        let number = index + 1;
        let Some(table) = table_of(item) else {
            let message = format!(
                "listener #{number}: must be a table of keys (name, protocol, address, handler, …)"
            );
            diags.error(&item.span(), message);
            continue;
        };
        let (section, raw, config) = read_listener(number, table, &mut names_seen, registry, diags);
        raws.push((section, raw));
        configs.extend(config);
    }

    let placed: Vec<Placed<'_>> = raws
        .iter()
        .map(|(s, raw)| Placed::of(s.clone(), raw))
        .collect();
    check_across(&placed, diags);
    configs
}

/// One listener table: take out the table named after its handler, read the rest, validate.
/// `names_seen` collects names so far, so a duplicate is called by its number.
fn read_listener(
    number: usize,
    mut table: Spanned<DeTable<'_>>,
    names_seen: &mut Vec<String>,
    registry: &dyn Catalog,
    diags: &mut Diagnostics<'_>,
) -> (Section, RawListener, Option<ListenerConfig>) {
    let string = |key: &str| {
        let value = table.get_ref().get(key)?;
        value.get_ref().as_str().map(str::to_string)
    };
    // A listener is called by its name in messages, unless an earlier one has the same name.
    let name = string("name").filter(|n| !n.trim().is_empty());
    let name = name.filter(|n| {
        let first = !names_seen.contains(n);
        names_seen.push(n.clone());
        first
    });
    let handler = string("handler");
    let section = Section::Listener { number, name };

    let own_keys = field_names::<RawListener>();
    let settings_entry = match &handler {
        Some(h) if !own_keys.contains(&h.as_str()) => table.get_mut().remove_entry(h.as_str()),
        _ => None,
    };
    let settings =
        settings_entry.and_then(|(key, value)| handler_settings(key, value, &section, diags));

    let hint = |key: &str| match &handler {
        _ if registry.contains(key) => {
            format!(" (a `{key}` table is read only by a listener with handler = \"{key}\")")
        }
        Some(h) if registry.contains(h) => {
            format!(", or a `{h}` table with settings for handler `{h}`")
        }
        _ => ", or a table named after the handler, with its settings".to_string(),
    };
    let raw: RawListener = read_table(&table, &section, &hint, diags);
    let mut check = Check {
        diags,
        section: section.clone(),
        present: keys_of(&table),
    };
    let config = validate_listener(&raw, &table.span(), settings, registry, &mut check);
    (section, raw, config)
}

/// The handler's own table, converted to a plain `toml::Table` for the handler's builder.
fn handler_settings(
    key: Spanned<std::borrow::Cow<'_, str>>,
    value: Spanned<DeValue<'_>>,
    section: &Section,
    diags: &mut Diagnostics<'_>,
) -> Option<HandlerSettings> {
    let name = key.get_ref().to_string();
    if !value.get_ref().is_table() {
        let message = format!(
            "{section}: key `{name}`: the settings for handler `{name}` must be a table, e.g. \
             {name} = {{ ... }} or a [listener.{name}] section; found a {}",
            value.get_ref().type_str()
        );
        diags.error(&value.span(), message);
        return None;
    }
    let span = value.span();
    let key_spans = match value.get_ref() {
        DeValue::Table(t) => t
            .iter()
            .map(|(k, _)| (k.get_ref().to_string(), k.span()))
            .collect(),
        _ => Default::default(),
    };
    match toml::Table::deserialize(ValueDeserializer::from(value)) {
        Ok(table) => Some(HandlerSettings {
            key: key.span(),
            table,
            key_spans,
        }),
        Err(e) => {
            let at: Range<usize> = e.span().unwrap_or(span);
            diags.error(&at, format!("{section}: key `{name}`: {}", e.message()));
            None
        }
    }
}

/// The keys written in a table.
fn keys_of(table: &Spanned<DeTable<'_>>) -> Vec<String> {
    table
        .get_ref()
        .keys()
        .map(|k| k.get_ref().to_string())
        .collect()
}

/// A table value with its span, or `None` if the value is not a table.
fn table_of<'i>(value: &Spanned<DeValue<'i>>) -> Option<Spanned<DeTable<'i>>> {
    match value.get_ref() {
        DeValue::Table(t) => Some(Spanned::new(value.span(), t.clone())),
        _ => None,
    }
}
