//! Secrets at rest for any store: [`SealedStore`] wraps an [`EnrollmentStore`] and seals an
//! enrollment's secrets (target credentials, the signing secret, a password in `target_url`)
//! before they are written, and opens them after they are read. At start it rewrites rows
//! still in clear or sealed with `SECRETS_KEY_PREVIOUS`, so that a rotation completes in one
//! start. A row that no key opens loads marked unreadable, naming the key, never the secret.

use url::Url;
use uuid::Uuid;

use crate::enrollment::record::Enrollment;
use crate::enrollment::settings::{Auth, Signing};
use crate::seal::{Keyring, SealError, is_sealed};
use crate::store::{EnrollmentStore, StoreError, StoreFuture, StoredEnrollment};

/// The associated-data name of a password carried in `target_url`.
const TARGET_URL: &str = "target_url";

/// A store whose secret fields are sealed with the keyring's current key.
pub struct SealedStore<S> {
    inner: S,
    keys: Keyring,
}

impl<S: EnrollmentStore> SealedStore<S> {
    /// Wraps `inner` and rewrites every readable row whose secrets are not sealed with the
    /// current key (none without one). Warns once when there is no key to seal with.
    pub async fn start(inner: S, keys: Keyring) -> Result<Self, StoreError> {
        if keys.current.is_none() {
            tracing::warn!(
                "SECRETS_KEY is not set: target credentials and signing secrets are stored in clear in the database; set it to seal them (see README, Secrets at rest)"
            );
        }
        let store = Self { inner, keys };
        let rewritten = store.reseal_stale().await?;
        if rewritten > 0 {
            tracing::info!(count = rewritten, "sealed stored secrets with SECRETS_KEY");
        }
        Ok(store)
    }

    async fn reseal_stale(&self) -> Result<usize, StoreError> {
        if self.keys.current.is_none() {
            return Ok(0);
        }
        let mut rewritten = 0;
        for row in self.inner.load_stored().await? {
            if row.unreadable.is_some() {
                continue;
            }
            let mut enrollment = row.enrollment;
            let Ok(stale) = open_secrets(&self.keys, &mut enrollment) else {
                // Left as stored; the load that follows marks it unreadable with the reason.
                continue;
            };
            if stale {
                seal_secrets(&self.keys, &mut enrollment)?;
                self.inner.replace(enrollment).await?;
                rewritten += 1;
            }
        }
        Ok(rewritten)
    }

    async fn load_opened(&self) -> Result<Vec<StoredEnrollment>, StoreError> {
        let mut rows = self.inner.load_stored().await?;
        for row in &mut rows {
            let Err(problems) = open_secrets(&self.keys, &mut row.enrollment) else {
                continue;
            };
            let reason = format!(
                "its secrets cannot be opened ({}). It is not started: start with the key that sealed it, or delete and re-create it",
                problems.join("; ")
            );
            tracing::warn!(enrollment_id = %row.enrollment.id, reason = %reason, "stored enrollment unreadable");
            row.unreadable = Some(match row.unreadable.take() {
                Some(earlier) => format!("{earlier}; {reason}"),
                None => reason,
            });
        }
        Ok(rows)
    }

    async fn load_one_opened(&self, id: Uuid) -> Result<Option<StoredEnrollment>, StoreError> {
        let Some(mut row) = self.inner.load_one(id).await? else {
            return Ok(None);
        };
        if let Err(problems) = open_secrets(&self.keys, &mut row.enrollment) {
            let reason = format!(
                "its secrets cannot be opened ({}). It is not started: start with the key that sealed it, or delete and re-create it",
                problems.join("; ")
            );
            row.unreadable = Some(match row.unreadable.take() {
                Some(earlier) => format!("{earlier}; {reason}"),
                None => reason,
            });
        }
        Ok(Some(row))
    }

    async fn insert_sealed(&self, mut enrollment: Enrollment) -> Result<(), StoreError> {
        seal_secrets(&self.keys, &mut enrollment)?;
        self.inner.insert(enrollment).await
    }

    async fn replace_sealed(&self, mut enrollment: Enrollment) -> Result<(), StoreError> {
        seal_secrets(&self.keys, &mut enrollment)?;
        self.inner.replace(enrollment).await
    }
}

impl<S: EnrollmentStore> EnrollmentStore for SealedStore<S> {
    fn describe(&self) -> String {
        match &self.keys.current {
            Some(key) => format!(
                "{}, secrets sealed with key {}",
                self.inner.describe(),
                key.id()
            ),
            None => format!("{}, secrets in clear", self.inner.describe()),
        }
    }
    fn load_stored(&self) -> StoreFuture<'_, Vec<StoredEnrollment>> {
        Box::pin(self.load_opened())
    }
    fn load_one(&self, id: Uuid) -> StoreFuture<'_, Option<StoredEnrollment>> {
        Box::pin(self.load_one_opened(id))
    }
    fn insert(&self, enrollment: Enrollment) -> StoreFuture<'_, ()> {
        Box::pin(self.insert_sealed(enrollment))
    }
    fn replace(&self, enrollment: Enrollment) -> StoreFuture<'_, ()> {
        Box::pin(self.replace_sealed(enrollment))
    }
    fn set_paused(&self, id: Uuid, paused: bool) -> StoreFuture<'_, ()> {
        self.inner.set_paused(id, paused)
    }
    fn delete(&self, id: Uuid) -> StoreFuture<'_, bool> {
        self.inner.delete(id)
    }
    fn subscription_closed(&self, id: Uuid) -> StoreFuture<'_, ()> {
        self.inner.subscription_closed(id)
    }
    fn close_failed(&self, id: Uuid, error: String) -> StoreFuture<'_, ()> {
        self.inner.close_failed(id, error)
    }
    fn check_writable(&self) -> StoreFuture<'_, ()> {
        self.inner.check_writable()
    }
}

/// Calls `f` with the name and value of every secret in the `delivery` settings.
fn each_delivery_secret<E>(
    enrollment: &mut Enrollment,
    mut f: impl FnMut(&'static str, &mut String) -> Result<(), E>,
) -> Result<(), E> {
    match &mut enrollment.delivery.auth {
        Some(Auth::Bearer { token }) => f("delivery.auth.token", token)?,
        Some(Auth::Basic { password, .. }) => f("delivery.auth.password", password)?,
        Some(Auth::Header { value, .. }) => f("delivery.auth.value", value)?,
        None => {}
    }
    if let Some(Signing { secret }) = &mut enrollment.delivery.signing {
        f("delivery.signing.secret", secret)?;
    }
    Ok(())
}

/// The associated data that binds a value to its enrollment and field.
fn place(id: Uuid, field: &str) -> String {
    format!("hot-potato:{id}:{field}")
}

/// Seals every secret in place with the current key (nothing without one). A password in
/// `target_url` is sealed together with the whole URL text, and the sealed form takes the
/// password's place: the URL still parses, shows its host, and opens to the exact text given.
fn seal_secrets(keys: &Keyring, enrollment: &mut Enrollment) -> Result<(), SealError> {
    if keys.current.is_none() {
        return Ok(());
    }
    let id = enrollment.id;
    each_delivery_secret(enrollment, |field, value| {
        *value = keys.seal(value, &place(id, field))?;
        Ok(())
    })?;
    if let Ok(mut url) = Url::parse(&enrollment.target_url)
        && url.password().is_some()
    {
        let sealed = keys.seal(&enrollment.target_url, &place(id, TARGET_URL))?;
        // Only fails for URLs that cannot carry a password; this one has one.
        if url.set_password(Some(&sealed)).is_ok() {
            enrollment.target_url = url.to_string();
        }
    }
    Ok(())
}

/// Opens every secret in place. `Ok(stale)`: all opened, and `stale` says whether any was
/// in clear or sealed with the previous key. `Err`: one line per field that did not open
/// (those fields are left sealed).
fn open_secrets(keys: &Keyring, enrollment: &mut Enrollment) -> Result<bool, Vec<String>> {
    let id = enrollment.id;
    let mut stale = false;
    let mut problems = Vec::new();
    let mut open = |field: &str, stored: &str| match keys.open(stored, &place(id, field)) {
        Ok(opened) => {
            stale |= opened.is_stale();
            Some(opened)
        }
        Err(e) => {
            problems.push(format!("`{field}` {e}"));
            None
        }
    };
    let _ = each_delivery_secret(enrollment, |field, value| {
        if let Some(opened) = open(field, value) {
            *value = opened.value().to_string();
        }
        Ok::<(), ()>(())
    });
    let url_password = Url::parse(&enrollment.target_url)
        .ok()
        .and_then(|url| url.password().map(str::to_string));
    if let Some(password) = url_password {
        if is_sealed(&password) {
            if let Some(opened) = open(TARGET_URL, &password) {
                enrollment.target_url = opened.value().to_string();
            }
        } else {
            // A password written in clear before a key was set.
            stale = true;
        }
    }
    if problems.is_empty() {
        Ok(stale)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enrollment::record::SubscriptionArgs;
    use crate::enrollment::settings::DeliverySettings;
    use crate::seal::SecretKey;
    use crate::store::SqliteStore;

    const PASSWORD: &str = "pw-3f9a0c-basic";
    const SIGNING: &str = "sig-7b21e4-signing";
    const URL_PASSWORD: &str = "urlpw-c0ffee";

    fn keys(current: Option<u8>, previous: Option<u8>) -> Keyring {
        Keyring {
            current: current.map(|b| SecretKey::from_bytes([b; 32])),
            previous: previous.map(|b| SecretKey::from_bytes([b; 32])),
        }
    }

    fn sample(queue: &str) -> Enrollment {
        Enrollment {
            id: Uuid::new_v4(),
            queue: queue.into(),
            target_url: format!("http://user:{URL_PASSWORD}@127.0.0.1:1/{queue}"),
            subscription_args: SubscriptionArgs::default(),
            created_at: "2026-01-01T00:00:00Z".into(),
            delivery: DeliverySettings {
                auth: Some(Auth::Basic {
                    username: "ann".into(),
                    password: PASSWORD.into(),
                }),
                signing: Some(Signing {
                    secret: SIGNING.into(),
                }),
                ..Default::default()
            },
            paused: false,
        }
    }

    /// Every row's `target_url` and `delivery` exactly as the file holds them.
    fn raw_rows(path: &std::path::Path) -> Vec<(String, String, String)> {
        let conn = rusqlite::Connection::open(path).expect("raw connection");
        let mut stmt = conn
            .prepare("SELECT id, target_url, delivery FROM enrollments ORDER BY id")
            .expect("prepare");
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows")
    }

    fn assert_no_secret(text: &str) {
        for secret in [PASSWORD, SIGNING, URL_PASSWORD] {
            assert!(!text.contains(secret), "{secret} found in {text}");
        }
    }

    async fn sealed(path: &std::path::Path, keyring: Keyring) -> SealedStore<SqliteStore> {
        let inner = SqliteStore::open(path).await.expect("open");
        SealedStore::start(inner, keyring).await.expect("start")
    }

    #[tokio::test]
    async fn secrets_are_sealed_in_the_file_and_open_to_what_was_given() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sqlite");
        let store = sealed(&path, keys(Some(1), None)).await;
        let a = sample("a");
        store.insert(a.clone()).await.expect("insert");
        for (_, url, delivery) in raw_rows(&path) {
            assert_no_secret(&url);
            assert_no_secret(&delivery);
            assert!(url.starts_with("http://user:hp-sealed.v1."), "{url}");
        }
        let loaded = store.load_stored().await.expect("load");
        assert_eq!(
            loaded,
            vec![StoredEnrollment {
                enrollment: a,
                unreadable: None
            }]
        );
    }

    #[tokio::test]
    async fn clear_rows_and_previous_key_rows_are_rewritten_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sqlite");
        let (clear, old) = (sample("clear"), sample("old"));
        let plain = SqliteStore::open(&path).await.expect("open");
        plain.insert(clear.clone()).await.expect("insert");
        drop(plain);
        sealed(&path, keys(Some(1), None))
            .await
            .insert(old.clone())
            .await
            .expect("insert");

        // Rotation: key 2 is new, key 1 the previous; one start rewrites both rows.
        let store = sealed(&path, keys(Some(2), Some(1))).await;
        let new_id = SecretKey::from_bytes([2; 32]).id().to_string();
        for (_, url, delivery) in raw_rows(&path) {
            assert_no_secret(&url);
            assert_no_secret(&delivery);
            assert!(
                url.contains(&new_id) && delivery.contains(&new_id),
                "{url} {delivery}"
            );
        }
        drop(store);
        let store = sealed(&path, keys(Some(2), None)).await;
        let mut loaded = store.load_stored().await.expect("load");
        loaded.sort_by(|x, y| x.enrollment.queue.cmp(&y.enrollment.queue));
        assert_eq!(loaded[0].enrollment, clear);
        assert_eq!(loaded[1].enrollment, old);
        assert!(loaded.iter().all(|r| r.unreadable.is_none()));
    }

    #[tokio::test]
    async fn a_row_no_key_opens_loads_unreadable_naming_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sqlite");
        let a = sample("a");
        sealed(&path, keys(Some(1), None))
            .await
            .insert(a.clone())
            .await
            .expect("insert");
        let id = SecretKey::from_bytes([1; 32]).id().to_string();
        for keyring in [
            keys(None, None),
            keys(Some(3), None),
            keys(Some(3), Some(4)),
        ] {
            let before = raw_rows(&path);
            let store = sealed(&path, keyring).await;
            assert_eq!(raw_rows(&path), before, "an unopened row is not rewritten");
            let loaded = store.load_stored().await.expect("the load does not fail");
            let reason = loaded[0].unreadable.as_deref().expect("marked unreadable");
            assert!(
                reason.contains(&format!(
                    "sealed with key {id}, which is neither SECRETS_KEY nor SECRETS_KEY_PREVIOUS"
                )),
                "{reason}"
            );
            assert!(reason.contains("`delivery.auth.password`"), "{reason}");
            assert_no_secret(reason);
            assert_no_secret(&format!("{:?}", loaded[0].enrollment));
            assert_eq!(loaded[0].enrollment.queue, a.queue);
        }
    }

    #[tokio::test]
    async fn a_sealed_value_moved_to_another_row_does_not_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sqlite");
        let store = sealed(&path, keys(Some(1), None)).await;
        let (a, b) = (sample("a"), sample("b"));
        store.insert(a.clone()).await.expect("insert");
        store.insert(b.clone()).await.expect("insert");
        let conn = rusqlite::Connection::open(&path).expect("raw connection");
        conn.execute(
            "UPDATE enrollments SET delivery = (SELECT delivery FROM enrollments WHERE id = ?1)
             WHERE id = ?2",
            rusqlite::params![a.id.to_string(), b.id.to_string()],
        )
        .expect("swap");
        drop(conn);
        let loaded = store.load_stored().await.expect("load");
        let row = |id| loaded.iter().find(|r| r.enrollment.id == id).expect("row");
        assert_eq!(row(a.id).unreadable, None);
        let reason = row(b.id)
            .unreadable
            .as_deref()
            .expect("moved value refused");
        assert!(reason.contains("does not open with key"), "{reason}");
        assert_no_secret(reason);
    }
}
