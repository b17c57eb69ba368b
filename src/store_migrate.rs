//! Copying keys and their audit log from one store to another (SQLite to PostgreSQL when a
//! deployment grows to several nodes, or back).
//!
//! Idempotent: a key whose project and id already exist in the target is left alone (counted as
//! skipped), and an audit event already present is not appended again, so running a migration
//! twice copies nothing the second time, and an interrupted one is finished by running it again.
//! Keys keep everything (digests, the previous secret and its grace period, timestamps, usage);
//! each copied key is a change in the target, audited with the actor `migrate`.

use serde::Serialize;

use crate::keys::store::{KeyStore, StoreError};

/// What a migration copied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrateReport {
    /// Keys (API keys and dev keys) written to the target.
    pub keys_copied: usize,
    /// Keys the target already had (same project and id), left as they were.
    pub keys_skipped: usize,
    /// Audit events appended to the target.
    pub audit_copied: usize,
    /// Audit events the target already had.
    pub audit_skipped: usize,
}

/// Copies every key and audit event of `from` that `to` lacks. The audit log goes first, in
/// its order, then the keys, oldest first.
pub async fn migrate(from: &dyn KeyStore, to: &dyn KeyStore) -> Result<MigrateReport, StoreError> {
    let mut report = MigrateReport::default();

    let events = from.audit(None).await?;
    report.audit_copied = to.import_audit(&events).await?;
    report.audit_skipped = events.len() - report.audit_copied.min(events.len());

    let (mut records, _) = from.load_all().await?;
    records
        .sort_by(|a, b| (&a.project, a.created_at, &a.id).cmp(&(&b.project, b.created_at, &b.id)));
    for record in &records {
        if to.import_record(record).await? {
            report.keys_copied += 1;
        } else {
            report.keys_skipped += 1;
        }
    }
    tracing::info!(
        keys_copied = report.keys_copied,
        keys_skipped = report.keys_skipped,
        audit_copied = report.audit_copied,
        audit_skipped = report.audit_skipped,
        "store migrated"
    );
    Ok(report)
}
