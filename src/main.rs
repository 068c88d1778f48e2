//! `sluice [--config FILE] [--listen ADDR] [--upstream ADDR] [--admin ADDR|off]`,
//! `sluice check FILE…` and `sluice health`: arguments, config,
//! telemetry, the runtime, [`sluice::serve`], and the exit code.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use sluice::config::{AdminListen, Config, ConfigError, HostPort};

/// Exit code for a configuration that cannot be used (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Exit code when the listener cannot be bound or the runtime not built,
/// and `sluice health`'s answer when sluice is not ready.
const EXIT_START: u8 = 1;
/// The environment variable that sets the admin address when `--admin`
/// is not given (read by the server and by `sluice health` alike, so a
/// healthcheck needs no arguments).
const ADMIN_ENV: &str = "SLUICE_ADMIN";

/// A sidecar L7 proxy for HTTP/2 gRPC traffic.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
struct Cli {
    /// TOML config file; without one sluice runs on its embedded default
    /// (h2c on 0.0.0.0:15051, forwarding to 127.0.0.1:50051).
    #[arg(long, short, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Listen address, overriding `server.listen` (port 0 picks a free port;
    /// the bound address is logged).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Upstream `host:port`, overriding `upstream.address`.
    #[arg(long, value_name = "ADDR")]
    upstream: Option<HostPort>,
    /// Admin server address (`/live`, `/ready`, `/metrics`, `POST /drain`),
    /// or `off`; overrides `admin.listen` (and SLUICE_ADMIN). Port 0 picks
    /// a free port.
    #[arg(long, value_name = "ADDR|off", global = true)]
    admin: Option<AdminListen>,
    /// gRPC xDS bootstrap JSON: routes and endpoints from the control
    /// plane it names; overrides `xds.bootstrap` (and GRPC_XDS_BOOTSTRAP).
    #[arg(long, value_name = "FILE")]
    xds_bootstrap: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate config files and print what each configures, then exit (0
    /// when every file is valid, 64 otherwise).
    Check {
        /// The files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Ask a running sluice's admin server whether it is ready (`GET
    /// /ready`): exit 0 when it answers 200, 1 otherwise. The admin address
    /// is `--admin`, else SLUICE_ADMIN, else the config's (`--config`),
    /// else the default 127.0.0.1:15090. Needs no shell or curl: a
    /// container healthcheck runs `sluice health`.
    Health {
        /// How long to wait for the answer.
        #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    sluice::config::parse_duration(s)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::Check { files }) => return check(files),
        Some(Command::Health { timeout }) => return health(&cli, *timeout),
        None => {}
    }
    let config = match load(&cli) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("sluice: bad config: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let _telemetry = match sluice::telemetry::init(&config.log, &config.trace) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("sluice: bad config: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match sluice::runtime(&config) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sluice: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_START);
        }
    };
    // A reload reads the file again and applies the command line's
    // overrides to it as at start.
    let source = cli.config.clone().map(|path| {
        let (listen, upstream, admin) = (cli.listen, cli.upstream.clone(), config.admin.listen);
        sluice::ConfigSource::file(path, move |c| {
            if let Some(listen) = listen {
                c.server.listen = listen;
            }
            if let Some(upstream) = &upstream {
                c.upstream.address = upstream.clone();
            }
            c.admin.listen = admin;
        })
    });
    match runtime.block_on(sluice::serve(config, source)) {
        Ok(()) => ExitCode::SUCCESS,
        // A certificate, key or CA bundle that cannot be used is a bad
        // config (as `sluice check` says), not a failure to start.
        Err(e @ sluice::RunError::Xds(_)) => {
            eprintln!("sluice: bad config: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e @ sluice::RunError::Tls(_)) => {
            eprintln!("sluice: bad TLS material: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("sluice: {e}");
            ExitCode::from(EXIT_START)
        }
    }
}

/// The admin address from the environment, if set.
fn admin_from_env() -> Result<Option<AdminListen>, ConfigError> {
    match std::env::var(ADMIN_ENV) {
        Ok(v) if !v.trim().is_empty() => {
            v.trim()
                .parse()
                .map(Some)
                .map_err(|message| ConfigError::Environment {
                    variable: ADMIN_ENV,
                    message,
                })
        }
        _ => Ok(None),
    }
}

fn load(cli: &Cli) -> Result<Config, ConfigError> {
    let mut config = match &cli.config {
        Some(path) => Config::from_file(path)?,
        None => Config::embedded(),
    };
    if let Some(listen) = cli.listen {
        config.server.listen = listen;
    }
    if let Some(upstream) = &cli.upstream {
        config.upstream.address = upstream.clone();
    }
    if let Some(bootstrap) = &cli.xds_bootstrap {
        config.xds.bootstrap = Some(bootstrap.clone());
    }
    if let Some(admin) = cli.admin.map_or_else(admin_from_env, |a| Ok(Some(a)))? {
        config.admin.listen = admin;
    }
    Ok(config)
}

fn check(files: &[PathBuf]) -> ExitCode {
    let mut ok = true;
    for file in files {
        let checked = Config::from_file(file).and_then(|config| {
            sluice::config::validate_environment(&config)?;
            Ok(config)
        });
        let config = match checked {
            Ok(config) => config,
            Err(e) => {
                eprintln!("sluice: bad config: {e}");
                ok = false;
                continue;
            }
        };
        if let Err(e) = sluice::tls::check(&config) {
            eprintln!("sluice: bad TLS material: {e}");
            ok = false;
            continue;
        }
        if let Err(e) = sluice::xds::Bootstrap::find(&config.xds) {
            eprintln!("sluice: bad config: {e}");
            ok = false;
            continue;
        }
        println!("{}: ok", file.display());
        for line in sluice::check::report(&config) {
            println!("{line}");
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_CONFIG)
    }
}

fn health(cli: &Cli, timeout: Duration) -> ExitCode {
    let admin = match load(cli) {
        Ok(config) => config.admin.listen,
        Err(e) => {
            eprintln!("sluice: bad config: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let AdminListen::On(addr) = admin else {
        eprintln!("sluice: the admin server is off: nothing to ask");
        return ExitCode::from(EXIT_CONFIG);
    };
    match sluice::admin_ready(addr, timeout) {
        Ok((200, body)) => {
            println!("ready: {}", body.trim());
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            println!("not ready ({status}): {}", body.trim());
            ExitCode::from(EXIT_START)
        }
        Err(e) => {
            println!("not ready: {e}");
            ExitCode::from(EXIT_START)
        }
    }
}
