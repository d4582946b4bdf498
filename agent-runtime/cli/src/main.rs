//! `agentbus`: the operator's command line. See `agentbus --help`.

use clap::Parser as _;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = agentbus_cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // No colour codes in logs piped to a file or another program.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AGENTBUS_LOG").unwrap_or_else(
                |_| // async-nats and the bus log their own copies of connection errors
                // that this binary reports in one line.
                tracing_subscriber::EnvFilter::new("warn,async_nats=off,tenant_bus=error"),
            ),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agentbus: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(agentbus_cli::run(cli)) {
        eprintln!("agentbus: {e}");
        std::process::exit(e.code);
    }
}
