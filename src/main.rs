//! The `sallyport` binary: parse the command line and hand over to the library.

#![warn(clippy::unwrap_used)]

fn main() -> std::process::ExitCode {
    sallyport::cli::main()
}
