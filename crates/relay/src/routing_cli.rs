//! `relay routing ...`: runtime routing changes, straight in the database in `database.url` (the same
//! rows the admin API writes). Every routing replica applies them within `routing.refresh_ms`; deployments
//! and groups are checked against this config, values with the rules `relay check` and the API use.

use relay_routing::overrides::{DeploymentOverride, ModelOverride, OverrideStore, Settings, Target};
use serde_json::{Value, json};

use crate::config::Config;

pub const USAGE: &str = "  \
  routing show                                    the runtime changes in force (JSON)
  routing weight <deployment> <N>                 share of first attempts (1..=1000000)
  routing drain|enable <deployment>               stop / resume sending new requests there
  routing strategy <model> <name>                 weighted, priority, cost, latency, balanced, headroom
  routing hedge <model> <ms>                      hedge after ms without an answer (0 = never)
  routing reset deployment|model <id>             back to the config";

pub fn run(args: &[String], cfg: &Config) -> i32 {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cfg = cfg.clone();
    let result = crate::cli::block_on(async move {
        let db = relay_db::Db::connect(&cfg.database.url).await?;
        let store = OverrideStore::new(db);
        let routing = relay_routing::RoutingService::new(&cfg.routing);
        let deployment = |id: &str| {
            if routing.has_deployment(id) {
                Ok(())
            } else {
                Err(format!("no deployment `{id}` in this config"))
            }
        };
        let model = |m: &str| {
            if routing.has_model(m) { Ok(()) } else { Err(format!("no model group `{m}` in this config")) }
        };
        let outcome: Result<Value, String> = match args.as_slice() {
            ["show"] => return Ok(print(&json!(store.load().await?))),
            ["weight", id, n] => match (deployment(id), n.parse::<u32>()) {
                (Err(e), _) => Err(e),
                (_, Err(_)) => Err(format!("weight must be a whole number, not `{n}`")),
                (Ok(()), Ok(w)) => patch::<DeploymentOverride>(&store, id, json!({"weight": w})).await?,
            },
            [verb @ ("drain" | "enable"), id] => match deployment(id) {
                Err(e) => Err(e),
                Ok(()) => {
                    patch::<DeploymentOverride>(&store, id, json!({"enabled": *verb == "enable"})).await?
                }
            },
            ["strategy", m, s] => match model(m) {
                Err(e) => Err(e),
                Ok(()) => patch::<ModelOverride>(&store, m, json!({"strategy": s})).await?,
            },
            ["hedge", m, ms] => match (model(m), ms.parse::<u32>()) {
                (Err(e), _) => Err(e),
                (_, Err(_)) => Err(format!("hedge takes milliseconds, not `{ms}`")),
                (Ok(()), Ok(v)) => patch::<ModelOverride>(&store, m, json!({"hedge_after_ms": v})).await?,
            },
            ["reset", kind @ ("deployment" | "model"), id] => {
                let t = if *kind == "deployment" { Target::Deployment } else { Target::Model };
                Ok(json!({"reset": store.reset(t, id).await?}))
            }
            _ => Err(format!("unknown routing command\n{USAGE}")),
        };
        Ok(match outcome {
            Ok(v) => print(&v),
            Err(e) => {
                eprintln!("relay: {e}");
                crate::cli::EXIT_CONFIG
            }
        })
    });
    result.unwrap_or_else(|e: anyhow::Error| {
        eprintln!("relay: {e:#}");
        1
    })
}

fn print(v: &Value) -> i32 {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    0
}

/// Applies one change; `Ok(Err(msg))` = the change is invalid, `Err` = the database failed.
async fn patch<S: Settings>(
    s: &OverrideStore,
    target: &str,
    patch: Value,
) -> anyhow::Result<Result<Value, String>> {
    let label = match S::KIND {
        Target::Deployment => "deployment",
        Target::Model => "model",
    };
    match s.patch::<S>(target, &patch).await {
        Ok(o) => Ok(Ok(json!({label: target, "override": o}))),
        Err(Ok(msg)) => Ok(Err(msg)),
        Err(Err(e)) => Err(e),
    }
}
