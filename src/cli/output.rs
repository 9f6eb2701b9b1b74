//! Printing shared by several commands: the JSON document, stdout lines and the size formats.

/// Size formats live in one place, the library's progress module.
pub(super) use crate::progress::{human_bytes, short_bytes};

/// Writes one line to stdout. A reader that went away (`cairn list --json | head`) ends what is
/// printed, not the command: its work is done, so the rest is dropped quietly (as ripgrep does)
/// instead of the panic `println!` gives on a broken pipe.
pub(super) fn print_line(line: std::fmt::Arguments) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_fmt(line).and_then(|()| out.write_all(b"\n"));
}

/// `println!` for the CLI: through [`print_line`], so a closed pipe is not a panic.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::output::print_line(format_args!($($arg)*))
    };
}
pub(super) use outln;

/// The `--json` document: the report as it serialises, pretty-printed on stdout.
pub(super) fn print_json<T: serde::Serialize>(v: &T) {
    outln!("{}", serde_json::to_string_pretty(v).expect("serialisable"));
}
