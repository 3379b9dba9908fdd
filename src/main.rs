fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_writer(std::io::stderr)
        .init();
    std::process::exit(holdfast::cli::main());
}

/// `HOLDFAST_LOG` when set; else errors only, and for `holdfast serve` (a service whose log is
/// read by journald) what it starts, retries and refuses too.
fn log_filter() -> tracing_subscriber::EnvFilter {
    if let Ok(f) = tracing_subscriber::EnvFilter::try_from_env("HOLDFAST_LOG") {
        return f;
    }
    let serve = std::env::args().skip(1).any(|a| a == "serve");
    tracing_subscriber::EnvFilter::new(if serve { "holdfast=info" } else { "error" })
}
