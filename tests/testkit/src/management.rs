//! The RabbitMQ management HTTP API (user guest/guest): declaring and deleting queues, reading
//! their depth, publishing raw bytes. Every queue declared through a [`Management`] (or a clone
//! of it) is remembered, so [`Management::cleanup`] can delete what a run left behind.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use serde_json::{Value, json};

use crate::{parallel, wait};

/// Bound on each management API call.
const CALL_LIMIT: Duration = Duration::from_secs(30);
/// Parallel calls when deleting many queues.
const PARALLEL_CALLS: usize = 16;

#[derive(Clone)]
pub struct Management {
    http: reqwest::Client,
    base: String,
    /// How often the `wait_*` methods ask again.
    poll: Duration,
    /// Every queue declared through this client or its clones and not deleted since.
    declared: Arc<Mutex<Vec<String>>>,
}

impl Management {
    /// A client for the management API at `base` (e.g. `http://127.0.0.1:15672`), polling every
    /// 50 ms when waiting.
    pub fn new(base: &str) -> Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder().timeout(CALL_LIMIT).build()?,
            base: base.trim_end_matches('/').to_string(),
            poll: Duration::from_millis(50),
            declared: Arc::default(),
        })
    }

    /// The `wait_*` methods poll every `every` instead (the API refreshes its figures every 5 s by default).
    pub fn polling_every(mut self, every: Duration) -> Self {
        self.poll = every;
        self
    }

    fn declared(&self) -> MutexGuard<'_, Vec<String>> {
        self.declared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn queue_url(&self, name: &str) -> String {
        format!("{}/api/queues/%2F/{name}", self.base)
    }

    /// GETs `path` (e.g. `/api/overview`) and parses the JSON answer, which must be a success.
    pub async fn get(&self, path: &str) -> Result<Value> {
        let res = self
            .http
            .get(format!("{}{path}", self.base))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .with_context(|| format!("management API GET {path}"))?;
        let status = res.status();
        ensure!(status.is_success(), "management API GET {path}: {status}");
        Ok(res.json().await?)
    }

    async fn put_queue(&self, name: &str, body: Value) -> Result<()> {
        // Remembered first: a declare that times out may still have happened.
        self.declared().push(name.to_string());
        let res = self
            .http
            .put(self.queue_url(name))
            .basic_auth("guest", Some("guest"))
            .json(&body)
            .send()
            .await
            .with_context(|| format!("declaring {name} through the management API"))?;
        let status = res.status();
        ensure!(status.is_success(), "declare {name}: {status}");
        Ok(())
    }

    pub async fn declare_classic(&self, name: &str) -> Result<()> {
        self.put_queue(name, json!({"durable": true})).await
    }

    pub async fn declare_quorum(&self, name: &str) -> Result<()> {
        self.put_queue(
            name,
            json!({"durable": true, "arguments": {"x-queue-type": "quorum"}}),
        )
        .await
    }

    /// A quorum queue that dead-letters to `NAME.dlq` (declared too, classic) after `limit`
    /// redeliveries. Returns the dead-letter queue's name.
    pub async fn declare_with_dead_letter(&self, name: &str, limit: u32) -> Result<String> {
        let dlq = format!("{name}.dlq");
        self.declare_classic(&dlq).await?;
        self.put_queue(
            name,
            json!({"durable": true, "arguments": {
                "x-queue-type": "quorum",
                "x-delivery-limit": limit,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": dlq,
            }}),
        )
        .await?;
        Ok(dlq)
    }

    /// The queue as the management API shows it (an error when it does not exist).
    pub async fn queue_info(&self, name: &str) -> Result<Value> {
        self.get(&format!("/api/queues/%2F/{name}")).await
    }

    /// Ready plus unacknowledged messages, once the management API has a figure.
    pub async fn depth(&self, name: &str) -> Result<Option<u64>> {
        let q = self
            .get(&format!("/api/queues/%2F/{name}?columns=messages"))
            .await?;
        Ok(q.get("messages").and_then(Value::as_u64))
    }

    /// Waits until the queue holds exactly `n` messages.
    pub async fn wait_depth(&self, name: &str, n: u64, limit: Duration) -> Result<()> {
        wait::wait_for(
            &format!("the management API to show {n} messages in {name}"),
            limit,
            self.poll,
            || async { Ok((self.depth(name).await? == Some(n)).then_some(())) },
        )
        .await
    }

    /// Waits until each of the queues holds exactly `n` messages.
    pub async fn wait_depths(&self, names: &[String], n: u64, limit: Duration) -> Result<()> {
        let mut set = tokio::task::JoinSet::new();
        for name in names {
            let (this, name) = (self.clone(), name.clone());
            set.spawn(async move { this.wait_depth(&name, n, limit).await });
        }
        while let Some(r) = set.join_next().await {
            r??;
        }
        Ok(())
    }

    /// Waits until `expected` queues whose names start with `prefix` exist and all are empty
    /// (one list call per poll, however many queues).
    pub async fn wait_all_empty(
        &self,
        prefix: &str,
        expected: usize,
        limit: Duration,
    ) -> Result<()> {
        wait::wait_for(
            &format!("the {expected} {prefix}* queues to be empty"),
            limit,
            self.poll,
            || async {
                let list = self.get("/api/queues/%2F?columns=name,messages").await?;
                let ours: Vec<&Value> = list
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter(|q| q["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
                            .collect()
                    })
                    .unwrap_or_default();
                let empty = ours
                    .iter()
                    .filter(|q| q["messages"].as_u64() == Some(0))
                    .count();
                Ok((ours.len() == expected && empty == expected).then_some(()))
            },
        )
        .await
    }

    /// Publishes raw bytes to `queue` through the default exchange. With `amqp_1_0_sections`,
    /// RabbitMQ's AMQP 1.0 plugin hands the bytes to 1.0 consumers as the encoded message
    /// itself, which is how a malformed message can be put on a queue. Fails unless routed.
    pub async fn publish_raw(
        &self,
        queue: &str,
        payload: &[u8],
        amqp_1_0_sections: bool,
    ) -> Result<()> {
        use base64::Engine as _;
        let mut properties = json!({});
        if amqp_1_0_sections {
            properties["type"] = json!("amqp-1.0");
        }
        let res = self
            .http
            .post(format!(
                "{}/api/exchanges/%2F/amq.default/publish",
                self.base
            ))
            .basic_auth("guest", Some("guest"))
            .json(&json!({
                "properties": properties,
                "routing_key": queue,
                "payload": base64::engine::general_purpose::STANDARD.encode(payload),
                "payload_encoding": "base64",
            }))
            .send()
            .await
            .with_context(|| format!("publishing to {queue} through the management API"))?;
        let body: Value = res.json().await.context("the publish answer is not JSON")?;
        ensure!(body["routed"] == true, "not routed to {queue}: {body}");
        Ok(())
    }

    /// Deletes the queue; one that is already gone is fine.
    pub async fn delete_queue(&self, name: &str) -> Result<()> {
        let res = self
            .http
            .delete(self.queue_url(name))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .with_context(|| format!("deleting {name} through the management API"))?;
        let status = res.status();
        ensure!(
            status.is_success() || status == reqwest::StatusCode::NOT_FOUND,
            "deleting {name}: {status}"
        );
        self.declared().retain(|n| n != name);
        Ok(())
    }

    /// Deletes the queues, several at once.
    pub async fn delete_queues(&self, names: Vec<String>) -> Result<()> {
        let this = self.clone();
        parallel::for_each(names, PARALLEL_CALLS, move |name| {
            let this = this.clone();
            async move { this.delete_queue(&name).await }
        })
        .await?;
        Ok(())
    }

    /// Deletes every queue declared through this client (or its clones) and not deleted since;
    /// returns how many there were.
    pub async fn cleanup(&self) -> Result<usize> {
        let names = self.declared().clone();
        let n = names.len();
        self.delete_queues(names).await?;
        Ok(n)
    }
}
