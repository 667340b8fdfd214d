//! `relay billing ...`: the books, straight from the database in `database.url` (run it where billing
//! runs, or against a replica). `reconcile` proves the invariants and compares a provider's usage CSV;
//! `dlq list` shows events billing could not store; `dlq replay` records them again (after a fix).

use prost::Message as _;
use relay_core::pb::events::v1::UsageEvent;
use relay_events::{Handled, UsageHandler as _};

use crate::config::Config;

pub const USAGE: &str = "  \
  billing reconcile [--provider-csv FILE]   check the ledger (exit 1 if the books do not reconcile)
  billing export --from YYYY-MM-DD [--to YYYY-MM-DD] [--focus]   usage and spend as CSV (FOCUS columns)
  billing prices                            every price version billing knows (catalog + admin API)
  billing price-add --model M --input N --output N [--provider P] [--cached-input N] [--cache-write N]
                    [--reasoning N] [--per-request N] [--currency USD] [--valid-from-ms MS] [--source TEXT]
                                            add a price version (micro-units per million tokens);
                                            running billing services use it within 30 s
  billing topup|credit --scope key:ID|team:ID|org:ID --amount-micros N [--memo TEXT]
                                            money received / given for a prepaid scope (ledger entries)
  billing balance --scope key:ID|team:ID|org:ID   prepaid, spent and left
  billing dlq list | replay                 dead-lettered usage events: show, or record them again";

pub fn run(args: &[String], cfg: &Config) -> i32 {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cfg = cfg.clone();
    let result = crate::cli::block_on(async move {
        let db = relay_db::Db::connect(&cfg.database.url).await?;
        let store = relay_billing::UsageStore::new(db.clone());
        match args.as_slice() {
            ["reconcile", rest @ ..] => reconcile(&db, rest).await,
            ["export", rest @ ..] => {
                let (from, to, focus) = export_args(rest)?;
                print!("{}", relay_billing::reports::export_csv(&db, from, to, focus).await?);
                Ok(0)
            }
            ["prices"] => {
                let billing = relay_billing::BillingService::new(store.clone(), cfg.billing.clone()).await?;
                println!(
                    "id,provider,model,currency,input,output,cached_input,cache_write,reasoning,per_request,valid_from_ms,valid_to_ms,source"
                );
                for p in billing.store().load_prices().await? {
                    println!(
                        "{},{},{},{},{},{},{},{},{},{},{},{},\"{}\"",
                        p.id,
                        p.provider,
                        p.model,
                        p.currency,
                        p.input,
                        p.output,
                        p.cached_input,
                        p.cache_write,
                        p.reasoning,
                        p.per_request,
                        p.valid_from_ms,
                        p.valid_to_ms,
                        p.source.replace('"', "'")
                    );
                }
                Ok(0)
            }
            ["price-add", rest @ ..] => {
                let row = price_args(rest)?
                    .into_row("USD", "relay billing price-add")
                    .map_err(|e| anyhow::anyhow!(e))?;
                if store.load_prices().await?.iter().any(|r| r.id == row.id) {
                    anyhow::bail!("price version `{}` exists; add one with a later --valid-from-ms", row.id);
                }
                store.save_prices(std::slice::from_ref(&row)).await?;
                println!("added price version {}", row.id);
                Ok(0)
            }
            [kind @ ("topup" | "credit"), rest @ ..] => {
                let (scope, amount, memo) = credit_args(rest)?;
                let kind = if *kind == "topup" { "topup" } else { "adjustment" };
                let id = store.credit(&scope, amount, kind, &memo).await?;
                let billing = relay_billing::BillingService::new(store.clone(), cfg.billing.clone()).await?;
                let (prepaid, spent) = billing.balance(&scope).await?;
                println!(
                    "{kind} {id}: {scope} balance {} (prepaid {}, spent {})",
                    micros(prepaid - spent),
                    micros(prepaid),
                    micros(spent)
                );
                Ok(0)
            }
            ["balance", "--scope", scope] => {
                let billing = relay_billing::BillingService::new(store.clone(), cfg.billing.clone()).await?;
                let (prepaid, spent) = billing.balance(scope).await?;
                println!(
                    "{scope}: balance {} (prepaid {}, spent {})",
                    micros(prepaid - spent),
                    micros(prepaid),
                    micros(spent)
                );
                Ok(0)
            }
            ["dlq", "list"] => {
                let letters = store.dead_letters().await?;
                println!("id,request_id,at_ms,reason");
                for d in &letters {
                    println!("{},{},{},{}", d.id, d.request_id, d.at_ms, d.reason.replace(['\n', ','], " "));
                }
                eprintln!("{} dead letter(s)", letters.len());
                Ok(0)
            }
            ["dlq", "replay"] => {
                let billing = relay_billing::BillingService::new(store.clone(), cfg.billing.clone()).await?;
                let recorder = billing.recorder();
                let (mut ok, mut failed) = (0, 0);
                for d in store.dead_letters().await? {
                    let Ok(event) = UsageEvent::decode(d.event.as_slice()) else {
                        eprintln!("{}: not a usage event; left in place", d.id);
                        failed += 1;
                        continue;
                    };
                    // Replay tries once more and never dead-letters again on its own.
                    let verdict = recorder.handle_batch(std::slice::from_ref(&event), &[0]).await;
                    if verdict.first() == Some(&Handled::Stored)
                        && store.get(&event.request_id).await?.is_some()
                    {
                        store.delete_dead_letter(&d.id).await?;
                        ok += 1;
                    } else {
                        eprintln!("{}: still not recorded ({verdict:?})", d.id);
                        failed += 1;
                    }
                }
                println!("replayed {ok}, still failing {failed}");
                Ok(i32::from(failed > 0))
            }
            _ => Err(anyhow::anyhow!("usage:\n{USAGE}")),
        }
    });
    result.unwrap_or_else(|e| {
        eprintln!("relay: {e:#}");
        crate::cli::EXIT_CONFIG
    })
}

use relay_billing::reconcile::micros;

fn price_args(rest: &[&str]) -> anyhow::Result<relay_billing::pricing::PriceEntry> {
    let mut p = relay_billing::pricing::PriceEntry { provider: "*".into(), ..Default::default() };
    let (mut input, mut output) = (false, false);
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        let v = it.next().copied().ok_or_else(|| anyhow::anyhow!("{a} needs a value"))?;
        let n = || v.parse::<i64>().map_err(|_| anyhow::anyhow!("{a} needs an integer"));
        match *a {
            "--model" => p.model = v.to_owned(),
            "--provider" => p.provider = v.to_owned(),
            "--currency" => p.currency = Some(v.to_owned()),
            "--source" => p.source = Some(v.to_owned()),
            "--input" => (p.input, input) = (n()?, true),
            "--output" => (p.output, output) = (n()?, true),
            "--cached-input" => p.cached_input = n()?,
            "--cache-write" => p.cache_write = n()?,
            "--reasoning" => p.reasoning = n()?,
            "--per-request" => p.per_request = n()?,
            "--valid-from-ms" => p.valid_from_ms = n()?,
            "--valid-to-ms" => p.valid_to_ms = n()?,
            other => anyhow::bail!("unknown argument `{other}`\nusage:\n{USAGE}"),
        }
    }
    anyhow::ensure!(!p.model.is_empty() && input && output, "--model, --input and --output are required");
    Ok(p)
}

fn credit_args(rest: &[&str]) -> anyhow::Result<(String, i64, String)> {
    let (mut scope, mut amount, mut memo) = (None, None, String::new());
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().copied().ok_or_else(|| anyhow::anyhow!("{a} needs a value"));
        match *a {
            "--scope" => scope = Some(value()?.to_owned()),
            "--amount-micros" => {
                amount = Some(
                    value()?
                        .parse::<i64>()
                        .map_err(|_| anyhow::anyhow!("--amount-micros needs an integer"))?,
                )
            }
            "--memo" => memo = value()?.to_owned(),
            other => anyhow::bail!("unknown argument `{other}`\nusage:\n{USAGE}"),
        }
    }
    match (scope, amount) {
        (Some(s), Some(n)) => Ok((s, n, memo)),
        _ => anyhow::bail!("--scope and --amount-micros are required\nusage:\n{USAGE}"),
    }
}

fn export_args(rest: &[&str]) -> anyhow::Result<(i64, i64, bool)> {
    let (mut from, mut to, mut focus) = (None, relay_core::ids::now_ms() + 1, false);
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        let date = |v: Option<&&str>| {
            v.and_then(|d| relay_billing::reports::date_ms(d))
                .ok_or_else(|| anyhow::anyhow!("{a} needs a date YYYY-MM-DD"))
        };
        match *a {
            "--from" => from = Some(date(it.next())?),
            "--to" => to = date(it.next())?,
            "--focus" => focus = true,
            other => anyhow::bail!("unknown argument `{other}`\nusage:\n{USAGE}"),
        }
    }
    let from = from.ok_or_else(|| anyhow::anyhow!("--from is required\nusage:\n{USAGE}"))?;
    anyhow::ensure!(to > from, "--to must be after --from");
    Ok((from, to, focus))
}

async fn reconcile(db: &relay_db::Db, rest: &[&str]) -> anyhow::Result<i32> {
    let report = relay_billing::reconcile::check(db).await?;
    println!("{report}");
    let mut ok = report.ok();
    match rest {
        [] => {}
        ["--provider-csv", path] => {
            let csv = std::fs::read_to_string(path)?;
            let (table, matched) = relay_billing::reconcile::compare_provider_csv(&report, &csv)
                .map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
            println!("\n{table}");
            println!(
                "{}",
                if matched { "provider usage matches" } else { "provider usage differs (see variance)" }
            );
            ok &= matched;
        }
        _ => anyhow::bail!("usage:\n{USAGE}"),
    }
    Ok(i32::from(!ok))
}
