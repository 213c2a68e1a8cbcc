//! The dashboard in a real headless Chromium, driven over WebDriver: the page asks for the
//! API token, shows the API's error for a refused enrollment, enrolls a queue through its
//! form, shows the deliveries live, pauses and resumes, and deletes the enrollment after a
//! `confirm()`; then the docs page renders the OpenAPI document with the same token.
//!
//! Needs Debian's `chromium` and `chromium-driver`. Without `/usr/bin/chromedriver` the test
//! prints a note and passes, unless `CI` is set: then it fails.

mod common;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
/// `API_TOKEN` must be at least 16 characters.
const TOKEN: &str = "dash-token-for-the-browser-test";
const MESSAGES: usize = 20;
/// Bound on the whole browser session, on top of the bound on each wait.
const SCENARIO_LIMIT: Duration = Duration::from_secs(150);

/// chromedriver as a child process, killed (with the browser it started) when dropped.
struct ChromeDriver {
    child: Child,
    url: String,
}

impl ChromeDriver {
    async fn start() -> Self {
        let port = free_port();
        let mut command = Command::new(CHROMEDRIVER);
        command
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group, so that Drop can take the browser down with it.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command.spawn().expect("start chromedriver");
        watch_child(child.id(), true);
        let driver = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let http = reqwest::Client::new();
        let status = format!("{}/status", driver.url);
        wait_for(
            "chromedriver to answer /status",
            Duration::from_secs(20),
            || async {
                let res = http.get(&status).send().await.ok()?;
                let body: Value = res.json().await.ok()?;
                (body["value"]["ready"] == true).then_some(())
            },
        )
        .await;
        driver
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let pid = self.child.id();
        // The whole group: chromedriver and any browser it left behind.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        unwatch_child(pid, true);
    }
}

fn browser_available() -> bool {
    if Path::new(CHROMEDRIVER).exists() && Path::new(CHROMIUM).exists() {
        return true;
    }
    let message = format!(
        "{CHROMEDRIVER} or {CHROMIUM} is missing: install them with \
         `apt-get install -y chromium chromium-driver` (scripts/test.sh does)"
    );
    assert!(std::env::var_os("CI").is_none(), "CI is set and {message}");
    eprintln!("note: skipping the dashboard browser test: {message}");
    false
}

fn artifacts_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("create test-artifacts");
    dir
}

/// Polls `check` until it returns `Some`; an error names `what` and the last value seen.
async fn until<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Result<T, String>>>,
{
    let deadline = Instant::now() + limit;
    loop {
        let last = match check().await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(seen)) => seen,
            Err(e) => format!("error: {e:#}"),
        };
        if Instant::now() >= deadline {
            bail!("timed out after {limit:?} waiting for {what}; last seen: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Text of the first element matching `css`, or `None` when there is none.
async fn text_of(c: &Client, css: &str) -> anyhow::Result<Option<String>> {
    match c.find_all(Locator::Css(css)).await?.first() {
        Some(e) => Ok(Some(e.text().await?.trim().to_string())),
        None => Ok(None),
    }
}

async fn displayed(c: &Client, css: &str) -> anyhow::Result<bool> {
    match c.find_all(Locator::Css(css)).await?.first() {
        Some(e) => Ok(e.is_displayed().await?),
        None => Ok(false),
    }
}

/// An API request with the bearer token.
async fn api_get(base: &str, path: &str) -> anyhow::Result<(u16, Value)> {
    let res = reqwest::Client::new()
        .get(format!("{base}{path}"))
        .bearer_auth(TOKEN)
        .send()
        .await?;
    let status = res.status().as_u16();
    Ok((status, res.json().await.unwrap_or(Value::Null)))
}

async fn scenario(c: &Client, base: &str, queue: &str, target: &Target) -> anyhow::Result<()> {
    c.set_window_size(1400, 900).await?;
    c.goto(&format!("{base}/")).await?;
    ensure!(c.title().await? == "hot-potato", "page title");

    // Without a token the first poll is refused: the page says so and focuses the field.
    let message = until("the token request", Duration::from_secs(10), || async {
        let text = text_of(c, "#error").await?.unwrap_or_default();
        Ok(if text.to_lowercase().contains("token") {
            Ok(text)
        } else {
            Err(format!("#error = {text:?}"))
        })
    })
    .await?;
    println!("without a token the page says: {message}");
    let focused = c.active_element().await?.attr("id").await?;
    ensure!(
        focused.as_deref() == Some("token"),
        "the token field should have focus after a 401, focus is on {focused:?}"
    );

    c.find(Locator::Css("#token"))
        .await?
        .send_keys(TOKEN)
        .await?;
    until(
        "the token error to clear",
        Duration::from_secs(10),
        || async {
            let text = text_of(c, "#error").await?.unwrap_or_default();
            Ok(if text.is_empty() {
                Ok(())
            } else {
                Err(format!("#error = {text:?}"))
            })
        },
    )
    .await?;

    // A refused enrollment shows the API's error text.
    let address = address(queue);
    c.find(Locator::Css("#queue"))
        .await?
        .send_keys(&address)
        .await?;
    let target_field = c.find(Locator::Css("#target-url")).await?;
    target_field.send_keys("not a url").await?;
    c.find(Locator::Css("#enroll-submit"))
        .await?
        .click()
        .await?;
    until("the API's error", Duration::from_secs(10), || async {
        let text = text_of(c, "#error").await?.unwrap_or_default();
        Ok(if text.contains("target_url") {
            Ok(())
        } else {
            Err(format!("#error = {text:?}"))
        })
    })
    .await?;

    // Enroll through the form, with max_in_flight.
    target_field.clear().await?;
    target_field.send_keys(&target.url()).await?;
    c.find(Locator::Css("#max-in-flight"))
        .await?
        .send_keys("4")
        .await?;
    c.find(Locator::Css("#enroll-submit"))
        .await?
        .click()
        .await?;
    let id = until("the new row", Duration::from_secs(10), || async {
        let rows = c.find_all(Locator::Css("tr[data-id]")).await?;
        Ok(match rows.first() {
            Some(row) => Ok(row.attr("data-id").await?.unwrap_or_default()),
            None => Err(format!(
                "no row; #error = {:?}",
                text_of(c, "#error").await?
            )),
        })
    })
    .await?;
    let (status, enrollment) = api_get(base, &format!("/enrollments/{id}")).await?;
    ensure!(
        status == 200,
        "GET /enrollments/{id}: {status} {enrollment}"
    );
    ensure!(
        enrollment["queue"] == address.as_str() && enrollment["target_url"] == target.url(),
        "the form enrolled something else: {enrollment}"
    );
    ensure!(
        enrollment["delivery"]["max_in_flight"] == 4,
        "max_in_flight from the form: {enrollment}"
    );
    let row = format!("tr[data-id=\"{id}\"]");

    // Deliveries show up live.
    let mut publisher = Publisher::connect(queue).await;
    publisher.send_numbered("dash", 0..MESSAGES).await;
    publisher.close().await;
    until(
        "the row to show 20 delivered",
        Duration::from_secs(30),
        || async {
            let delivered = text_of(c, &format!("{row} .delivered")).await?;
            Ok(if delivered.as_deref() == Some("20") {
                Ok(())
            } else {
                Err(format!("delivered = {delivered:?}"))
            })
        },
    )
    .await?;
    ensure!(
        target.accepted_bodies().len() == MESSAGES,
        "target got {} accepted POSTs",
        target.accepted_bodies().len()
    );
    // Give the sparkline a poll to include the last second, then keep a picture.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let png = c.screenshot().await?;
    let shot = artifacts_dir().join("dashboard.png");
    std::fs::write(&shot, png).with_context(|| format!("write {}", shot.display()))?;
    println!("screenshot: {}", shot.display());

    // Pause and resume from the row.
    ensure!(displayed(c, &format!("{row} .pause")).await?, "Pause shown");
    ensure!(
        !displayed(c, &format!("{row} .resume")).await?,
        "Resume hidden while running"
    );
    c.find(Locator::Css(&format!("{row} .pause")))
        .await?
        .click()
        .await?;
    until(
        "the row to read paused",
        Duration::from_secs(10),
        || async {
            let state = text_of(c, &format!("{row} .state")).await?;
            let resume = displayed(c, &format!("{row} .resume")).await?;
            Ok(if state.as_deref() == Some("paused") && resume {
                Ok(())
            } else {
                Err(format!("state = {state:?}, resume shown = {resume}"))
            })
        },
    )
    .await?;
    c.find(Locator::Css(&format!("{row} .resume")))
        .await?
        .click()
        .await?;
    until(
        "the row to leave paused",
        Duration::from_secs(10),
        || async {
            let state = text_of(c, &format!("{row} .state")).await?;
            let pause = displayed(c, &format!("{row} .pause")).await?;
            Ok(if state.as_deref() != Some("paused") && pause {
                Ok(())
            } else {
                Err(format!("state = {state:?}, pause shown = {pause}"))
            })
        },
    )
    .await?;

    // Delete, confirming the dialog.
    c.find(Locator::Css(&format!("{row} .delete")))
        .await?
        .click()
        .await?;
    until("the confirm dialog", Duration::from_secs(5), || async {
        Ok(match c.accept_alert().await {
            Ok(()) => Ok(()),
            Err(e) => Err(e.to_string()),
        })
    })
    .await?;
    until("the row to disappear", Duration::from_secs(10), || async {
        let left = c.find_all(Locator::Css(&row)).await?.len();
        Ok(if left == 0 {
            Ok(())
        } else {
            Err(format!("{left} row(s)"))
        })
    })
    .await?;

    let (status, list) = api_get(base, "/enrollments").await?;
    ensure!(status == 200, "GET /enrollments: {status} {list}");
    let listed = list
        .as_array()
        .ok_or_else(|| anyhow!("GET /enrollments is not an array: {list}"))?;
    ensure!(
        !listed.iter().any(|e| e["id"] == id.as_str()),
        "{id} is still listed: {list}"
    );
    let (status, _) = api_get(base, &format!("/enrollments/{id}")).await?;
    ensure!(
        status == 404,
        "GET /enrollments/{id} after delete: {status}"
    );

    // The docs page loads /openapi.json with the token this tab keeps in sessionStorage.
    c.goto(&format!("{base}/docs")).await?;
    let operations = until("the docs to render", Duration::from_secs(10), || async {
        let ops = c.find_all(Locator::Css("section.op")).await?.len();
        let enroll = c.find_all(Locator::Css("#op-post--enroll")).await?.len();
        let error = text_of(c, "#error").await?.unwrap_or_default();
        Ok(if ops > 0 && enroll == 1 && error.is_empty() {
            Ok(ops)
        } else {
            Err(format!(
                "{ops} operations, POST /enroll: {enroll}, #error = {error:?}"
            ))
        })
    })
    .await?;
    println!("the docs page shows {operations} operations");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_enrolls_shows_deliveries_and_deletes() {
    let _limit = time_limit(TEST_TIME_LIMIT);
    if !browser_available() {
        return;
    }
    let (_dir, db) = temp_db();
    let daemon = Daemon::start_with(&db, &[("API_TOKEN", TOKEN)]).await;
    let queue = unique("dashboard");
    let management = Management::new();
    management.declare_classic(&queue).await;
    let target = Target::start().await;

    // The pages are open, the data is not.
    let http = reqwest::Client::new();
    for (path, expected) in [("/", 200), ("/docs", 200), ("/stats", 401)] {
        let status = http
            .get(format!("{}{path}", daemon.base))
            .send()
            .await
            .expect("API reachable")
            .status();
        assert_eq!(status.as_u16(), expected, "GET {path} without a token");
    }

    let driver = ChromeDriver::start().await;
    let profile = tempfile::tempdir().expect("profile dir");
    let capabilities = json!({
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                format!("--user-data-dir={}", profile.path().display()),
            ],
        }
    });
    let Value::Object(capabilities) = capabilities else {
        unreachable!("a JSON object")
    };
    let client = tokio::time::timeout(
        Duration::from_secs(30),
        ClientBuilder::rustls()
            .expect("rustls connector")
            .capabilities(capabilities)
            .connect(&driver.url),
    )
    .await
    .expect("WebDriver session within 30 s")
    .expect("WebDriver session");

    let outcome = tokio::time::timeout(
        SCENARIO_LIMIT,
        scenario(&client, &daemon.base, &queue, &target),
    )
    .await
    .unwrap_or_else(|_| Err(anyhow!("the scenario took longer than {SCENARIO_LIMIT:?}")));
    if outcome.is_err()
        && let Ok(Ok(png)) =
            tokio::time::timeout(Duration::from_secs(10), client.screenshot()).await
    {
        let shot = artifacts_dir().join("dashboard-failure.png");
        let _ = std::fs::write(&shot, png);
        eprintln!("failure screenshot: {}", shot.display());
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), client.close()).await;
    drop(driver);
    daemon.stop().await;
    management.delete_queue(&queue).await;
    if let Err(e) = outcome {
        panic!("{e:#}");
    }
}
