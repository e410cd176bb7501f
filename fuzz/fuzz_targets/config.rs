//! Fuzz the config parser and validator: any text must give a `Config` or diagnostics, never
//! a panic, a hang or unbounded memory (toml's default nesting limit stays on). Every
//! diagnostic must point inside the text it came from.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use socketd::config::Config;
use socketd::handler::Registry;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let registry = Registry::with_builtins();
    if let Err(e) = Config::from_str(text, Path::new("fuzz.toml"), &registry) {
        assert!(!e.diagnostics.is_empty(), "an error with no diagnostic");
        for d in &e.diagnostics {
            let shown = d.to_string();
            assert!(
                shown.starts_with("fuzz.toml"),
                "diagnostic without the file: {shown}"
            );
        }
    }
});
