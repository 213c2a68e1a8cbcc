//! The SQLite enrollment store (the embedded default): schema migrations, load at start, and
//! the writes the API commits before it answers. Every call runs on the blocking pool so the
//! async runtime never waits on disk.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OpenFlags, params};
use uuid::Uuid;

use crate::enrollment::record::{Enrollment, SubscriptionArgs};
use crate::store::{EnrollmentStore, StoreError, StoreFuture};

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

    /// Every stored enrollment, oldest first.
    async fn select_all(&self) -> Result<Vec<Enrollment>, StoreError> {
        self.with_conn(|conn| {
            let mut stmt = conn.prepare(
                "SELECT id, queue, target_url, subscription_args, created_at, delivery, paused
                 FROM enrollments ORDER BY created_at, id",
            )?;
            let rows = stmt.query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, String>(3)?,
                    row.get::<_, String>(4)?,
                    row.get::<_, String>(5)?,
                    row.get::<_, bool>(6)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, queue, target_url, args, created_at, delivery, paused) = row?;
                let parsed_id = Uuid::parse_str(&id).map_err(|e| StoreError::Corrupt {
                    id: id.clone(),
                    reason: e.to_string(),
                })?;
                let subscription_args: SubscriptionArgs =
                    serde_json::from_str(&args).map_err(|e| StoreError::Corrupt {
                        id: id.clone(),
                        reason: e.to_string(),
                    })?;
                let delivery =
                    serde_json::from_str(&delivery).map_err(|e| StoreError::Corrupt {
                        id: id.clone(),
                        reason: e.to_string(),
                    })?;
                out.push(Enrollment {
                    id: parsed_id,
                    queue,
                    target_url,
                    subscription_args,
                    created_at,
                    delivery,
                    paused,
                });
            }
            Ok(out)
        })
        .await
    }

    /// Commits a new enrollment.
    async fn insert_row(&self, enrollment: Enrollment) -> Result<(), StoreError> {
        self.with_conn(move |conn| {
            let to_json = |v: Result<String, serde_json::Error>| {
                v.map_err(|e| StoreError::Corrupt {
                    id: enrollment.id.to_string(),
                    reason: e.to_string(),
                })
            };
            let args = to_json(serde_json::to_string(&enrollment.subscription_args))?;
            let delivery = to_json(serde_json::to_string(&enrollment.delivery))?;
            conn.execute(
                "INSERT INTO enrollments
                     (id, queue, target_url, subscription_args, created_at, delivery, paused)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    enrollment.id.to_string(),
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
    fn load_all(&self) -> StoreFuture<'_, Vec<Enrollment>> {
        Box::pin(self.select_all())
    }
    fn insert(&self, enrollment: Enrollment) -> StoreFuture<'_, ()> {
        Box::pin(self.insert_row(enrollment))
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
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
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
