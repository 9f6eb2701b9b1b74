use std::process::ExitCode;

fn main() -> ExitCode {
    match cairn::cli::main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<cairn::cli::PartialImage>().is_some() => {
            eprintln!("cairn: warning: {e}");
            ExitCode::from(3)
        }
        Err(e) => {
            // One line: the error and its causes, joined.
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("cairn: error: {msg}");
            ExitCode::FAILURE
        }
    }
}
