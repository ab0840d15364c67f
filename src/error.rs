//! Input errors: the kind of failure that exits with code 2 and one line naming the file and field.

use std::fmt;

/// A problem with what the user gave us (a config, a weights file, a flag), as opposed
/// to a failure of the machine. `main` maps it to exit code 2.
#[derive(Debug)]
pub struct InputError(pub String);

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InputError {}

/// Builds an `anyhow::Error` marked as bad input.
pub fn bad_input(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(InputError(msg.into()))
}

/// `bail!` for bad input.
#[macro_export]
macro_rules! bail_input {
    ($($arg:tt)*) => { return Err($crate::error::bad_input(format!($($arg)*))) };
}

/// The first line of an error from elsewhere (libtorch appends its C++ backtrace on further lines), for a
/// message that must stay on one line.
pub fn first_line(e: impl fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().trim_end().to_string()
}

/// True when any error in the chain is an `InputError`.
pub fn is_input_error(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<InputError>())
}

/// Writes `line` and a newline to stderr in one `write` call. `eprintln!` with arguments
/// writes piece by piece, and mpirun forwards each piece as it comes, so the lines of
/// two ranks could be cut into each other (seen: "error: error: checkpoint ..."); a
/// line written at once reaches mpirun, and the terminal, whole.
pub fn print_line(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}
