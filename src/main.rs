use std::process::ExitCode;

fn main() -> ExitCode {
    match cairn::cli::main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes, joined.
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("cairn: error: {msg}");
            ExitCode::FAILURE
        }
    }
}
