//! Printing shared by several commands: the JSON document and the size formats.

/// Size formats live in one place, the library's progress module.
pub(super) use crate::progress::{human_bytes, short_bytes};

/// The `--json` document: the report as it serialises, pretty-printed on stdout.
pub(super) fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serialisable"));
}
