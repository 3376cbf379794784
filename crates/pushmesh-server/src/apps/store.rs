//! The admin API's apps on disk, in `data_dir`: a snapshot, `apps.json`
//! (every record, tombstones included), and a journal, `apps.log` (one
//! JSON record per line, appended and flushed to the disk for each change:
//! a change costs one small write, not a rewrite of every app).
//!
//! Loading reads the snapshot, then the journal over it (records merge by
//! last writer, so a record read twice changes nothing). When the journal
//! holds as many lines as the snapshot has records (and at least
//! [`COMPACT_AFTER`]), the snapshot is replaced whole and atomically
//! (written to `apps.json.tmp`, flushed, renamed over the old one, the
//! directory flushed) and the journal emptied. A kill at any point leaves
//! a consistent store: a stray `.tmp` is ignored, a journal line cut by a
//! kill is the last one and is dropped on load (it was never answered),
//! and a journal not yet emptied after a compaction is read again
//! harmlessly. Both files hold the apps' secrets: they are created
//! readable by their owner only.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pushmesh_core::app_registry::AppRecord;
use serde::{Deserialize, Serialize};

/// Why the store cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// Which file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not a store of this version.
    #[error("{path}: not a pushmesh apps store: {source}")]
    Format {
        /// Which file.
        path: PathBuf,
        /// What is wrong.
        source: serde_json::Error,
    },
}

#[derive(Serialize, Deserialize)]
struct File {
    version: u32,
    records: Vec<AppRecord>,
}

/// Journal lines before a compaction is considered.
pub const COMPACT_AFTER: usize = 1024;

/// `<data_dir>/apps.json` and `<data_dir>/apps.log`.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    /// Lines in the journal (shared by clones; writes are one at a time).
    journal_lines: Arc<AtomicUsize>,
    /// Records in the snapshot.
    snapshot_records: Arc<AtomicUsize>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io { path, source }
}

fn owner_only() -> std::fs::OpenOptions {
    let mut opts = std::fs::OpenOptions::new();
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts
}

impl Store {
    /// The store in `dir` (created if missing).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        Ok(Self {
            dir: dir.to_owned(),
            journal_lines: Arc::new(AtomicUsize::new(0)),
            snapshot_records: Arc::new(AtomicUsize::new(0)),
        })
    }

    fn path(&self) -> PathBuf {
        self.dir.join("apps.json")
    }

    fn journal(&self) -> PathBuf {
        self.dir.join("apps.log")
    }

    fn sync_dir(&self) -> Result<(), StoreError> {
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))
    }

    /// Every record saved (the snapshot's, then the journal's); none when
    /// nothing was saved yet. A journal line cut short by a kill (the last
    /// one, unanswered) is dropped and cut off the file, so the next
    /// append starts on a line of its own.
    pub fn load(&self) -> Result<Vec<AppRecord>, StoreError> {
        let path = self.path();
        let mut records = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice::<File>(&b)
                .map(|f| f.records)
                .map_err(|source| StoreError::Format { path, source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        self.snapshot_records
            .store(records.len(), Ordering::Relaxed);
        let journal = self.journal();
        let body = match std::fs::read(&journal) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(StoreError::Io {
                    path: journal,
                    source,
                })
            }
        };
        let complete = body.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let mut lines = 0;
        for line in body[..complete]
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
        {
            let r =
                serde_json::from_slice::<AppRecord>(line).map_err(|source| StoreError::Format {
                    path: journal.clone(),
                    source,
                })?;
            records.push(r);
            lines += 1;
        }
        if complete < body.len() {
            tracing::warn!(file = %journal.display(), bytes = body.len() - complete, "apps journal: a cut last line (an unanswered write) dropped");
            let f = owner_only()
                .write(true)
                .open(&journal)
                .map_err(io(&journal))?;
            f.set_len(complete as u64).map_err(io(&journal))?;
            f.sync_all().map_err(io(&journal))?;
        }
        self.journal_lines.store(lines, Ordering::Relaxed);
        Ok(records)
    }

    /// Whether appending `n` lines makes the journal as long as the
    /// snapshot (and at least [`COMPACT_AFTER`] lines): then
    /// [`Store::append`] is given every record, to compact. The snapshot
    /// at least doubles at each compaction, so a write costs O(1)
    /// amortized.
    pub fn compacts_after(&self, n: usize) -> bool {
        let lines = self.journal_lines.load(Ordering::Relaxed) + n;
        lines >= COMPACT_AFTER.max(self.snapshot_records.load(Ordering::Relaxed))
    }

    /// Appends `changed` to the journal, durably; then, given `all` the
    /// records (see [`Store::compacts_after`]), compacts.
    pub fn append(
        &self,
        changed: &[AppRecord],
        all: Option<Vec<AppRecord>>,
    ) -> Result<(), StoreError> {
        let journal = self.journal();
        let mut body = Vec::new();
        for r in changed {
            serde_json::to_writer(&mut body, r).map_err(|source| StoreError::Format {
                path: journal.clone(),
                source,
            })?;
            body.push(b'\n');
        }
        let created = !journal.exists();
        let mut f = owner_only()
            .append(true)
            .create(true)
            .open(&journal)
            .map_err(io(&journal))?;
        f.write_all(&body).map_err(io(&journal))?;
        f.sync_data().map_err(io(&journal))?;
        if created {
            self.sync_dir()?;
        }
        self.journal_lines
            .fetch_add(changed.len(), Ordering::Relaxed);
        match all {
            Some(all) => self.save(all),
            None => Ok(()),
        }
    }

    /// Replaces the snapshot with `records`, durably, and empties the
    /// journal (see the module docs).
    pub fn save(&self, records: Vec<AppRecord>) -> Result<(), StoreError> {
        let path = self.path();
        let tmp = self.dir.join("apps.json.tmp");
        let count = records.len();
        let body = serde_json::to_vec(&File {
            version: 1,
            records,
        })
        .map_err(|source| StoreError::Format {
            path: path.clone(),
            source,
        })?;
        let mut f = owner_only()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(&body).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        self.sync_dir()?;
        // Only now: a kill before this point reads the journal again over
        // the new snapshot, which changes nothing.
        let journal = self.journal();
        match owner_only().write(true).open(&journal) {
            Ok(j) => {
                j.set_len(0).map_err(io(&journal))?;
                j.sync_all().map_err(io(&journal))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&journal)(e)),
        }
        self.journal_lines.store(0, Ordering::Relaxed);
        self.snapshot_records.store(count, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pushmesh_core::app_registry::{AdminApp, Hlc};

    fn record(id: &str) -> AppRecord {
        AppRecord {
            id: id.into(),
            stamp: Hlc { ms: 7, count: 1 },
            node: "n1".into(),
            app: Some(AdminApp {
                key: format!("{id}-key"),
                secret: "s".repeat(32),
                previous_secret: Some(("old".into(), 9)),
                settings: "{}".into(),
            }),
        }
    }

    #[test]
    fn saves_replace_the_file_and_a_stray_tmp_is_ignored() {
        let dir = std::env::temp_dir().join(format!("pushmesh-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = Store::open(&dir).expect("open");
        assert!(s.load().expect("empty").is_empty());
        s.save(vec![record("a")]).expect("save");
        s.save(vec![record("a"), record("b")]).expect("save");
        // A kill between writing the tmp file and the rename leaves it behind.
        std::fs::write(dir.join("apps.json.tmp"), b"{\"version\":1,\"rec").expect("tmp");
        let back = s.load().expect("load");
        assert_eq!(back, vec![record("a"), record("b")]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("apps.json"))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "secrets: owner only");
        }
        std::fs::write(dir.join("apps.json"), b"not json").expect("corrupt");
        assert!(matches!(s.load(), Err(StoreError::Format { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn fresh(name: &str) -> (PathBuf, Store) {
        let dir =
            std::env::temp_dir().join(format!("pushmesh-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = Store::open(&dir).expect("open");
        (dir, s)
    }

    #[test]
    fn appends_go_to_the_journal_and_a_cut_last_line_is_dropped_and_cut_off() {
        let (dir, s) = fresh("journal");
        s.save(vec![record("a")]).expect("snapshot");
        assert!(!s.compacts_after(2));
        s.append(&[record("b")], None).expect("append");
        s.append(&[record("c")], None).expect("append");
        // A kill in the middle of the next append.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("apps.log"))
            .expect("log");
        f.write_all(b"{\"id\":\"d\",\"sta").expect("cut");
        drop(f);
        let s = Store::open(&dir).expect("reopen");
        let ids: Vec<String> = s.load().expect("load").into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        // The cut line is gone: the next append is a line of its own.
        s.append(&[record("e")], None).expect("append");
        let ids: Vec<String> = s.load().expect("load").into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["a", "b", "c", "e"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("apps.log"))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "secrets: owner only");
        }
        // A broken line that is not the last is an error, not a silent loss.
        std::fs::write(dir.join("apps.log"), b"garbage\n{}\n").expect("corrupt");
        assert!(matches!(s.load(), Err(StoreError::Format { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_journal_is_compacted_into_the_snapshot_once_it_outgrows_it() {
        let (dir, s) = fresh("compact");
        let all: Vec<AppRecord> = (0..COMPACT_AFTER)
            .map(|k| record(&format!("x{k}")))
            .collect();
        for (k, r) in all.iter().enumerate() {
            let due = s.compacts_after(1);
            assert_eq!(
                due,
                k + 1 == COMPACT_AFTER,
                "compacted only at {COMPACT_AFTER} lines"
            );
            s.append(std::slice::from_ref(r), due.then(|| all[..=k].to_vec()))
                .expect("append");
        }
        assert_eq!(
            std::fs::metadata(dir.join("apps.log")).expect("log").len(),
            0
        );
        assert_eq!(s.load().expect("load"), all);
        // The next compaction waits for as many lines as the snapshot holds.
        assert!(!s.compacts_after(COMPACT_AFTER - 1));
        assert!(s.compacts_after(COMPACT_AFTER));
        // A kill after the rename but before the journal was emptied: the
        // journal is read again over the snapshot, same records.
        let line = serde_json::to_string(&all[3]).expect("json");
        std::fs::write(dir.join("apps.log"), format!("{line}\n")).expect("log");
        let back = s.load().expect("load");
        assert_eq!(back.len(), all.len() + 1);
        let mut reg = pushmesh_core::app_registry::AppRegistry::new("n1");
        reg.merge(back);
        assert_eq!(reg.records().count(), all.len());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
