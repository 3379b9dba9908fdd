fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("HOLDFAST_LOG"))
        .with_writer(std::io::stderr)
        .init();
    std::process::exit(holdfast::cli::main());
}
