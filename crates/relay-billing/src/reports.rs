//! Usage and spend, summed from `usage_records` (each row's sell and cost are what its posting set booked):
//! grouped queries for dashboards (`GET /admin/v1/usage`) and the CSV export (`relay billing export`), in
//! Relay's own column set or a FOCUS-compatible one (FinOps Open Cost and Usage Specification 1.x names).

use std::fmt::Write as _;

use relay_db::{Col, Db};
use serde::Serialize;

use crate::reconcile::micros;

const DAY_MS: i64 = 86_400_000;

/// What rows are grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Day,
    Model,
    Key,
    Team,
    Org,
}

impl GroupBy {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "day" => Self::Day,
            "model" => Self::Model,
            "key" => Self::Key,
            "team" => Self::Team,
            "org" => Self::Org,
            _ => return None,
        })
    }

    fn column(self) -> String {
        match self {
            Self::Day => format!("CAST(started_at_ms / {DAY_MS} AS TEXT)"),
            Self::Model => "model".into(),
            Self::Key => "key_id".into(),
            Self::Team => "team_id".into(),
            Self::Org => "org_id".into(),
        }
    }
}

/// One group's totals.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UsageRow {
    pub group: String,
    pub requests: i64,
    pub failed_requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_input_tokens: i64,
    pub cache_write_tokens: i64,
    pub reasoning_tokens: i64,
    pub sell_micros: i64,
    pub cost_micros: i64,
}

fn sums() -> String {
    [
        "COUNT(*)",
        "SUM(CASE WHEN outcome = 'success' THEN 0 ELSE 1 END)",
        "SUM(input_tokens)",
        "SUM(output_tokens)",
        "SUM(cached_input_tokens)",
        "SUM(cache_write_tokens)",
        "SUM(reasoning_tokens)",
        "SUM(sell_micros)",
        "SUM(cost_micros)",
    ]
    .map(|s| format!("CAST(COALESCE({s}, 0) AS BIGINT)"))
    .join(", ")
}

fn day_label(v: &str) -> String {
    v.parse::<i64>()
        .ok()
        .and_then(|d| chrono::DateTime::from_timestamp(d * 86_400, 0))
        .map_or_else(|| v.to_owned(), |d| d.date_naive().to_string())
}

/// Totals per group over `[from_ms, to_ms)`, optionally for one key, team or org (`scope` = `key:<id>`…).
pub async fn usage(
    db: &Db,
    from_ms: i64,
    to_ms: i64,
    group: GroupBy,
    scope: Option<&str>,
) -> anyhow::Result<Vec<UsageRow>> {
    let (filter, mut args) = scope_filter(scope)?;
    args.splice(0..0, [from_ms.into(), to_ms.into()]);
    let col = group.column();
    let sql = format!(
        "SELECT {col} AS g, {} FROM usage_records WHERE started_at_ms >= $1 AND started_at_ms < $2{filter} \
         GROUP BY {col} ORDER BY {col}",
        sums()
    );
    let mut cols = vec![Col::Text];
    cols.extend([Col::I64; 9]);
    let rows = db.fetch(&sql, &args, &cols).await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let g = r[0].text();
            UsageRow {
                group: if group == GroupBy::Day { day_label(g) } else { g.to_owned() },
                requests: r[1].i64(),
                failed_requests: r[2].i64(),
                input_tokens: r[3].i64(),
                output_tokens: r[4].i64(),
                cached_input_tokens: r[5].i64(),
                cache_write_tokens: r[6].i64(),
                reasoning_tokens: r[7].i64(),
                sell_micros: r[8].i64(),
                cost_micros: r[9].i64(),
            }
        })
        .collect())
}

fn scope_filter(scope: Option<&str>) -> anyhow::Result<(String, Vec<relay_db::Arg>)> {
    let Some(scope) = scope else { return Ok((String::new(), Vec::new())) };
    let (kind, id) = scope
        .split_once(':')
        .ok_or_else(|| anyhow::anyhow!("scope must be key:<id>, team:<id> or org:<id>"))?;
    let col = match kind {
        "key" => "key_id",
        "team" => "team_id",
        "org" => "org_id",
        _ => anyhow::bail!("scope must be key:<id>, team:<id> or org:<id>"),
    };
    Ok((format!(" AND {col} = $3"), vec![id.into()]))
}

/// One CSV line per (day, key, team, org, model, deployment) over `[from_ms, to_ms)`. `focus`: FOCUS column
/// names and units (costs as decimal amounts of the billing currency).
pub async fn export_csv(db: &Db, from_ms: i64, to_ms: i64, focus: bool) -> anyhow::Result<String> {
    let sql = format!(
        "SELECT CAST(started_at_ms / {DAY_MS} AS BIGINT), key_id, team_id, org_id, model, deployment_id, provider, \
         currency, {} FROM usage_records WHERE started_at_ms >= $1 AND started_at_ms < $2 \
         GROUP BY started_at_ms / {DAY_MS}, key_id, team_id, org_id, model, deployment_id, provider, currency \
         ORDER BY 1, 2, 5, 6",
        sums()
    );
    let mut cols =
        vec![Col::I64, Col::Text, Col::Text, Col::Text, Col::Text, Col::Text, Col::Text, Col::Text];
    cols.extend([Col::I64; 9]);
    let rows = db.fetch(&sql, &[from_ms.into(), to_ms.into()], &cols).await?;
    let mut out = String::new();
    out.push_str(if focus {
        "BillingPeriodStart,BillingPeriodEnd,ChargePeriodStart,ChargePeriodEnd,ChargeCategory,ChargeDescription,\
         BilledCost,EffectiveCost,ListCost,BillingCurrency,ConsumedQuantity,ConsumedUnit,ProviderName,\
         PublisherName,InvoiceIssuerName,ServiceName,ServiceCategory,ResourceId,ResourceName,SubAccountId,\
         x_RelayKeyId,x_RelayOrgId,x_InputTokens,x_OutputTokens,x_CachedInputTokens,x_CacheWriteTokens,\
         x_ReasoningTokens,x_Requests,x_ProviderCost\n"
    } else {
        "date,key_id,team_id,org_id,model,deployment_id,provider,currency,requests,failed_requests,input_tokens,\
         output_tokens,cached_input_tokens,cache_write_tokens,reasoning_tokens,sell,cost\n"
    });
    let period = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .map_or_else(String::new, |d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string())
    };
    for r in rows {
        let day = r[0].i64();
        let field = |i: usize| csv_field(r[i].text());
        let n = |i: usize| r[i].i64();
        if focus {
            let tokens = n(10) + n(11);
            let _ = writeln!(
                out,
                "{},{},{},{},Usage,{} tokens on {},{},{},{},{},{},Tokens,{},{},Relay,Relay,AI and Machine Learning,{},{},{},{},{},{},{},{},{},{},{},{}",
                period(from_ms),
                period(to_ms),
                period(day * DAY_MS),
                period((day + 1) * DAY_MS),
                field(4),
                field(5),
                micros(n(15)),
                micros(n(15)),
                micros(n(15)),
                field(7),
                tokens,
                field(6),
                field(6),
                field(5),
                field(4),
                field(2),
                field(1),
                field(3),
                n(10),
                n(11),
                n(12),
                n(13),
                n(14),
                n(8),
                micros(n(16)),
            );
        } else {
            let date = chrono::DateTime::from_timestamp(day * 86_400, 0)
                .map_or_else(String::new, |d| d.date_naive().to_string());
            let _ = writeln!(
                out,
                "{date},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                field(1),
                field(2),
                field(3),
                field(4),
                field(5),
                field(6),
                field(7),
                n(8),
                n(9),
                n(10),
                n(11),
                n(12),
                n(13),
                n(14),
                micros(n(15)),
                micros(n(16)),
            );
        }
    }
    Ok(out)
}

/// A CSV field, quoted when it holds a comma, quote or line break (RFC 4180), and never starting with a
/// formula character (`=`, `+`, `-`, `@`) that a spreadsheet would run.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) { format!("'{s}") } else { s.to_owned() };
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s }
}

/// `YYYY-MM-DD` (UTC midnight) as unix ms.
pub fn date_ms(s: &str) -> Option<i64> {
    let d = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
    Some(d.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_and_defused() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=HYPERLINK(1)"), "'=HYPERLINK(1)");
        assert_eq!(date_ms("2026-12-01"), Some(1_796_083_200_000));
        assert_eq!(date_ms("12/01/2026"), None);
        assert_eq!(GroupBy::parse("team"), Some(GroupBy::Team));
        assert_eq!(GroupBy::parse("nope"), None);
    }
}
