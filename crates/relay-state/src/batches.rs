//! Batches API storage: `batches` (status and lease in the clear, the batch object and the principal it
//! runs as sealed) and `batch_results` (each answered line, sealed). Statements name the org, except the
//! claim, which hands any org's pending batch to one runner at a time under a lease.

use relay_core::contracts::Result;
use relay_core::pb::state::v1::{
    BatchList, BatchRef, BatchResult, BatchResults, ClaimBatchRequest, PutBatchRequest, StoredBatch,
};
use relay_core::{ErrorCode, RelayError};
use relay_db::{Arg, Col, Val};

use crate::{DAY_MS, ResponsesStore, db_error};

/// Statuses after which nothing more happens.
pub const TERMINAL: [&str; 4] = ["completed", "failed", "cancelled", "expired"];

/// Statuses a runner has work for.
pub const ACTIVE: [&str; 3] = ["validating", "in_progress", "cancelling"];

fn not_found(id: &str) -> RelayError {
    RelayError::new(ErrorCode::NotFound, format!("No batch found with id '{id}'.")).with_param("batch_id")
}

const COLUMNS: &str = "org_id, id, team_id, key_id, created_at_ms, deadline_ms, status, object, principal";
const COLS: [Col; 9] =
    [Col::Text, Col::Text, Col::Text, Col::Text, Col::I64, Col::I64, Col::Text, Col::Bytes, Col::Bytes];

impl ResponsesStore {
    fn batch_of(&self, row: Vec<Val>) -> Result<StoredBatch> {
        let mut row = row.into_iter();
        let mut next = || row.next().ok_or_else(|| RelayError::internal("short batch row"));
        let (org_id, id, team_id, key_id) =
            (next()?.into_text(), next()?.into_text(), next()?.into_text(), next()?.into_text());
        let (created, deadline, status) = (next()?.i64(), next()?.i64(), next()?.into_text());
        let open = |what: &str, sealed: Vec<u8>| {
            self.sealer.open(&[&org_id, what, &id], &sealed).ok_or_else(|| {
                tracing::error!(batch_id = %id, "stored batch does not decrypt (wrong state.encryption_key?)");
                RelayError::new(ErrorCode::Internal, "the stored batch cannot be read")
            })
        };
        let object = open("batch", next()?.into_bytes())?;
        let principal = open("batch-principal", next()?.into_bytes())?;
        Ok(StoredBatch {
            id: id.clone(),
            org_id: org_id.clone(),
            team_id,
            key_id,
            created_at_unix_ms: created,
            status,
            object_json: object.into(),
            principal: principal.into(),
            deadline_unix_ms: deadline,
        })
    }

    pub(crate) async fn put_batch_impl(&self, req: PutBatchRequest) -> Result<StoredBatch> {
        let b = req.batch.ok_or_else(|| RelayError::invalid_request("no batch to store"))?;
        if b.org_id.is_empty() || b.id.is_empty() {
            return Err(RelayError::invalid_request("a batch needs an org and an id"));
        }
        let now = relay_core::ids::now_ms();
        let lease = match (req.release_lease, req.lease_ms) {
            (true, _) => Some(0),
            (false, 0) => None,
            (false, ms) => Some(now + i64::from(ms)),
        };
        let object = self.sealer.seal(&[&b.org_id, "batch", &b.id], &b.object_json);
        if req.create {
            let days = if req.retention_days == 0 { self.retention_days } else { req.retention_days };
            let expires = b.created_at_unix_ms.saturating_add(i64::from(days) * DAY_MS);
            let principal = self.sealer.seal(&[&b.org_id, "batch-principal", &b.id], &b.principal);
            self.db
                .execute(
                    "INSERT INTO batches (org_id, id, team_id, key_id, created_at_ms, expires_at_ms, deadline_ms, status, runner, lease_until_ms, object, principal) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, '', $9, $10, $11)",
                    &[
                        (&b.org_id).into(),
                        (&b.id).into(),
                        (&b.team_id).into(),
                        (&b.key_id).into(),
                        b.created_at_unix_ms.into(),
                        expires.into(),
                        b.deadline_unix_ms.into(),
                        (&b.status).into(),
                        lease.unwrap_or(0).into(),
                        object.into(),
                        principal.into(),
                    ],
                )
                .await
                .map_err(|e| db_error(&e))?;
        } else {
            // No lease change: the column is set to itself.
            let (lease_sql, lease) = match lease {
                Some(l) => ("$3", l),
                None => ("lease_until_ms + $3", 0),
            };
            let mut args: Vec<Arg> =
                vec![(&b.status).into(), object.into(), lease.into(), (&b.org_id).into(), (&b.id).into()];
            let mut guard = String::new();
            if !req.if_status.is_empty() {
                let marks: Vec<String> = (0..req.if_status.len()).map(|i| format!("${}", i + 6)).collect();
                guard = format!(" AND status IN ({})", marks.join(", "));
                args.extend(req.if_status.iter().map(Arg::from));
            }
            let n = self
                .db
                .execute(
                    &format!("UPDATE batches SET status = $1, object = $2, lease_until_ms = {lease_sql} WHERE org_id = $4 AND id = $5{guard}"),
                    &args,
                )
                .await
                .map_err(|e| db_error(&e))?;
            if n > 0 && TERMINAL.contains(&b.status.as_str()) {
                // Finalised: its files hold the answers now.
                self.db
                    .execute(
                        "DELETE FROM batch_results WHERE org_id = $1 AND batch_id = $2",
                        &[(&b.org_id).into(), (&b.id).into()],
                    )
                    .await
                    .map_err(|e| db_error(&e))?;
            }
            if n == 0 {
                // Absent, or not in a status that allows the change.
                let now =
                    self.get_batch_impl(BatchRef { org_id: b.org_id.clone(), id: b.id.clone() }).await?;
                return Err(RelayError::invalid_request(format!(
                    "Batch '{}' is {}: this change is not possible now.",
                    b.id, now.status
                )));
            }
        }
        self.get_batch_impl(BatchRef { org_id: b.org_id, id: b.id }).await
    }

    pub(crate) async fn get_batch_impl(&self, req: BatchRef) -> Result<StoredBatch> {
        let rows = self
            .db
            .fetch(
                &format!(
                    "SELECT {COLUMNS} FROM batches WHERE org_id = $1 AND id = $2 AND expires_at_ms > $3"
                ),
                &[(&req.org_id).into(), (&req.id).into(), relay_core::ids::now_ms().into()],
                &COLS,
            )
            .await
            .map_err(|e| db_error(&e))?;
        self.batch_of(rows.into_iter().next().ok_or_else(|| not_found(&req.id))?)
    }

    pub(crate) async fn list_batches_impl(&self, req: BatchRef) -> Result<BatchList> {
        let rows = self
            .db
            .fetch(
                &format!(
                    "SELECT {COLUMNS} FROM batches WHERE org_id = $1 AND expires_at_ms > $2 \
                     ORDER BY created_at_ms DESC, id DESC LIMIT 10000"
                ),
                &[(&req.org_id).into(), relay_core::ids::now_ms().into()],
                &COLS,
            )
            .await
            .map_err(|e| db_error(&e))?;
        let batches = rows.into_iter().map(|r| self.batch_of(r)).collect::<Result<_>>()?;
        Ok(BatchList { batches })
    }

    pub(crate) async fn claim_batch_impl(&self, req: ClaimBatchRequest) -> Result<StoredBatch> {
        let now = relay_core::ids::now_ms();
        let rows = self
            .db
            .fetch(
                "SELECT org_id, id FROM batches WHERE status IN ($1, $2, $3) AND lease_until_ms < $4 \
                 ORDER BY created_at_ms LIMIT 8",
                &[ACTIVE[0].into(), ACTIVE[1].into(), ACTIVE[2].into(), now.into()],
                &[Col::Text, Col::Text],
            )
            .await
            .map_err(|e| db_error(&e))?;
        for row in rows {
            let (org, id) = (row[0].text().to_owned(), row[1].text().to_owned());
            // Taken only if no other runner took it since the read.
            let n = self
                .db
                .execute(
                    "UPDATE batches SET runner = $1, lease_until_ms = $2 WHERE org_id = $3 AND id = $4 AND lease_until_ms < $5",
                    &[(&req.runner).into(), (now + i64::from(req.lease_ms)).into(), (&org).into(), (&id).into(), now.into()],
                )
                .await
                .map_err(|e| db_error(&e))?;
            if n == 1 {
                return self.get_batch_impl(BatchRef { org_id: org, id }).await;
            }
        }
        Ok(StoredBatch::default())
    }

    pub(crate) async fn put_batch_result_impl(&self, r: BatchResult) -> Result<()> {
        let line = i64::try_from(r.line).map_err(|_| RelayError::invalid_request("line out of range"))?;
        let sealed =
            self.sealer.seal(&[&r.org_id, "batch-result", &r.batch_id, &line.to_string()], &r.result_json);
        let args: [Arg; 3] = [(&r.org_id).into(), (&r.batch_id).into(), line.into()];
        let mut tx = self.db.begin().await.map_err(|e| db_error(&e))?;
        let run = async {
            // A line answered again (a runner that lost its lease mid-line) keeps the latest answer.
            tx.execute("DELETE FROM batch_results WHERE org_id = $1 AND batch_id = $2 AND line = $3", &args)
                .await?;
            tx.execute(
                "INSERT INTO batch_results (org_id, batch_id, line, ok, result) VALUES ($1, $2, $3, $4, $5)",
                &[args[0].clone(), args[1].clone(), args[2].clone(), i64::from(r.ok).into(), sealed.into()],
            )
            .await
        };
        run.await.map_err(|e| db_error(&e))?;
        tx.commit().await.map_err(|e| db_error(&e))
    }

    pub(crate) async fn list_batch_results_impl(&self, req: BatchRef) -> Result<BatchResults> {
        let rows = self
            .db
            .fetch(
                "SELECT line, ok, result FROM batch_results WHERE org_id = $1 AND batch_id = $2 ORDER BY line",
                &[(&req.org_id).into(), (&req.id).into()],
                &[Col::I64, Col::I64, Col::Bytes],
            )
            .await
            .map_err(|e| db_error(&e))?;
        let mut results = Vec::with_capacity(rows.len());
        for row in rows {
            let mut row = row.into_iter();
            let (Some(line), Some(ok), Some(sealed)) = (row.next(), row.next(), row.next()) else { continue };
            let line = line.i64();
            let body = self
                .sealer
                .open(&[&req.org_id, "batch-result", &req.id, &line.to_string()], &sealed.into_bytes())
                .ok_or_else(|| {
                    RelayError::new(ErrorCode::Internal, "a stored batch result cannot be read")
                })?;
            results.push(BatchResult {
                org_id: req.org_id.clone(),
                batch_id: req.id.clone(),
                line: u64::try_from(line).unwrap_or(0),
                ok: ok.i64() != 0,
                result_json: body.into(),
            });
        }
        Ok(BatchResults { results })
    }

    /// Files and batches past their retention, with the batches' results.
    pub(crate) async fn purge_files_and_batches(&self, now: i64) -> anyhow::Result<u64> {
        let files = self.db.execute("DELETE FROM files WHERE expires_at_ms <= $1", &[now.into()]).await?;
        let results = self
            .db
            .execute(
                "DELETE FROM batch_results WHERE EXISTS (SELECT 1 FROM batches b \
                 WHERE b.org_id = batch_results.org_id AND b.id = batch_results.batch_id AND b.expires_at_ms <= $1)",
                &[now.into()],
            )
            .await?;
        let batches = self.db.execute("DELETE FROM batches WHERE expires_at_ms <= $1", &[now.into()]).await?;
        Ok(files + results + batches)
    }
}
