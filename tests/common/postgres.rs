//! A PostgreSQL database of its own for each test that needs one: `HOT_POTATO_TEST_DATABASE`
//! (printed by `scripts/ensure-postgres.sh`, exported by `scripts/test.sh`) names a server and
//! a role that may create databases; each test creates `hp_<random>` and drops it when done.
//! Without the variable such a test fails under `CI` and is skipped with a note otherwise.

use std::time::Duration;

use tokio_postgres::NoTls;

/// A database made for one test, dropped (with its connections) when this is dropped.
pub struct TestDatabase {
    /// The `DATABASE_URL` of the new database.
    pub url: String,
    admin: String,
    name: String,
}

async fn execute(url: &str, sql: &str) -> Result<(), String> {
    let connecting =
        tokio::time::timeout(Duration::from_secs(10), tokio_postgres::connect(url, NoTls));
    let (client, connection) = connecting
        .await
        .map_err(|_| "connecting to PostgreSQL timed out".to_string())?
        .map_err(|e| format!("cannot connect to PostgreSQL: {e}"))?;
    let driver = tokio::spawn(connection);
    let result = client
        .batch_execute(sql)
        .await
        .map_err(|e| format!("{sql}: {e}"));
    drop(client);
    let _ = driver.await;
    result
}

impl TestDatabase {
    /// A fresh database, or `None` (test skipped) when no server is configured outside CI.
    pub async fn create() -> Option<Self> {
        let Ok(admin) = std::env::var("HOT_POTATO_TEST_DATABASE") else {
            assert!(
                std::env::var_os("CI").is_none(),
                "HOT_POTATO_TEST_DATABASE is not set: scripts/test.sh sets it from scripts/ensure-postgres.sh"
            );
            eprintln!(
                "skipped: HOT_POTATO_TEST_DATABASE is not set (export HOT_POTATO_TEST_DATABASE=\"$(scripts/ensure-postgres.sh)\")"
            );
            return None;
        };
        let name = format!("hp_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        execute(&admin, &format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut url = url::Url::parse(&admin).expect("HOT_POTATO_TEST_DATABASE is a URL");
        url.set_path(&format!("/{name}"));
        Some(Self {
            url: url.to_string(),
            admin,
            name,
        })
    }
}

impl TestDatabase {
    /// Runs `sql` on the test's database.
    pub async fn execute(&self, sql: &str) -> Result<(), String> {
        execute(&self.url, sql).await
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (admin, sql) = (
            self.admin.clone(),
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
        // Its own thread and runtime: drop may run inside the test's runtime.
        let dropping = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(execute(&admin, &sql))
        });
        if let Ok(Err(e)) = dropping.join() {
            eprintln!("could not drop the test database: {e}");
        }
    }
}
