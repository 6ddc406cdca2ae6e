//! The `wxgate` command: parse the CLI, load the config, start logging and the runtime, run.

#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wxgate::Config;
use wxgate::config::LogFormat;

/// mimalloc: the request path allocates many small, short-lived objects (hyper's header maps, futures,
/// header values), and the session store keeps a million small ones; mimalloc is faster at the first
/// and wastes less on the second than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for a configuration that cannot be used (EX_USAGE in sysexits.h).
const EXIT_CONFIG: u8 = 64;

/// A reverse-proxy authentication sidecar for WeChat.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The configuration file.
    #[arg(
        long,
        short,
        env = "WXGATE_CONFIG",
        default_value = "config.toml",
        global = true
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration and exit: 0 when it is usable, 64 with the reason when not.
    Check,
    /// Ask the running wxgate's admin listener (`server.admin_listen`) whether it is ready: exit 0
    /// when /readyz answers 200, 1 otherwise. For container health checks (no curl needed).
    Healthcheck,
    /// Run the mock WeChat API (for local development, SDK tests and benchmarks; never production).
    MockWechat(wxgate::wechat::mock::CliArgs),
    /// Run the sample backend that echoes what it receives (for the SDK tests, demos and benchmarks).
    SampleBackend(wxgate::sample_backend::CliArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let check = matches!(cli.command, Some(Command::Check));
    let healthcheck = matches!(cli.command, Some(Command::Healthcheck));
    let helper = match cli.command {
        Some(Command::MockWechat(args)) => {
            Some(("mock-wechat", wxgate::wechat::mock::run_cli(args)))
        }
        Some(Command::SampleBackend(args)) => {
            Some(("sample-backend", wxgate::sample_backend::run_cli(args)))
        }
        _ => None,
    };
    if let Some((name, result)) = helper {
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("wxgate {name}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("wxgate: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if check {
        println!("{}: ok", cli.config.display());
        return ExitCode::SUCCESS;
    }
    if healthcheck {
        return match ready(config.server.admin_listen) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("wxgate healthcheck: {e}");
                ExitCode::FAILURE
            }
        };
    }
    // Held to the end: dropping it writes out the lines still waiting.
    let _log_writer = match init_logging(&config.log) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("wxgate: cannot start the logging thread: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match config.server.workers {
        Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    };
    let result = runtime
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(wxgate::server::run(config, shutdown_signal())));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "wxgate stopped");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr as `[log]` says; `RUST_LOG`, when set, overrides `log.level`.
///
/// Lines are written by a thread of their own ([`wxgate::logging::LogSink`]), many to a write: a
/// request never waits on stderr, and none is dropped.
fn init_logging(log: &wxgate::config::LogConfig) -> std::io::Result<wxgate::logging::SinkGuard> {
    use tracing_subscriber::EnvFilter;
    let mut filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::new(directives),
        _ => EnvFilter::new(&log.level),
    };
    if !log.access {
        filter = filter.add_directive(
            "wxgate::access=off"
                .parse()
                .expect("a valid static directive"),
        );
    }
    let (writer, guard) = wxgate::logging::LogSink::start(std::io::stderr(), "wxgate-log")?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_timer(wxgate::logging::UtcMicros)
        .with_writer(writer);
    match log.format {
        // Lines written for a fraction of the default format's cost (with the access log on, a
        // line per request), with control characters escaped. Coloured on a terminal, unless
        // NO_COLOR is set (`tracing-subscriber`'s default); never elsewhere.
        LogFormat::Text => match std::io::stderr().is_terminal() {
            true => builder,
            false => builder.with_ansi(false),
        }
        .fmt_fields(wxgate::logging::PlainFields)
        .event_format(wxgate::logging::TextLine)
        .init(),
        // One JSON object per line: the event's fields at the top level, the request being served
        // (method, request id, path) beside them as its `span`.
        LogFormat::Json => builder
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(wxgate::logging::JsonLine)
            .init(),
    }
    Ok(guard)
}

/// `GET /readyz` on the admin listener (on loopback when it listens on every address).
fn ready(admin: std::net::SocketAddr) -> Result<(), String> {
    use std::io::{Read, Write};
    use std::time::Duration;
    let mut addr = admin;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let timeout = Duration::from_secs(3);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let _ = stream.set_read_timeout(Some(timeout));
    stream
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("cannot ask {addr}: {e}"))?;
    let mut head = [0u8; 12];
    stream
        .read_exact(&mut head)
        .map_err(|e| format!("no answer from {addr}: {e}"))?;
    match &head {
        b"HTTP/1.1 200" => Ok(()),
        other => Err(format!(
            "{addr}/readyz answered {}",
            String::from_utf8_lossy(other)
        )),
    }
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop wxgate with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
