//! The raw layer: serde structs that mirror the file, one per table, each with
//! `deny_unknown_fields`, and `read_table`, which fills one from a TOML table while collecting
//! every unknown key and wrong type instead of stopping at serde's first error.
//!
//! To add a key: add one `Option<Spanned<T>>` field to the right struct (the field list in
//! "valid keys" messages comes from the struct itself), then one check in `validate`. Every field
//! is optional here; `validate` says which are required, so all missing keys are reported.

use std::ops::Range;

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde::Deserialize;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::error::Diagnostics;
use super::validate::Section;
use super::values::suggest;

/// The whole file. Its fields are read one table at a time (see `parse`), but the struct is
/// still the one place that lists the top-level keys.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // only its field list is used; the tables are read one by one
pub(super) struct RawConfig {
    daemon: Option<RawDaemon>,
    listener: Option<Vec<RawListener>>,
}

/// `[daemon]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDaemon {
    pub shutdown_timeout: Option<Spanned<String>>,
    pub pidfile: Option<Spanned<String>>,
    pub user: Option<Spanned<String>>,
    pub group: Option<Spanned<String>>,
    pub log: Option<Spanned<String>>,
    pub log_level: Option<Spanned<String>>,
    pub upgrade_timeout: Option<Spanned<String>>,
    pub fd_store: Option<Spanned<bool>>,
    pub syslog: Option<RawSyslog>,
    // Operating the running daemon (issue 10), validated in `ops`.
    pub control: Option<Spanned<String>>,
    pub control_mode: Option<Spanned<String>>,
    pub control_group: Option<Spanned<String>>,
    pub access_log: Option<Spanned<String>>,
    pub metrics: Option<RawMetrics>,
}

/// `[daemon.metrics]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub address: Option<Spanned<String>>,
}

/// `[daemon.syslog]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSyslog {
    pub address: Option<Spanned<String>>,
    pub facility: Option<Spanned<String>>,
    pub format: Option<Spanned<String>>,
}

/// One `[[listener]]`, without the table named after its handler (taken out before reading).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub name: Option<Spanned<String>>,
    pub protocol: Option<Spanned<String>>,
    pub address: Option<Spanned<String>>,
    pub handler: Option<Spanned<String>>,
    pub workers: Option<Spanned<String>>,
    pub max_workers: Option<Spanned<i64>>,
    pub threads: Option<Spanned<i64>>,
    // Protection keys (issue 5), validated in `protection`.
    pub allow: Option<Spanned<Vec<Spanned<String>>>>,
    pub deny: Option<Spanned<Vec<Spanned<String>>>>,
    pub max_connections: Option<Spanned<i64>>,
    pub max_per_source: Option<Spanned<i64>>,
    pub rate: Option<Spanned<String>>,
    pub idle_timeout: Option<Spanned<String>>,
    pub max_duration: Option<Spanned<String>>,
    pub min_source_port: Option<Spanned<i64>>,
    pub mode: Option<Spanned<String>>,
    pub owner: Option<Spanned<String>>,
    pub group: Option<Spanned<String>>,
    /// `tls = { cert, key, ... }` (issue 11), validated in `config::tls`.
    pub tls: Option<Spanned<super::tls::RawTls>>,
}

/// The keys a raw struct accepts, read from its `Deserialize` impl so they are never listed by
/// hand. Works for plain derived structs (not `flatten`, which serde reads as a map).
pub(super) fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(FieldProbe(&mut fields));
    fields
}

/// A deserializer that only records the field list serde hands to `deserialize_struct`.
struct FieldProbe<'a>(&'a mut &'static [&'static str]);

impl<'de> Deserializer<'de> for FieldProbe<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("field probe: not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("field probe: fields recorded"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// Fill `T` from `table`, reporting every key `T` does not have and every value of the wrong
/// type (at any depth), each at its own line. Returns `T` built from the keys that were fine.
///
/// serde stops at the first error, so this removes the entry an error points at and tries
/// again; each round removes one entry, so it ends. `hint` adds a section-specific note to the
/// "unknown key" message of the key it is given.
pub(super) fn read_table<T: DeserializeOwned + Default>(
    table: &Spanned<DeTable<'_>>,
    section: &Section,
    hint: &dyn Fn(&str) -> String,
    diags: &mut Diagnostics<'_>,
) -> T {
    let fields = field_names::<T>();
    let mut table = table.clone();
    let unknown: Vec<(String, Range<usize>)> = table
        .get_ref()
        .keys()
        .filter(|k| !fields.contains(&k.get_ref().as_ref()))
        .map(|k| (k.get_ref().to_string(), k.span()))
        .collect();
    for (key, span) in unknown {
        let typo = match suggest(&key, fields) {
            Some(near) => format!("did you mean `{near}`? "),
            None => String::new(),
        };
        diags.error(
            &span,
            format!(
                "{section}: unknown key `{key}`; {typo}valid keys: {}{}",
                fields.join(", "),
                hint(&key)
            ),
        );
        table.get_mut().remove(key.as_str());
    }
    loop {
        let error = match T::deserialize(toml::de::Deserializer::from(table.clone())) {
            Ok(value) => return value,
            Err(e) => e,
        };
        let span = error.span().unwrap_or_else(|| table.span());
        let path = locate(table.get_ref(), &span);
        let key = if path.is_empty() {
            String::new()
        } else {
            format!(" key `{}`:", path.join("."))
        };
        diags.error(
            &span,
            format!("{section}:{key} {}", friendly(error.message())),
        );
        if path.is_empty() || !remove(table.get_mut(), &path) {
            return T::default();
        }
    }
}

/// The key path of the innermost table entry whose key or value covers `span`. Tables inside
/// arrays are searched too, but the path stops at the array (its elements cannot be removed).
fn locate(table: &DeTable<'_>, span: &Range<usize>) -> Vec<String> {
    let covers = |outer: Range<usize>| outer.start <= span.start && span.end <= outer.end;
    for (key, value) in table.iter() {
        let name = key.get_ref().to_string();
        match value.get_ref() {
            DeValue::Table(inner) => {
                let mut path = locate(inner, span);
                if !path.is_empty() {
                    path.insert(0, name);
                    return path;
                }
            }
            DeValue::Array(items) => {
                let inside = items.iter().any(|item| match item.get_ref() {
                    DeValue::Table(inner) => !locate(inner, span).is_empty(),
                    _ => false,
                });
                if inside {
                    return vec![name];
                }
            }
            _ => {}
        }
        if covers(key.span()) || covers(value.span()) {
            return vec![name];
        }
    }
    Vec::new()
}

/// Remove the entry at `path`; false if it was not there.
fn remove(table: &mut DeTable<'_>, path: &[String]) -> bool {
    match path {
        [] => false,
        [last] => table.remove(last.as_str()).is_some(),
        [first, rest @ ..] => match table.get_mut(first.as_str()).map(|v| v.get_mut()) {
            Some(DeValue::Table(inner)) => remove(inner, rest),
            _ => false,
        },
    }
}

/// serde's wording with Rust type names replaced by what an operator writes.
fn friendly(message: &str) -> String {
    let mut text = message.trim().to_string();
    for rust in [
        "i8", "i16", "i32", "i64", "u8", "u16", "u32", "u64", "usize", "isize",
    ] {
        text = text.replace(&format!("expected {rust}"), "expected an integer");
    }
    text = text.replace("` as i128, expected", "`, expected");
    text = text.replace("unknown field", "unknown key");
    text.replace("expected a string", "expected a string in quotes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        a: Option<Spanned<String>>,
        n: Option<Spanned<i64>>,
        inner: Option<Inner>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        x: Option<String>,
        y: Option<i64>,
    }

    fn read(text: &str) -> (Outer, Vec<String>) {
        let table = DeTable::parse(text).expect("test input is valid TOML");
        let mut diags = Diagnostics::new(text, Path::new("t.toml"));
        let outer = read_table::<Outer>(&table, &Section::Daemon, &|_| String::new(), &mut diags);
        let lines = diags.into_error().diagnostics;
        (outer, lines.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn field_names_come_from_the_struct() {
        assert_eq!(field_names::<Outer>(), &["a", "n", "inner"]);
        assert_eq!(field_names::<RawConfig>(), &["daemon", "listener"]);
    }

    #[test]
    fn every_unknown_key_and_wrong_type_is_reported_and_the_rest_is_kept() {
        let text = "a = 5\nn = 'x'\nbogus = 1\n[inner]\nx = 1\ny = 'no'\nz = 2\n";
        let (outer, errors) = read(text);
        assert_eq!(errors.len(), 6, "{errors:#?}");
        let all = errors.join("\n");
        assert!(all.contains("t.toml:3:1: [daemon]: unknown key `bogus`; valid keys: a, n, inner"));
        assert!(all.contains("t.toml:1:5: [daemon]: key `a`: invalid type: integer `5`"));
        assert!(all.contains(
            "t.toml:2:5: [daemon]: key `n`: invalid type: string \"x\", expected an integer"
        ));
        assert!(all.contains("t.toml:5:5: [daemon]: key `inner.x`: invalid type"));
        assert!(all.contains("t.toml:6:5: [daemon]: key `inner.y`:"));
        assert!(all
            .contains("t.toml:7:1: [daemon]: key `inner.z`: unknown key `z`, expected `x` or `y`"));
        assert!(outer.a.is_none() && outer.n.is_none());
    }

    #[test]
    fn good_tables_read_with_spans() {
        let (outer, errors) = read("a = 'hi'\nn = 3\ninner = { y = 2 }\n");
        assert!(errors.is_empty(), "{errors:?}");
        let a = outer.a.expect("a was given");
        assert_eq!((a.get_ref().as_str(), a.span()), ("hi", 4..8));
        assert_eq!(outer.inner.map(|i| (i.x, i.y)), Some((None, Some(2))));
    }
}
