//! The admin API's apps on disk: `<data_dir>/apps.json`, every record
//! (tombstones included), replaced whole and atomically on each change:
//! written to `apps.json.tmp`, flushed to the disk, renamed over the old
//! file, and the directory flushed. A kill at any point leaves either the
//! old file or the new one, never a mix (a stray `.tmp` is ignored). The
//! file holds the apps' secrets: it is created readable by its owner only.

use std::io::Write;
use std::path::{Path, PathBuf};

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

/// `<data_dir>/apps.json`.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// The store in `dir` (created if missing).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_owned(),
            source,
        })?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn path(&self) -> PathBuf {
        self.dir.join("apps.json")
    }

    /// Every record saved; none when the file does not exist yet.
    pub fn load(&self) -> Result<Vec<AppRecord>, StoreError> {
        let path = self.path();
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice::<File>(&b)
                .map(|f| f.records)
                .map_err(|source| StoreError::Format { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    /// Replaces the file with `records`, durably (see the module docs).
    pub fn save(&self, records: Vec<AppRecord>) -> Result<(), StoreError> {
        let path = self.path();
        let tmp = self.dir.join("apps.json.tmp");
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Io { path, source }
        };
        let body = serde_json::to_vec(&File {
            version: 1,
            records,
        })
        .map_err(|source| StoreError::Format {
            path: path.clone(),
            source,
        })?;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp).map_err(io(&tmp))?;
        f.write_all(&body).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
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
}
