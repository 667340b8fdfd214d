//! Command line: thin and linear. Parse arguments, load config (exit 64 on any error, all listed),
//! start telemetry, run, flush telemetry.

use std::collections::HashMap;
use std::io::Read as _;
use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

use crate::config::Config;

pub const EXIT_CONFIG: i32 = 64;

const USAGE: &str = "\
usage: relay <command> [options]

commands:
  serve      run services (all five in one process unless --services says otherwise)
  orgs, teams, keys   manage virtual keys through the admin API (see below)
  billing    reconcile the ledger, list or replay dead-lettered usage events (see below)
  routing    change weights, strategies, hedging, drain deployments at runtime (see below)
  migrate    apply database migrations and exit
  hash-key   read an API key on stdin, print its hash for [[auth.keys]] (uses auth.pepper)
  check      validate the config and exit

options:
  --config <file>        TOML config (default: $RELAY_CONFIG, else built-in defaults)
  --services <a,b,...>   services to run: edge, auth, routing, adapter, billing

Any setting can be overridden as RELAY__<SECTION>__<KEY>, e.g. RELAY__SERVER__HTTP_LISTEN=0.0.0.0:8080.

admin commands:
";

struct Args {
    command: String,
    config: Option<PathBuf>,
    services: Option<Vec<String>>,
    admin_url: Option<String>,
    /// Everything else, for the admin commands.
    rest: Vec<String>,
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut it = args.iter();
    let command = it.next().cloned().ok_or("missing command")?;
    let (mut config, mut services, mut admin_url, mut rest) = (None, None, None, Vec::new());
    let admin = matches!(command.as_str(), "orgs" | "teams" | "keys" | "billing" | "routing");
    while let Some(a) = it.next() {
        match a.as_str() {
            "--config" => config = Some(PathBuf::from(it.next().ok_or("--config needs a file")?)),
            "--admin-url" if admin => admin_url = Some(it.next().ok_or("--admin-url needs a URL")?.clone()),
            "--services" => {
                let v = it.next().ok_or("--services needs a list")?;
                services =
                    Some(v.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect());
            }
            other if admin => rest.push(other.to_owned()),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(Args { command, config, services, admin_url, rest })
}

/// Runs the CLI and returns the process exit code.
pub fn main_with(args: Vec<String>, env: HashMap<String, String>) -> i32 {
    if args.is_empty() || matches!(args[0].as_str(), "help" | "--help" | "-h") {
        println!(
            "{USAGE}{}\n{}\n{}",
            crate::admin_cli::USAGE,
            crate::billing_cli::USAGE,
            crate::routing_cli::USAGE
        );
        return 0;
    }
    // Help never needs a config (nor a pepper): `relay keys create --help` works on a fresh machine.
    if args.iter().skip(1).any(|a| a == "--help" || a == "-h") {
        match args[0].as_str() {
            "orgs" | "teams" | "keys" => println!("usage:\n{}", crate::admin_cli::USAGE),
            "billing" => println!("usage:\n{}", crate::billing_cli::USAGE),
            "routing" => println!("usage:\n{}", crate::routing_cli::USAGE),
            _ => println!("{USAGE}"),
        }
        return 0;
    }
    let args = match parse_args(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("relay: {e}\n\n{USAGE}{}", crate::admin_cli::USAGE);
            return EXIT_CONFIG;
        }
    };
    let file = args.config.clone().or_else(|| env.get("RELAY_CONFIG").map(PathBuf::from));
    let mut env = env;
    if let Some(services) = &args.services {
        // `--services` wins over file and environment, and goes through the same validation.
        env.insert("RELAY__SERVER__SERVICES".into(), format!("{services:?}"));
    }
    // Commands that only read the database or call the admin API do not need serving settings.
    let load =
        if matches!(args.command.as_str(), "migrate" | "billing" | "routing" | "orgs" | "teams" | "keys") {
            Config::load_for_database
        } else {
            Config::load
        };
    let cfg = match load(file.as_deref(), &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("relay: {e}");
            return EXIT_CONFIG;
        }
    };
    match args.command.as_str() {
        kind @ ("orgs" | "teams" | "keys") => {
            crate::admin_cli::run(kind, &args.rest, &cfg, &env, args.admin_url)
        }
        "billing" => crate::billing_cli::run(&args.rest, &cfg),
        "routing" => crate::routing_cli::run(&args.rest, &cfg),
        "check" => {
            println!("config ok: services {}", cfg.server.services.join(","));
            0
        }
        "hash-key" => {
            let mut key = String::new();
            if std::io::stdin().read_to_string(&mut key).is_err() || key.trim().is_empty() {
                eprintln!("relay: pass the key on stdin");
                return EXIT_CONFIG;
            }
            println!("{}", relay_auth::hash_key(&cfg.auth.pepper, key.trim()));
            0
        }
        "migrate" => runtime_main(|| async move {
            let db = relay_db::Db::connect(&cfg.database.url).await?;
            db.migrate().await?;
            eprintln!("relay: migrations applied ({})", db.backend());
            Ok(())
        }),
        "serve" => runtime_main(|| serve(cfg)),
        other => {
            eprintln!("relay: unknown command `{other}`\n\n{USAGE}{}", crate::admin_cli::USAGE);
            EXIT_CONFIG
        }
    }
}

/// Runs a future to completion on a fresh runtime (CLI commands that are not `serve`).
pub fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(f)
}

fn runtime_main<F, Fut>(f: F) -> i32
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("relay: cannot start the runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(f()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("relay: {e:#}");
            1
        }
    }
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    let name = if cfg.server.services.len() == crate::config::ALL_SERVICES.len() {
        "relay".to_owned()
    } else {
        format!("relay-{}", cfg.server.services.join("+"))
    };
    let telemetry = relay_telemetry::init(&cfg.telemetry, &name)?;
    // Install the metrics recorder before anything records.
    let _ = relay_telemetry::prometheus();
    let shutdown = CancellationToken::new();
    let signals = relay_runtime::shutdown::cancel_on_signal(shutdown.clone());
    let result = crate::app::run(cfg, shutdown, |bound| {
        // One machine-readable line on stdout, for scripts and tests that start relay on port 0.
        println!("{}", serde_json::json!({ "relay_listening": bound }));
    })
    .await;
    signals.abort();
    // Flushing blocks on the exporter, which needs this runtime: do it off the async threads.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &str) -> i32 {
        main_with(args.split_whitespace().map(str::to_owned).collect(), HashMap::new())
    }

    #[test]
    fn help_needs_no_config_and_unknown_options_are_refused() {
        assert_eq!(run("keys create --help"), 0, "no pepper configured, still helps");
        assert_eq!(run("routing -h"), 0);
        assert_eq!(run("serve --help"), 0);
        assert_eq!(run("serve --bogus"), EXIT_CONFIG);
        assert_eq!(run("keys create --team t --bogus 1"), EXIT_CONFIG, "refused before any call");
    }
}
