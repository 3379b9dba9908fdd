use clap::Parser;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("HOLDFAST_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = holdfast::cli::Cli::parse();
    let code = match holdfast::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("holdfast: error: {e}");
            e.exit_code()
        }
    };
    std::process::exit(code);
}
