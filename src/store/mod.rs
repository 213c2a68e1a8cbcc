//! Where enrollments are kept: the [`EnrollmentStore`] trait the fleet writes through, and its
//! implementations. SQLite ([`sqlite`]) is the embedded default; [`sealed`] wraps any of them
//! to keep secrets sealed at rest. PostgreSQL ([`postgres`]) is shared by replicas, with what
//! only they need in [`postgres_cluster`] and [`postgres_closes`].

pub mod postgres;
pub mod postgres_closes;
pub mod postgres_cluster;
pub mod sealed;
pub mod sqlite;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use uuid::Uuid;

use crate::enrollment::record::Enrollment;
use crate::seal::SealError;

pub use postgres::PostgresStore;
pub use sealed::SealedStore;
pub use sqlite::SqliteStore;

/// What a store call returns: boxed so the fleet can hold any store as `dyn EnrollmentStore`.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// One stored enrollment as loaded. A row whose settings cannot be read still loads, so that
/// one row never stops the daemon from starting: it carries default settings and the reason,
/// and must be listed as stopped, never run (its defaults are not what was asked for).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEnrollment {
    pub enrollment: Enrollment,
    /// Why the stored `delivery` or `subscription_args` could not be read (written by a newer
    /// version, or edited by hand); `None` for a row read in full.
    pub unreadable: Option<String>,
}

/// The durable home of the enrollment map. Every write is committed before it resolves: the
/// API confirms a change only after its store call returned `Ok`.
pub trait EnrollmentStore: Send + Sync + 'static {
    /// What and where the store is, for logs (no credentials).
    fn describe(&self) -> String;
    /// Every stored enrollment, oldest first, each row on its own: a row whose settings cannot
    /// be read comes back marked [`StoredEnrollment::unreadable`] instead of failing the load.
    fn load_stored(&self) -> StoreFuture<'_, Vec<StoredEnrollment>>;
    /// Every stored enrollment, oldest first; fails with [`StoreError::Corrupt`] on the first
    /// row whose settings cannot be read. For callers that cannot list an unreadable row;
    /// the fleet's start uses [`EnrollmentStore::load_stored`].
    fn load_all(&self) -> StoreFuture<'_, Vec<Enrollment>> {
        let stored = self.load_stored();
        Box::pin(async move {
            stored
                .await?
                .into_iter()
                .map(|row| match row.unreadable {
                    None => Ok(row.enrollment),
                    Some(reason) => Err(StoreError::Corrupt {
                        id: row.enrollment.id.to_string(),
                        reason,
                    }),
                })
                .collect()
        })
    }
    /// One stored enrollment, read as [`EnrollmentStore::load_stored`] reads it; `None` when
    /// it is not stored (replicas reload a row another replica changed).
    fn load_one(&self, id: Uuid) -> StoreFuture<'_, Option<StoredEnrollment>> {
        let stored = self.load_stored();
        Box::pin(async move {
            Ok(stored
                .await?
                .into_iter()
                .find(|row| row.enrollment.id == id))
        })
    }
    /// Commits a new enrollment.
    fn insert(&self, enrollment: Enrollment) -> StoreFuture<'_, ()>;
    /// Rewrites a stored enrollment in full, found by its id (used at start to seal secrets
    /// again with the current key).
    fn replace(&self, enrollment: Enrollment) -> StoreFuture<'_, ()>;
    /// Records whether an enrollment is paused.
    fn set_paused(&self, id: Uuid, paused: bool) -> StoreFuture<'_, ()>;
    /// Deletes an enrollment; `false` when it was not stored. A store shared by replicas also
    /// records, in the same transaction, that a durable subscription is left to close.
    fn delete(&self, id: Uuid) -> StoreFuture<'_, bool>;
    /// The durable subscription of deleted enrollment `id` was closed: nobody need close it
    /// again. Nothing to do for a store that records no pending closes.
    fn subscription_closed(&self, _id: Uuid) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    /// Closing the durable subscription of deleted enrollment `id` failed with `error`: it is
    /// tried again later, by any replica. Nothing to do for a store that records no pending
    /// closes.
    fn close_failed(&self, _id: Uuid, _error: String) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    /// Proves the store still takes writes (readiness).
    fn check_writable(&self) -> StoreFuture<'_, ()>;
}

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot use the SQLite database at {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    #[error("PostgreSQL error: {0}")]
    Pg(#[from] tokio_postgres::Error),
    #[error("SQLite error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored enrollment {id} is unreadable: {reason}")]
    Corrupt { id: String, reason: String },
    #[error("the store's worker thread failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("the store's lock was poisoned by a panic")]
    Poisoned,
    #[error("cannot seal a secret: {0}")]
    Seal(#[from] SealError),
}
