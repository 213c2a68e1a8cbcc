//! A client for the daemon's HTTP API (`/enroll`, `/enrollments`, `/health`).

use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, ensure};
use serde_json::Value;

use crate::wait;

/// Bound on each API call.
const CALL_LIMIT: Duration = Duration::from_secs(30);
/// How often the `wait_*` methods ask again.
const POLL: Duration = Duration::from_millis(50);

#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub base: String,
}

impl Api {
    pub fn new(base: &str) -> Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder().timeout(CALL_LIMIT).build()?,
            base: base.trim_end_matches('/').to_string(),
        })
    }

    /// The port the daemon under this client listens on.
    pub fn port(&self) -> Result<u16> {
        self.base
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow!("{} does not end with a port", self.base))
    }

    /// POST /enroll; the enrollment's JSON when answered 201 (new) or 200 (already there).
    pub async fn enroll(&self, body: &Value) -> Result<Value> {
        let res = self
            .http
            .post(format!("{}/enroll", self.base))
            .json(body)
            .send()
            .await
            .context("POST /enroll")?;
        let status = res.status().as_u16();
        let answer: Value = res.json().await.unwrap_or(Value::Null);
        ensure!(
            status == 201 || status == 200,
            "enroll answered {status}: {answer}"
        );
        Ok(answer)
    }

    /// POST /enroll; the new enrollment's id.
    pub async fn enroll_id(&self, body: &Value) -> Result<String> {
        let answer = self.enroll(body).await?;
        answer["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no id in {answer}"))
    }

    /// GET `path`: the status and the JSON answer (null when it is not JSON).
    pub async fn get(&self, path: &str) -> Result<(u16, Value)> {
        let res = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        let status = res.status().as_u16();
        Ok((status, res.json().await.unwrap_or(Value::Null)))
    }

    /// GET `path`, which must answer 2xx; its JSON.
    pub async fn get_json(&self, path: &str) -> Result<Value> {
        let (status, body) = self.get(path).await?;
        ensure!((200..300).contains(&status), "GET {path}: {status} {body}");
        Ok(body)
    }

    /// POST `path` with no body (pause, resume): the status and the JSON answer.
    pub async fn post_empty(&self, path: &str) -> Result<(u16, Value)> {
        let res = self
            .http
            .post(format!("{}{path}", self.base))
            .send()
            .await
            .with_context(|| format!("POST {path}"))?;
        let status = res.status().as_u16();
        Ok((status, res.json().await.unwrap_or(Value::Null)))
    }

    /// DELETE /enroll/ID; the status.
    pub async fn delete(&self, id: &str) -> Result<u16> {
        let res = self
            .http
            .delete(format!("{}/enroll/{id}", self.base))
            .send()
            .await
            .with_context(|| format!("DELETE /enroll/{id}"))?;
        Ok(res.status().as_u16())
    }

    pub async fn enrollment(&self, id: &str) -> Result<Value> {
        let path = format!("/enrollments/{id}");
        let (status, body) = self.get(&path).await?;
        ensure!(status == 200, "GET {path}: {status} {body}");
        Ok(body)
    }

    pub async fn enrollments(&self) -> Result<Vec<Value>> {
        let list = self.get_json("/enrollments").await?;
        list.as_array()
            .cloned()
            .ok_or_else(|| anyhow!("GET /enrollments did not answer an array"))
    }

    /// Waits until the enrollment reports `state`; its JSON then.
    pub async fn wait_state(&self, id: &str, state: &str, limit: Duration) -> Result<Value> {
        wait::wait_for(
            &format!("enrollment {id} to be {state}"),
            limit,
            POLL,
            || async {
                let e = self.enrollment(id).await?;
                Ok((e["state"] == state).then_some(e))
            },
        )
        .await
    }

    /// Waits until `/health` answers 2xx.
    pub async fn wait_healthy(&self, limit: Duration) -> Result<()> {
        wait::wait_for("the daemon's /health to answer", limit, POLL, || async {
            let res = self
                .http
                .get(format!("{}/health", self.base))
                .send()
                .await?;
            Ok(res.status().is_success().then_some(()))
        })
        .await
    }
}
