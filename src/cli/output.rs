//! Printing shared by several commands: the JSON document and the size formats.

/// Human sizes ("1.5 GiB (1610612736 bytes)") for summaries, imported here only, so that moving
/// it in the library changes one line of the CLI.
pub(super) use crate::restore::human_bytes;

/// The `--json` document: the report as it serialises, pretty-printed on stdout.
pub(super) fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serialisable"));
}

/// "1.5G"-style sizes for table columns.
pub fn short_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["K", "M", "G", "T", "P"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1}{}", UNITS[u])
}
