//! The durable record of operations in flight, so that a crash never leaves work half done.
//!
//! Before each side effect (an SR introduced or created, a VBD made, a staging directory, files
//! moved into a volume) an operation records it here, one fsync'd redb transaction each; when the
//! operation ends its record goes. Records still present at start belong to operations a crash
//! or power loss interrupted: [`crate::volume::VolumeManager::recover`] finishes or undoes them
//! and keeps their outcome here, so `job list` shows it across restarts.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::jobs::Job;

/// Operation id -> [`OpenOperation`] as JSON.
const OPEN: TableDefinition<&str, &[u8]> = TableDefinition::new("open_operations");
/// Job id -> the recovered [`Job`] as JSON.
const RECOVERED: TableDefinition<&str, &[u8]> = TableDefinition::new("recovered_jobs");
/// How many recovered outcomes are kept for `job list`.
const RECOVERED_KEPT: usize = 100;

#[derive(Debug, thiserror::Error)]
#[error("job journal {path}: {message}")]
pub struct JournalError {
    path: PathBuf,
    message: String,
}

/// A side effect an operation is about to cause (recorded before it happens).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "effect", rename_all = "snake_case")]
pub enum Effect {
    /// `SR.create` is about to run; the SR it makes carries the operation id in its
    /// `sm_config` under [`OPERATION_KEY`], so it can be found if the answer never arrived.
    SrCreating,
    /// A new volume's SR; discarded unless the operation committed.
    SrCreated { sr: Uuid },
    /// An SR xapi did not know, introduced for this operation: forgotten afterwards.
    SrIntroduced { sr: Uuid },
    /// A PBD of an SR xapi already knew, created and plugged by this operation.
    PbdCreated { sr: Uuid, pbd: String },
    /// A PBD of an SR xapi already knew, plugged by this operation.
    PbdPlugged { sr: Uuid, pbd: String },
    /// A VBD on this VM is about to be made, tagged with the operation id.
    Vbd { vdi: String },
    /// An `Async.` task runs for this operation; cancelled if it is interrupted.
    Task { task: String },
    /// A staging directory on the share.
    Staging { dir: PathBuf },
    /// New content is about to be moved into an existing volume: afterwards its SR directory
    /// must hold exactly the chain of `<vdi>.vhd` (plus the metadata file).
    Replacing { sr: Uuid, vdi: Uuid },
    /// The staged leaf with inode `inode` is about to be renamed over the volume's VHD: if
    /// the volume's VHD has that inode at recovery, the new content is in place.
    Swapping { sr: Uuid, vdi: Uuid, inode: u64 },
    /// The volume is being deleted; finished at recovery if its VHD is already gone.
    Deleting { sr: Uuid, vdi: Uuid },
    /// The result is in place; what remains is releasing what was borrowed.
    Committed { volume: Option<String> },
}

/// The `sm_config` key naming the operation that created an SR.
pub const OPERATION_KEY: &str = "xenapinfs-operation";

/// An operation that has not ended, as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenOperation {
    pub id: String,
    pub kind: String,
    pub volume: Option<String>,
    /// Whether the operation is a job (it then appears in `job list` after recovery).
    pub job: bool,
    pub started: String,
    pub effects: Vec<Effect>,
}

impl OpenOperation {
    pub fn committed(&self) -> bool {
        self.effects
            .iter()
            .any(|e| matches!(e, Effect::Committed { .. }))
    }
}

/// The journal file in `state_dir`.
#[derive(Debug)]
pub struct Journal {
    db: Database,
    path: PathBuf,
}

impl Journal {
    /// Opens (creating if needed) `state_dir/journal.redb`. A second agent on the same
    /// `state_dir` is refused here: redb locks the file.
    pub fn open(state_dir: &Path) -> Result<Arc<Journal>, JournalError> {
        use std::os::unix::fs::DirBuilderExt;
        let path = state_dir.join("journal.redb");
        let failed = |message: String| JournalError {
            path: path.clone(),
            message,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|e| failed(format!("cannot create the state directory: {e}")))?;
        let db = Database::create(&path).map_err(|e| failed(e.to_string()))?;
        let journal = Journal { db, path };
        journal.write(|txn| {
            txn.open_table(OPEN)?;
            txn.open_table(RECOVERED)?;
            Ok(())
        })?;
        Ok(Arc::new(journal))
    }

    fn error(&self, e: impl std::fmt::Display) -> JournalError {
        JournalError {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Runs `work` in one durable write transaction.
    fn write<T>(
        &self,
        work: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, JournalError> {
        let txn = self.db.begin_write().map_err(|e| self.error(e))?;
        let value = work(&txn).map_err(|e| self.error(e))?;
        txn.commit().map_err(|e| self.error(e))?;
        Ok(value)
    }

    /// Starts recording an operation.
    pub fn begin(
        self: &Arc<Self>,
        id: &str,
        kind: &str,
        volume: Option<String>,
        job: bool,
    ) -> Result<Operation, JournalError> {
        let record = OpenOperation {
            id: id.to_string(),
            kind: kind.to_string(),
            volume,
            job,
            started: crate::jobs::now(),
            effects: Vec::new(),
        };
        self.put_open(&record)?;
        Ok(Operation {
            journal: self.clone(),
            id: id.to_string(),
            unclean: Arc::new(AtomicBool::new(false)),
        })
    }

    fn put_open(&self, record: &OpenOperation) -> Result<(), JournalError> {
        let bytes = serde_json::to_vec(record).map_err(|e| self.error(e))?;
        self.write(|txn| {
            txn.open_table(OPEN)?
                .insert(record.id.as_str(), bytes.as_slice())?;
            Ok(())
        })
    }

    fn append(&self, id: &str, effect: Effect) -> Result<(), JournalError> {
        let bytes = self.write(|txn| {
            let mut table = txn.open_table(OPEN)?;
            let current = table.get(id)?.map(|v| v.value().to_vec());
            let Some(current) = current else {
                return Ok(None);
            };
            let mut record: OpenOperation = match serde_json::from_slice(&current) {
                Ok(record) => record,
                Err(e) => return Err(redb::Error::Corrupted(e.to_string())),
            };
            if record.effects.contains(&effect) {
                return Ok(Some(()));
            }
            record.effects.push(effect.clone());
            let bytes =
                serde_json::to_vec(&record).map_err(|e| redb::Error::Corrupted(e.to_string()))?;
            table.insert(id, bytes.as_slice())?;
            Ok(Some(()))
        })?;
        bytes.ok_or_else(|| self.error(format!("operation {id} is not open")))
    }

    fn end(&self, id: &str) -> Result<(), JournalError> {
        self.write(|txn| {
            txn.open_table(OPEN)?.remove(id)?;
            Ok(())
        })
    }

    /// Operations a crash interrupted (all open ones, at start), oldest first.
    pub fn open_operations(&self) -> Result<Vec<OpenOperation>, JournalError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = txn.open_table(OPEN).map_err(|e| self.error(e))?;
        let mut all = Vec::new();
        for entry in table.iter().map_err(|e| self.error(e))? {
            let (_, value) = entry.map_err(|e| self.error(e))?;
            let record: OpenOperation =
                serde_json::from_slice(value.value()).map_err(|e| self.error(e))?;
            all.push(record);
        }
        all.sort_by(|a, b| a.started.cmp(&b.started));
        Ok(all)
    }

    /// Closes an interrupted operation, keeping its outcome if it was a job; one transaction,
    /// so a crash during recovery either keeps the operation open or records the outcome.
    pub fn close_recovered(&self, id: &str, outcome: Option<&Job>) -> Result<(), JournalError> {
        self.save_outcome(Some(id), outcome)
    }

    /// Keeps an interrupted job's outcome while its operation stays open (its clean-up is
    /// still to be retried).
    pub fn record_outcome(&self, outcome: &Job) -> Result<(), JournalError> {
        self.save_outcome(None, Some(outcome))
    }

    fn save_outcome(&self, close: Option<&str>, outcome: Option<&Job>) -> Result<(), JournalError> {
        let bytes = outcome
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| self.error(e))?;
        self.write(|txn| {
            if let Some(id) = close {
                txn.open_table(OPEN)?.remove(id)?;
            }
            if let (Some(bytes), Some(job)) = (&bytes, outcome) {
                let id = job.id.as_str();
                let mut recovered = txn.open_table(RECOVERED)?;
                recovered.insert(id, bytes.as_slice())?;
                let mut jobs = Vec::new();
                for entry in recovered.iter()? {
                    let (key, value) = entry?;
                    let created = serde_json::from_slice::<Job>(value.value())
                        .map(|job| job.created)
                        .unwrap_or_default();
                    jobs.push((created, key.value().to_string()));
                }
                jobs.sort();
                let excess = jobs.len().saturating_sub(RECOVERED_KEPT);
                for (_, key) in jobs.into_iter().take(excess) {
                    recovered.remove(key.as_str())?;
                }
            }
            Ok(())
        })
    }

    /// Outcomes of interrupted jobs, for `job list`.
    pub fn recovered_jobs(&self) -> Result<Vec<Job>, JournalError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = txn.open_table(RECOVERED).map_err(|e| self.error(e))?;
        let mut jobs = Vec::new();
        for entry in table.iter().map_err(|e| self.error(e))? {
            let (_, value) = entry.map_err(|e| self.error(e))?;
            jobs.push(serde_json::from_slice(value.value()).map_err(|e| self.error(e))?);
        }
        Ok(jobs)
    }
}

/// One operation's handle on the journal.
#[derive(Debug, Clone)]
pub struct Operation {
    journal: Arc<Journal>,
    id: String,
    /// Some clean-up step failed: the record must stay so the clean-up is retried.
    unclean: Arc<AtomicBool>,
}

impl Operation {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Records `effect` durably; call it before causing the effect.
    pub fn record(&self, effect: Effect) -> Result<(), JournalError> {
        self.journal.append(&self.id, effect)
    }

    pub fn mark_unclean(&self) {
        self.unclean.store(true, Ordering::Release);
    }

    pub fn is_unclean(&self) -> bool {
        self.unclean.load(Ordering::Acquire)
    }

    /// The operation ended (succeeded or fully undone): nothing to recover.
    pub fn finish(&self) -> Result<(), JournalError> {
        self.journal.end(&self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_operations_survive_reopening_and_finished_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let sr = Uuid::new_v4();
        {
            let journal = Journal::open(dir.path()).unwrap();
            let kept = journal.begin("a", "snapshot", None, true).unwrap();
            kept.record(Effect::SrCreating).unwrap();
            kept.record(Effect::SrCreated { sr }).unwrap();
            kept.record(Effect::SrCreated { sr }).unwrap();
            let done = journal.begin("b", "create", None, false).unwrap();
            done.record(Effect::SrCreating).unwrap();
            done.finish().unwrap();
        }
        let journal = Journal::open(dir.path()).unwrap();
        let open = journal.open_operations().unwrap();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].id, "a");
        assert_eq!(
            open[0].effects,
            vec![Effect::SrCreating, Effect::SrCreated { sr }],
            "effects in order, each once"
        );
        assert!(!open[0].committed());
    }

    #[test]
    fn a_second_agent_on_the_same_state_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Journal::open(dir.path()).unwrap();
        let error = Journal::open(dir.path()).unwrap_err().to_string();
        assert!(error.contains("journal.redb"), "{error}");
    }

    #[test]
    fn recovered_outcomes_are_kept_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        for n in 0..RECOVERED_KEPT + 5 {
            let id = format!("job-{n:04}");
            journal.begin(&id, "import", None, true).unwrap();
            let job = Job {
                id: id.clone(),
                kind: "import".into(),
                volume: None,
                state: crate::jobs::JobState::Failed,
                progress: 0.0,
                message: "interrupted".into(),
                result: None,
                error: None,
                created: format!("2026-01-01T00:00:{n:04}Z"),
                finished: None,
            };
            journal.close_recovered(&id, Some(&job)).unwrap();
        }
        assert!(journal.open_operations().unwrap().is_empty());
        let kept = journal.recovered_jobs().unwrap();
        assert_eq!(kept.len(), RECOVERED_KEPT);
        assert!(
            !kept.iter().any(|j| j.id == "job-0000"),
            "the oldest go first"
        );
    }
}
