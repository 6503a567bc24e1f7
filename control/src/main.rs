//! `jaunt`: the daemon, the admin CLI and the user client in one binary.

use mimalloc::MiMalloc;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

fn main() -> std::process::ExitCode {
    jaunt_control::cli::main()
}
