//! The SQLite enrollment store (the embedded default): schema migrations, load at start, and
//! the writes the API commits before it answers. Every call runs on the blocking pool so the
//! async runtime never waits on disk.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OpenFlags, params};
use uuid::Uuid;

use crate::enrollment::record::{Enrollment, SubscriptionArgs};
use crate::enrollment::settings::DeliverySettings;
use crate::store::{EnrollmentStore, StoreError, StoreFuture, StoredEnrollment};

/// Migrations in the order they are applied; the index + 1 is the recorded version.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/0001_create_enrollments.sql"),
    include_str!("../../migrations/0002_add_delivery_settings.sql"),
    include_str!("../../migrations/0003_add_paused.sql"),
    include_str!("../../migrations/0004_create_daemon_meta.sql"),
];

/// A cloneable handle to the database. The std mutex serialises writers (SQLite allows one)
/// and is only taken inside blocking-pool closures, never across an `.await`.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (creating if needed) the database, applies pending migrations and proves the
    /// file is writable, so a bad path fails at start rather than on the first enrollment.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let path = path.to_path_buf();
        let for_thread = path.clone();
        let conn = tokio::task::spawn_blocking(move || {
            open_blocking(&for_thread).map_err(|source| StoreError::Open {
                path: for_thread.clone(),
                source,
            })
        })
        .await??;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn with_conn<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().map_err(|_| StoreError::Poisoned)?;
            f(&mut guard)
        })
        .await?
    }

    /// Every stored enrollment, oldest first; a row whose settings cannot be read comes back
    /// marked (see [`StoredEnrollment`]) rather than failing the load.
    async fn select_all(&self) -> Result<Vec<StoredEnrollment>, StoreError> {
        self.with_conn(|conn| {
            let mut stmt = conn.prepare(
                "SELECT id, queue, target_url, subscription_args, created_at, delivery, paused
                 FROM enrollments ORDER BY created_at, id",
            )?;
            let rows = stmt.query_map([], |row| {
                Ok(StoredRow {
                    id: row.get(0)?,
                    queue: row.get(1)?,
                    target_url: row.get(2)?,
                    subscription_args: row.get(3)?,
                    created_at: row.get(4)?,
                    delivery: row.get(5)?,
                    paused: row.get(6)?,
                })
            })?;
            let mut out = Vec::new();
            for row in rows {
                if let Some(stored) = row?.read() {
                    out.push(stored);
                }
            }
            Ok(out)
        })
        .await
    }

    /// Commits a new enrollment.
    async fn insert_row(&self, enrollment: Enrollment) -> Result<(), StoreError> {
        self.write_row(
            "INSERT INTO enrollments
                 (id, queue, target_url, subscription_args, created_at, delivery, paused)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            enrollment,
        )
        .await
    }

    /// Rewrites a stored enrollment's columns, found by its id.
    async fn replace_row(&self, enrollment: Enrollment) -> Result<(), StoreError> {
        self.write_row(
            "UPDATE enrollments SET queue = ?2, target_url = ?3, subscription_args = ?4,
                 created_at = ?5, delivery = ?6, paused = ?7
             WHERE id = ?1",
            enrollment,
        )
        .await
    }

    /// Runs `sql` with the enrollment's columns as ?1..?7 (id, queue, target_url,
    /// subscription_args, created_at, delivery, paused).
    async fn write_row(&self, sql: &'static str, enrollment: Enrollment) -> Result<(), StoreError> {
        self.with_conn(move |conn| {
            let id = enrollment.id.to_string();
            let to_json = |v: Result<String, serde_json::Error>| {
                v.map_err(|e| StoreError::Corrupt {
                    id: id.clone(),
                    reason: e.to_string(),
                })
            };
            let args = to_json(serde_json::to_string(&enrollment.subscription_args))?;
            let delivery = to_json(serde_json::to_string(&enrollment.delivery))?;
            conn.execute(
                sql,
                params![
                    id,
                    enrollment.queue,
                    enrollment.target_url,
                    args,
                    enrollment.created_at,
                    delivery,
                    enrollment.paused
                ],
            )?;
            Ok(())
        })
        .await
    }

    /// Records whether an enrollment is paused.
    async fn update_paused(&self, id: Uuid, paused: bool) -> Result<(), StoreError> {
        self.with_conn(move |conn| {
            conn.execute(
                "UPDATE enrollments SET paused = ?2 WHERE id = ?1",
                params![id.to_string(), paused],
            )?;
            Ok(())
        })
        .await
    }

    /// Deletes an enrollment; `false` when it was not stored.
    async fn delete_row(&self, id: Uuid) -> Result<bool, StoreError> {
        self.with_conn(move |conn| {
            let n = conn.execute(
                "DELETE FROM enrollments WHERE id = ?1",
                params![id.to_string()],
            )?;
            Ok(n > 0)
        })
        .await
    }

    /// Proves the database still takes writes (used by readiness checks and tests).
    async fn probe_writable(&self) -> Result<(), StoreError> {
        self.with_conn(|conn| Ok(probe_write(conn)?)).await
    }
}

impl EnrollmentStore for SqliteStore {
    fn describe(&self) -> String {
        format!("SQLite at {}", self.path.display())
    }
    fn load_stored(&self) -> StoreFuture<'_, Vec<StoredEnrollment>> {
        Box::pin(self.select_all())
    }
    fn insert(&self, enrollment: Enrollment) -> StoreFuture<'_, ()> {
        Box::pin(self.insert_row(enrollment))
    }
    fn replace(&self, enrollment: Enrollment) -> StoreFuture<'_, ()> {
        Box::pin(self.replace_row(enrollment))
    }
    fn set_paused(&self, id: Uuid, paused: bool) -> StoreFuture<'_, ()> {
        Box::pin(self.update_paused(id, paused))
    }
    fn delete(&self, id: Uuid) -> StoreFuture<'_, bool> {
        Box::pin(self.delete_row(id))
    }
    fn check_writable(&self) -> StoreFuture<'_, ()> {
        Box::pin(self.probe_writable())
    }
}

/// One `enrollments` row as SQLite holds it, before its JSON columns are read.
struct StoredRow {
    id: String,
    queue: String,
    target_url: String,
    subscription_args: String,
    created_at: String,
    delivery: String,
    paused: bool,
}

impl StoredRow {
    /// The enrollment, with default settings and the reason when its JSON cannot be read.
    /// `None` (logged) only for an id that is not a UUID: such a row could not be addressed
    /// through the API, so listing it would offer nothing to act on.
    fn read(self) -> Option<StoredEnrollment> {
        let id = match Uuid::parse_str(&self.id) {
            Ok(id) => id,
            Err(e) => {
                tracing::error!(id = %self.id, error = %e, "skipping a stored enrollment whose id is not a UUID");
                return None;
            }
        };
        let mut problems = Vec::new();
        let subscription_args = SubscriptionArgs::from_stored(&self.subscription_args)
            .unwrap_or_else(|reason| {
                problems.push(format!("`subscription_args`: {reason}"));
                SubscriptionArgs::default()
            });
        // `DeliverySettings` refuses unknown fields, as the API does on input.
        let delivery =
            serde_json::from_str::<DeliverySettings>(&self.delivery).unwrap_or_else(|e| {
                problems.push(format!("`delivery`: {e}"));
                DeliverySettings::default()
            });
        let unreadable = (!problems.is_empty()).then(|| {
            format!(
                "its stored settings cannot be read ({}); written by a newer hot-potato, or edited by hand? It is not started: run the version that wrote it, or delete and re-create it",
                problems.join("; ")
            )
        });
        if let Some(reason) = &unreadable {
            tracing::warn!(enrollment_id = %id, reason = %reason, "stored enrollment unreadable");
        }
        Some(StoredEnrollment {
            enrollment: Enrollment {
                id,
                queue: self.queue,
                target_url: self.target_url,
                subscription_args,
                created_at: self.created_at,
                delivery,
                paused: self.paused,
            },
            unreadable,
        })
    }
}

fn open_blocking(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // Reading the header here turns "file is not a database" into an error at start.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: in WAL mode NORMAL may lose the last commits on power loss, and the API has already
    // confirmed them. Writes are rare (API changes), so the fsync per commit costs nothing.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // A secret rewritten sealed (or a deleted enrollment's) must not linger in free pages.
    conn.pragma_update(None, "secure_delete", "ON")?;
    migrate(&conn)?;
    probe_write(&conn)?;
    Ok(conn)
}

fn migrate(conn: &Connection) -> Result<(), rusqlite::Error> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version    INTEGER PRIMARY KEY NOT NULL,
            applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
        )",
    )?;
    let applied: i64 = conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )?;
    for (index, sql) in MIGRATIONS.iter().enumerate() {
        let version = i64::try_from(index + 1).unwrap_or(i64::MAX);
        if version <= applied {
            continue;
        }
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES (?1)",
            params![version],
        )?;
        tx.commit()?;
        tracing::info!(version, "applied database migration");
    }
    Ok(())
}

/// A committed one-row write: a rolled-back write never reaches the file, so only a commit
/// proves the database (file and WAL) still takes writes.
fn probe_write(conn: &Connection) -> Result<(), rusqlite::Error> {
    conn.execute(
        "INSERT OR REPLACE INTO daemon_meta (key, value)
         VALUES ('write_probe', strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
        [],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(queue: &str) -> Enrollment {
        Enrollment {
            id: Uuid::new_v4(),
            queue: queue.into(),
            target_url: "http://127.0.0.1:1/x".into(),
            subscription_args: SubscriptionArgs {
                durable: Some(true),
                ..Default::default()
            },
            created_at: "2026-01-01T00:00:00Z".into(),
            delivery: crate::enrollment::settings::DeliverySettings {
                max_in_flight: Some(4),
                ..Default::default()
            },
            paused: false,
        }
    }

    #[tokio::test]
    async fn enrollments_survive_reopening_and_migrations_run_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sqlite");
        let store = SqliteStore::open(&path).await.expect("open");
        let a = sample("a");
        store.insert(a.clone()).await.expect("insert");
        store.insert(sample("b")).await.expect("insert");
        drop(store);
        let store = SqliteStore::open(&path).await.expect("reopen");
        let all = store.load_all().await.expect("load");
        assert_eq!(all.len(), 2);
        assert!(all.contains(&a));
        assert!(store.delete(a.id).await.expect("delete"));
        assert!(!store.delete(a.id).await.expect("delete again"));
        assert_eq!(store.load_all().await.expect("load").len(), 1);
    }

    #[tokio::test]
    async fn commits_are_synced_in_full() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("s.sqlite"))
            .await
            .expect("open");
        let (journal, synchronous) = store
            .with_conn(|conn| {
                let journal: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
                let synchronous: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
                Ok((journal, synchronous))
            })
            .await
            .expect("pragmas");
        assert_eq!(journal, "wal");
        assert_eq!(synchronous, 2, "2 is FULL (1 NORMAL, 0 OFF, 3 EXTRA)");
    }

    #[tokio::test]
    async fn an_unreadable_row_loads_marked_and_the_others_load_as_stored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sqlite");
        let store = SqliteStore::open(&path).await.expect("open");
        let (a, b, c) = (sample("a"), sample("b"), sample("c"));
        for e in [&a, &b, &c] {
            store.insert(e.clone()).await.expect("insert");
        }
        drop(store);
        // What a newer version (or a hand edit) could leave behind.
        let raw = Connection::open(&path).expect("raw connection");
        raw.execute(
            "UPDATE enrollments SET delivery = '{\"colour\": 1}' WHERE id = ?1",
            params![b.id.to_string()],
        )
        .expect("update delivery");
        raw.execute(
            "UPDATE enrollments SET subscription_args = '{\"shared\": true}' WHERE id = ?1",
            params![c.id.to_string()],
        )
        .expect("update subscription_args");
        drop(raw);

        let store = SqliteStore::open(&path).await.expect("reopen");
        let loaded = store
            .load_stored()
            .await
            .expect("one row does not fail the load");
        assert_eq!(loaded.len(), 3);
        let row = |id: Uuid| {
            loaded
                .iter()
                .find(|s| s.enrollment.id == id)
                .expect("every row comes back")
        };
        assert_eq!(row(a.id).unreadable, None);
        assert_eq!(row(a.id).enrollment, a);

        let marked = row(b.id);
        let reason = marked.unreadable.as_deref().expect("marked");
        assert!(
            reason.contains("`delivery`") && reason.contains("colour"),
            "{reason}"
        );
        assert_eq!(marked.enrollment.delivery, DeliverySettings::default());
        // What can be read still is: the listing shows the right queue and target.
        assert_eq!(marked.enrollment.queue, b.queue);
        assert_eq!(marked.enrollment.subscription_args, b.subscription_args);

        let reason = row(c.id).unreadable.as_deref().expect("marked");
        assert!(
            reason.contains("`subscription_args`") && reason.contains("shared"),
            "{reason}"
        );
        assert_eq!(row(c.id).enrollment.delivery, c.delivery);

        // The strict reading still refuses, naming the first unreadable row (ids order them).
        let strict = store.load_all().await.expect_err("strict load refuses");
        assert!(matches!(strict, StoreError::Corrupt { .. }), "{strict}");
        let first_unreadable = b.id.min(c.id).to_string();
        assert!(strict.to_string().contains(&first_unreadable), "{strict}");
    }

    #[tokio::test]
    async fn the_same_queue_and_target_cannot_be_stored_twice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("s.sqlite"))
            .await
            .expect("open");
        store.insert(sample("a")).await.expect("insert");
        assert!(store.insert(sample("a")).await.is_err());
    }

    #[tokio::test]
    async fn bad_paths_fail_with_the_path_in_the_message() {
        let dir = tempfile::tempdir().expect("tempdir");
        let garbage = dir.path().join("garbage.sqlite");
        std::fs::write(&garbage, vec![b'x'; 4096]).expect("write");
        let missing_dir = dir.path().join("no/such/dir/s.sqlite");
        for path in [garbage, missing_dir, dir.path().to_path_buf()] {
            let err = SqliteStore::open(&path)
                .await
                .err()
                .expect("must fail")
                .to_string();
            assert!(err.contains(&path.display().to_string()), "{err}");
        }
    }
}
