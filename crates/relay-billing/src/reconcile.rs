//! `relay billing reconcile`: proves the books. Checks that every posting set balances, that every usage
//! record has exactly one posting set (and no posting set lacks its record), that the ledger's customer and
//! provider totals equal the records' sell and cost columns, and lists dead letters (events not booked).
//! With a provider usage CSV (`date,model,input_tokens,output_tokens,cost`), compares per day and model
//! what the provider billed with what Relay booked, and prints the variance.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use relay_db::{Col, Db};

const DAY_MS: i64 = 86_400_000;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub records: i64,
    /// Usage posting sets (top-ups and credits are transactions too, not counted here).
    pub transactions: i64,
    pub unbalanced_transactions: i64,
    pub records_without_postings: i64,
    pub postings_without_record: i64,
    pub dead_letters: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub sell_micros_records: i64,
    pub sell_micros_ledger: i64,
    pub cost_micros_records: i64,
    pub cost_micros_ledger: i64,
    /// Hedge overhead: what cancelled hedge attempts may cost (owed to providers, not charged).
    pub overhead_micros_ledger: i64,
    /// Per (UTC date, upstream model): input tokens, output tokens, cost micros as booked.
    pub by_day_model: BTreeMap<(String, String), [i64; 3]>,
}

impl Report {
    /// Do the invariants hold?
    pub fn ok(&self) -> bool {
        self.unbalanced_transactions == 0
            && self.records_without_postings == 0
            && self.postings_without_record == 0
            && self.dead_letters == 0
            && self.sell_micros_records == self.sell_micros_ledger
            && self.cost_micros_records == self.cost_micros_ledger
    }
}

async fn one(db: &Db, sql: &str) -> anyhow::Result<i64> {
    let rows = db.fetch(sql, &[], &[Col::I64]).await?;
    Ok(rows.first().and_then(|r| r.first()).map_or(0, relay_db::Val::i64))
}

/// Reads the whole ledger and checks it.
pub async fn check(db: &Db) -> anyhow::Result<Report> {
    let sum = |col: &str| format!("CAST(COALESCE(SUM({col}), 0) AS BIGINT)");
    let mut r = Report {
        records: one(db, "SELECT COUNT(*) FROM usage_records").await?,
        transactions: one(db, "SELECT COUNT(*) FROM ledger_transactions WHERE kind = 'usage'").await?,
        unbalanced_transactions: one(
            db,
            "SELECT COUNT(*) FROM (SELECT txn_id FROM ledger_entries GROUP BY txn_id, currency \
             HAVING SUM(amount_micros) <> 0) AS x",
        )
        .await?,
        records_without_postings: one(
            db,
            "SELECT COUNT(*) FROM usage_records u WHERE NOT EXISTS \
             (SELECT 1 FROM ledger_transactions t WHERE t.request_id = u.request_id)",
        )
        .await?,
        postings_without_record: one(
            db,
            "SELECT COUNT(*) FROM ledger_transactions t WHERE t.kind = 'usage' AND NOT EXISTS \
             (SELECT 1 FROM usage_records u WHERE u.request_id = t.request_id)",
        )
        .await?,
        dead_letters: one(db, "SELECT COUNT(*) FROM usage_dead_letters").await?,
        ..Default::default()
    };
    let totals = format!(
        "SELECT {}, {}, {}, {} FROM usage_records",
        sum("input_tokens"),
        sum("output_tokens"),
        sum("sell_micros"),
        sum("cost_micros")
    );
    let rows = db.fetch(&totals, &[], &[Col::I64; 4]).await?;
    if let Some(t) = rows.first() {
        (r.input_tokens, r.output_tokens, r.sell_micros_records, r.cost_micros_records) =
            (t[0].i64(), t[1].i64(), t[2].i64(), t[3].i64());
    }
    let ledger = |kind: &str| {
        format!(
            "SELECT {} FROM ledger_entries e JOIN ledger_accounts a ON a.id = e.account_id WHERE a.kind = '{kind}'",
            sum("e.amount_micros")
        )
    };
    r.sell_micros_ledger = one(db, &ledger("customer")).await?;
    r.cost_micros_ledger = one(db, &ledger("cost")).await?;
    r.overhead_micros_ledger = one(db, &ledger("overhead")).await?;
    let by_day = format!(
        "SELECT started_at_ms / {DAY_MS} AS day, upstream_model, {}, {}, {} FROM usage_records \
         GROUP BY started_at_ms / {DAY_MS}, upstream_model",
        sum("input_tokens"),
        sum("output_tokens"),
        sum("cost_micros")
    );
    for row in db.fetch(&by_day, &[], &[Col::I64, Col::Text, Col::I64, Col::I64, Col::I64]).await? {
        let date = day_to_date(row[0].i64());
        r.by_day_model.insert((date, row[1].text().to_owned()), [row[2].i64(), row[3].i64(), row[4].i64()]);
    }
    Ok(r)
}

fn day_to_date(day: i64) -> String {
    chrono::DateTime::from_timestamp(day * 86_400, 0)
        .map_or_else(|| day.to_string(), |d| d.date_naive().to_string())
}

/// A decimal amount ("12.3456") as integer micro-units, without floats; at most 6 decimals.
pub fn parse_micros(s: &str) -> Option<i64> {
    let s = s.trim();
    let (neg, s) = s.strip_prefix('-').map_or((false, s), |r| (true, r));
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if whole.is_empty() && frac.is_empty() || frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: i64 = if whole.is_empty() { 0 } else { whole.parse().ok()? };
    let frac: i64 = format!("{frac:0<6}").parse().ok()?;
    let v = whole.checked_mul(1_000_000)?.checked_add(frac)?;
    Some(if neg { -v } else { v })
}

/// Compares a provider usage CSV (`date,model,input_tokens,output_tokens,cost`; a header line is skipped)
/// with what was booked; returns the printable comparison and whether every row matched.
pub fn compare_provider_csv(report: &Report, csv: &str) -> Result<(String, bool), String> {
    let mut theirs: BTreeMap<(String, String), [i64; 3]> = BTreeMap::new();
    for (n, line) in csv.lines().enumerate() {
        let cols: Vec<&str> = line.split(',').map(str::trim).collect();
        if line.trim().is_empty() || (n == 0 && cols.first().is_some_and(|c| c.eq_ignore_ascii_case("date")))
        {
            continue;
        }
        let [date, model, input, output, cost] = cols[..] else {
            return Err(format!("line {}: expected date,model,input_tokens,output_tokens,cost", n + 1));
        };
        let int =
            |v: &str| v.parse::<i64>().map_err(|_| format!("line {}: `{v}` is not a token count", n + 1));
        let cost = parse_micros(cost).ok_or_else(|| format!("line {}: `{cost}` is not an amount", n + 1))?;
        let e = theirs.entry((date.to_owned(), model.to_owned())).or_default();
        e[0] += int(input)?;
        e[1] += int(output)?;
        e[2] += cost;
    }
    let mut out = String::from(
        "date,model,provider_input,relay_input,provider_output,relay_output,provider_cost,relay_cost,cost_variance\n",
    );
    let mut all_match = true;
    let keys: std::collections::BTreeSet<_> =
        theirs.keys().chain(report.by_day_model.keys()).cloned().collect();
    for k in keys {
        let p = theirs.get(&k).copied().unwrap_or_default();
        let r = report.by_day_model.get(&k).copied().unwrap_or_default();
        all_match &= p == r;
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{}",
            k.0,
            k.1,
            p[0],
            r[0],
            p[1],
            r[1],
            micros(p[2]),
            micros(r[2]),
            micros(r[2] - p[2])
        );
    }
    Ok((out, all_match))
}

/// Micro-units as a decimal amount.
pub fn micros(v: i64) -> String {
    let sign = if v < 0 { "-" } else { "" };
    let a = v.unsigned_abs();
    format!("{sign}{}.{:06}", a / 1_000_000, a % 1_000_000)
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mark = |ok: bool| if ok { "ok  " } else { "FAIL" };
        writeln!(f, "usage records:              {}", self.records)?;
        writeln!(f, "posting sets:               {}", self.transactions)?;
        writeln!(
            f,
            "{} unbalanced posting sets:   {}",
            mark(self.unbalanced_transactions == 0),
            self.unbalanced_transactions
        )?;
        writeln!(
            f,
            "{} records without postings:  {}",
            mark(self.records_without_postings == 0),
            self.records_without_postings
        )?;
        writeln!(
            f,
            "{} postings without a record: {}",
            mark(self.postings_without_record == 0),
            self.postings_without_record
        )?;
        writeln!(f, "{} dead letters (unbooked):   {}", mark(self.dead_letters == 0), self.dead_letters)?;
        let sell_ok = self.sell_micros_records == self.sell_micros_ledger;
        let cost_ok = self.cost_micros_records == self.cost_micros_ledger;
        writeln!(
            f,
            "{} customer charges: records {} ledger {}",
            mark(sell_ok),
            micros(self.sell_micros_records),
            micros(self.sell_micros_ledger)
        )?;
        writeln!(
            f,
            "{} provider costs:   records {} ledger {}",
            mark(cost_ok),
            micros(self.cost_micros_records),
            micros(self.cost_micros_ledger)
        )?;
        writeln!(f, "  hedge overhead:   ledger {}", micros(self.overhead_micros_ledger))?;
        writeln!(f, "tokens: {} input, {} output", self.input_tokens, self.output_tokens)?;
        write!(f, "{}", if self.ok() { "books balance" } else { "BOOKS DO NOT RECONCILE" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_parse_without_floats() {
        assert_eq!(parse_micros("12.345678"), Some(12_345_678));
        assert_eq!(parse_micros("0.5"), Some(500_000));
        assert_eq!(parse_micros("3"), Some(3_000_000));
        assert_eq!(parse_micros("-0.000001"), Some(-1));
        assert_eq!(parse_micros("1.0000001"), None);
        assert_eq!(parse_micros("abc"), None);
        assert_eq!(micros(-1_500_000), "-1.500000");
    }

    #[test]
    fn provider_csv_variance_is_per_day_and_model() {
        let mut r = Report::default();
        r.by_day_model.insert(("2026-12-01".into(), "gpt-4o".into()), [100, 50, 750]);
        let (out, ok) = compare_provider_csv(
            &r,
            "date,model,input_tokens,output_tokens,cost\n2026-12-01,gpt-4o,100,50,0.00075\n",
        )
        .unwrap();
        assert!(ok, "{out}");
        let (out, ok) = compare_provider_csv(&r, "2026-12-01,gpt-4o,120,50,0.0009\n").unwrap();
        assert!(!ok);
        assert!(out.contains("2026-12-01,gpt-4o,120,100,50,50,0.000900,0.000750,-0.000150"), "{out}");
        assert!(compare_provider_csv(&r, "x,y\n").is_err());
    }
}
