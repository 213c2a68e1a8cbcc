//! The PostgreSQL enrollment store (`DATABASE_URL`), shared by every replica: the same rows as
//! SQLite, migrations applied at start in one transaction under an advisory lock (replicas
//! starting together apply them once), and a small connection pool. What only replicas need
//! (heartbeats, leases, snapshots, notifications) is in [`crate::store::postgres_cluster`], and
//! the durable subscriptions deleted enrollments leave to close in
//! [`crate::store::postgres_closes`].

use std::str::FromStr;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::{NoTls, Row};
use uuid::Uuid;

use crate::enrollment::record::{Enrollment, SubscriptionArgs};
use crate::enrollment::settings::DeliverySettings;
use crate::store::postgres_closes;
use crate::store::{EnrollmentStore, StoreError, StoreFuture, StoredEnrollment};

/// Migrations in the order they are applied; the index + 1 is the recorded version.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/postgres/0001_create_replicated_store.sql"),
    include_str!("../../migrations/postgres/0002_create_pending_closes.sql"),
];

/// The advisory lock key migrations are applied under (any constant shared by all replicas).
const MIGRATION_LOCK: i64 = 0x686f_7470_6f74;

/// Connections in the pool: API writes, the lease loop and snapshots; the LISTEN connection
/// is separate.
const POOL_SIZE: usize = 8;

/// How long a call waits for a pooled connection before failing.
const POOL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

const COLUMNS: &str = "id, queue, target_url, subscription_args, created_at, delivery, paused";

/// A cloneable handle to the database.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// The parsed URL, for the LISTEN connection.
    pub(crate) config: tokio_postgres::Config,
    /// `host:port/db`, for logs (no credentials).
    place: String,
}

impl PostgresStore {
    /// Connects, applies pending migrations and proves the database takes writes.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        // The parse error is not shown: it could quote the URL, password included.
        let config = tokio_postgres::Config::from_str(url).map_err(|_| {
            StoreError::Postgres("DATABASE_URL is not a valid PostgreSQL URL".into())
        })?;
        let place = describe_config(&config);
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(POOL_WAIT))
            .build()
            .map_err(|e| StoreError::Postgres(format!("cannot build the pool: {e}")))?;
        let store = Self {
            pool,
            config,
            place,
        };
        store.migrate().await?;
        store.probe_writable().await?;
        Ok(store)
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| {
            StoreError::Postgres(format!("no database connection ({}): {e}", self.place))
        })
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // Held until commit: a second replica waits here, then finds nothing left to apply.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version    BIGINT PRIMARY KEY NOT NULL,
                applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
            )",
        )
        .await?;
        let applied: i64 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                &[],
            )
            .await?
            .get(0);
        for (index, sql) in MIGRATIONS.iter().enumerate() {
            let version = i64::try_from(index + 1).unwrap_or(i64::MAX);
            if version <= applied {
                continue;
            }
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)",
                &[&version],
            )
            .await?;
            tracing::info!(version, "applied PostgreSQL migration");
        }
        tx.commit().await?;
        Ok(())
    }

    async fn select(&self, id: Option<Uuid>) -> Result<Vec<StoredEnrollment>, StoreError> {
        let client = self.client().await?;
        let rows = match id {
            None => {
                client
                    .query(
                        &format!("SELECT {COLUMNS} FROM enrollments ORDER BY created_at, id"),
                        &[],
                    )
                    .await?
            }
            Some(id) => {
                client
                    .query(
                        &format!("SELECT {COLUMNS} FROM enrollments WHERE id = $1"),
                        &[&id.to_string()],
                    )
                    .await?
            }
        };
        Ok(rows.iter().filter_map(read_row).collect())
    }

    async fn write_row(&self, sql: &str, enrollment: Enrollment) -> Result<u64, StoreError> {
        let id = enrollment.id.to_string();
        let to_json = |v: Result<String, serde_json::Error>| {
            v.map_err(|e| StoreError::Corrupt {
                id: id.clone(),
                reason: e.to_string(),
            })
        };
        let args = to_json(serde_json::to_string(&enrollment.subscription_args))?;
        let delivery = to_json(serde_json::to_string(&enrollment.delivery))?;
        let client = self.client().await?;
        Ok(client
            .execute(
                sql,
                &[
                    &id,
                    &enrollment.queue,
                    &enrollment.target_url,
                    &args,
                    &enrollment.created_at,
                    &delivery,
                    &enrollment.paused,
                ],
            )
            .await?)
    }

    async fn insert_row(&self, enrollment: Enrollment) -> Result<(), StoreError> {
        self.write_row(
            &format!("INSERT INTO enrollments ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"),
            enrollment,
        )
        .await
        .map(drop)
    }

    async fn replace_row(&self, enrollment: Enrollment) -> Result<(), StoreError> {
        self.write_row(
            "UPDATE enrollments SET queue = $2, target_url = $3, subscription_args = $4,
                 created_at = $5, delivery = $6, paused = $7
             WHERE id = $1",
            enrollment,
        )
        .await
        .map(drop)
    }

    async fn update_paused(&self, id: Uuid, paused: bool) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE enrollments SET paused = $2 WHERE id = $1 AND paused <> $2",
                &[&id.to_string(), &paused],
            )
            .await?;
        Ok(())
    }

    async fn delete_row(&self, id: Uuid) -> Result<bool, StoreError> {
        let id = id.to_string();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let deleted = tx
            .query_opt(
                "DELETE FROM enrollments WHERE id = $1 RETURNING queue, subscription_args",
                &[&id],
            )
            .await?;
        let Some(row) = deleted else {
            return Ok(false);
        };
        // In the same transaction: no replica may see the enrollment gone and the close not
        // yet recorded, whatever dies in between.
        postgres_closes::record_if_durable(&tx, &id, row.get(0), row.get(1)).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn probe_writable(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO daemon_meta (key, value) VALUES ('write_probe', now()::text)
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                &[],
            )
            .await?;
        Ok(())
    }
}

impl EnrollmentStore for PostgresStore {
    fn describe(&self) -> String {
        format!("PostgreSQL at {}", self.place)
    }
    fn load_stored(&self) -> StoreFuture<'_, Vec<StoredEnrollment>> {
        Box::pin(self.select(None))
    }
    fn load_one(&self, id: Uuid) -> StoreFuture<'_, Option<StoredEnrollment>> {
        Box::pin(async move { Ok(self.select(Some(id)).await?.into_iter().next()) })
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
    fn subscription_closed(&self, id: Uuid) -> StoreFuture<'_, ()> {
        Box::pin(self.close_done(id))
    }
    fn close_failed(&self, id: Uuid, error: String) -> StoreFuture<'_, ()> {
        Box::pin(async move { self.record_close_failure(id, &error).await })
    }
    fn check_writable(&self) -> StoreFuture<'_, ()> {
        Box::pin(self.probe_writable())
    }
}

/// `host:port/db` of a parsed URL: never the user's password.
fn describe_config(config: &tokio_postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config.get_dbname().unwrap_or("(default)");
    format!("{host}:{port}/{db}")
}

/// One row as an enrollment; unreadable settings mark it (as SQLite does), an id that is not a
/// UUID skips it (logged).
fn read_row(row: &Row) -> Option<StoredEnrollment> {
    let raw_id: String = row.get(0);
    let id = match Uuid::parse_str(&raw_id) {
        Ok(id) => id,
        Err(e) => {
            tracing::error!(id = %raw_id, error = %e, "skipping a stored enrollment whose id is not a UUID");
            return None;
        }
    };
    let mut problems = Vec::new();
    let args: String = row.get(3);
    let subscription_args = SubscriptionArgs::from_stored(&args).unwrap_or_else(|reason| {
        problems.push(format!("`subscription_args`: {reason}"));
        SubscriptionArgs::default()
    });
    let delivery: String = row.get(5);
    let delivery = serde_json::from_str::<DeliverySettings>(&delivery).unwrap_or_else(|e| {
        problems.push(format!("`delivery`: {e}"));
        DeliverySettings::default()
    });
    let unreadable = (!problems.is_empty()).then(|| {
        format!(
            "its stored settings cannot be read ({}); written by a newer hot-potato, or edited by hand? It is not started: run the version that wrote it, or delete and re-create it",
            problems.join("; ")
        )
    });
    Some(StoredEnrollment {
        enrollment: Enrollment {
            id,
            queue: row.get(1),
            target_url: row.get(2),
            subscription_args,
            created_at: row.get(4),
            delivery,
            paused: row.get(6),
        },
        unreadable,
    })
}
