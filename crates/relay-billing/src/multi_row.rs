//! Multi-row inserts: one statement text per row count, built once, and a batch of rows run as the few
//! statements [`relay_db::Tx::row_chunks`] splits it into.

use relay_db::Arg;

/// `sql` with `{rows}` replaced by `rows` groups of `cols` numbered placeholders. Statements are constants
/// and batches are split into a few fixed sizes ([`relay_db::Tx::row_chunks`]), so each text is built once.
pub(crate) fn multi_row(sql: &'static str, rows: usize, cols: usize) -> std::sync::Arc<str> {
    use std::collections::HashMap;
    use std::sync::{Arc, LazyLock, Mutex};
    type Built = HashMap<(usize, usize, usize), Arc<str>>;
    static BUILT: LazyLock<Mutex<Built>> = LazyLock::new(Default::default);
    let key = (sql.as_ptr() as usize, rows, cols);
    let lock = || BUILT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(hit) = lock().get(&key) {
        return hit.clone();
    }
    let mut groups = String::with_capacity(rows * cols * 6);
    for r in 0..rows {
        groups.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..cols {
            if c > 0 {
                groups.push_str(", ");
            }
            groups.push('$');
            groups.push_str(&(r * cols + c + 1).to_string());
        }
        groups.push(')');
    }
    let built: Arc<str> = sql.replace("{rows}", &groups).into();
    let mut kept = lock();
    if kept.len() < 256 {
        kept.insert(key, built.clone());
    }
    built
}

/// Runs `sql` once per chunk of rows ([`relay_db::Tx::row_chunks`]).
pub(crate) async fn insert_rows(
    tx: &mut relay_db::Tx,
    sql: &'static str,
    cols: usize,
    rows: Vec<Vec<Arg>>,
) -> anyhow::Result<()> {
    let mut rows = rows.into_iter();
    for size in tx.row_chunks(rows.len(), cols) {
        let args: Vec<Arg> = rows.by_ref().take(size).flatten().collect();
        tx.execute(&multi_row(sql, size, cols), &args).await?;
    }
    Ok(())
}
