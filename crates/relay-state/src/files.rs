//! Files API storage: `files`, one row per file with its content sealed under the org and the file id.
//! Every statement names the org: another org's file id finds nothing.

use relay_core::contracts::Result;
use relay_core::pb::state::v1::{FileList, FileRef, ListFilesRequest, PutFileRequest, StoredFile};
use relay_core::{ErrorCode, RelayError};
use relay_db::{Col, Val};

use crate::{DAY_MS, ResponsesStore, db_error};

fn not_found(id: &str) -> RelayError {
    RelayError::new(ErrorCode::NotFound, format!("No such File object: {id}")).with_param("file_id")
}

const COLUMNS: &str = "id, team_id, key_id, filename, purpose, bytes, created_at_ms, expires_at_ms";
const COLS: [Col; 8] = [Col::Text, Col::Text, Col::Text, Col::Text, Col::Text, Col::I64, Col::I64, Col::I64];

fn file_of(org: &str, row: Vec<Val>) -> StoredFile {
    let mut row = row.into_iter();
    let mut text = || row.next().map(Val::into_text).unwrap_or_default();
    let (id, team_id, key_id, filename, purpose) = (text(), text(), text(), text(), text());
    let mut num = || row.next().map_or(0, |v| v.i64());
    let (bytes, created, expires) = (num(), num(), num());
    StoredFile {
        id,
        org_id: org.to_owned(),
        team_id,
        key_id,
        filename,
        purpose,
        bytes: u64::try_from(bytes).unwrap_or(0),
        created_at_unix_ms: created,
        expires_at_unix_ms: expires,
        content: Default::default(),
    }
}

impl ResponsesStore {
    pub(crate) async fn put_file_impl(&self, req: PutFileRequest) -> Result<StoredFile> {
        let mut f = req.file.ok_or_else(|| RelayError::invalid_request("no file to store"))?;
        if f.org_id.is_empty() || f.id.is_empty() {
            return Err(RelayError::invalid_request("a file needs an org and an id"));
        }
        if f.expires_at_unix_ms == 0 {
            let days = if req.retention_days == 0 { self.retention_days } else { req.retention_days };
            f.expires_at_unix_ms = f.created_at_unix_ms.saturating_add(i64::from(days) * DAY_MS);
        }
        let sealed = self.sealer.seal(&[&f.org_id, "file", &f.id], &f.content);
        self.db
            .execute(
                &format!("INSERT INTO files (org_id, {COLUMNS}, content) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"),
                &[
                    (&f.org_id).into(),
                    (&f.id).into(),
                    (&f.team_id).into(),
                    (&f.key_id).into(),
                    (&f.filename).into(),
                    (&f.purpose).into(),
                    i64::try_from(f.content.len()).unwrap_or(i64::MAX).into(),
                    f.created_at_unix_ms.into(),
                    f.expires_at_unix_ms.into(),
                    sealed.into(),
                ],
            )
            .await
            .map_err(|e| db_error(&e))?;
        f.bytes = f.content.len() as u64;
        f.content = Default::default();
        Ok(f)
    }

    pub(crate) async fn get_file_impl(&self, req: FileRef) -> Result<StoredFile> {
        let content = if req.with_content { ", content" } else { "" };
        let mut cols = COLS.to_vec();
        if req.with_content {
            cols.push(Col::Bytes);
        }
        let rows = self
            .db
            .fetch(
                &format!("SELECT {COLUMNS}{content} FROM files WHERE org_id = $1 AND id = $2 AND expires_at_ms > $3"),
                &[(&req.org_id).into(), (&req.id).into(), relay_core::ids::now_ms().into()],
                &cols,
            )
            .await
            .map_err(|e| db_error(&e))?;
        let mut row = rows.into_iter().next().ok_or_else(|| not_found(&req.id))?;
        let sealed = if req.with_content { row.pop().map(Val::into_bytes) } else { None };
        let mut f = file_of(&req.org_id, row);
        if let Some(sealed) = sealed {
            let content = self.sealer.open(&[&req.org_id, "file", &req.id], &sealed).ok_or_else(|| {
                tracing::error!(id = %req.id, "stored file does not decrypt (wrong state.encryption_key?)");
                RelayError::new(ErrorCode::Internal, "the stored file cannot be read")
            })?;
            f.content = content.into();
        }
        Ok(f)
    }

    pub(crate) async fn list_files_impl(&self, req: ListFilesRequest) -> Result<FileList> {
        let now = relay_core::ids::now_ms();
        let (filter, args) = if req.purpose.is_empty() {
            ("", vec![(&req.org_id).into(), now.into()])
        } else {
            (" AND purpose = $3", vec![(&req.org_id).into(), now.into(), (&req.purpose).into()])
        };
        let rows = self
            .db
            .fetch(
                &format!(
                    "SELECT {COLUMNS} FROM files WHERE org_id = $1 AND expires_at_ms > $2{filter} \
                     ORDER BY created_at_ms DESC, id DESC LIMIT 10000"
                ),
                &args,
                &COLS,
            )
            .await
            .map_err(|e| db_error(&e))?;
        Ok(FileList { files: rows.into_iter().map(|r| file_of(&req.org_id, r)).collect() })
    }

    pub(crate) async fn delete_file_impl(&self, req: FileRef) -> Result<()> {
        let n = self
            .db
            .execute(
                "DELETE FROM files WHERE org_id = $1 AND id = $2",
                &[(&req.org_id).into(), (&req.id).into()],
            )
            .await
            .map_err(|e| db_error(&e))?;
        if n == 0 { Err(not_found(&req.id)) } else { Ok(()) }
    }
}
