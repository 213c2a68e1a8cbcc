//! `docker-compose.yml` and the `Dockerfile`, checked without a container engine (the CI
//! machines have the `docker` CLI but no compose plugin and no engine, so the images are never
//! built here): the compose file is parsed as YAML, validated against the Compose
//! specification's JSON schema (`compose_spec.json`, shipped by Debian's `docker-compose`
//! package, which `scripts/test.sh` unpacks without installing), and its wiring asserted: the
//! Artemis service and its credentials, hot-potato's `AMQP_URL` pointing at it, the ports, the
//! data volume, the demo receiver. The Dockerfile's stages, user and exposed port are read too.

use std::path::{Path, PathBuf};

use serde_json::Value;

fn repo_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

fn compose() -> Value {
    let text =
        std::fs::read_to_string(repo_file("docker-compose.yml")).expect("docker-compose.yml");
    serde_norway::from_str(&text).expect("docker-compose.yml is YAML")
}

/// `KEY: value` or `KEY=value` entries of a service's `environment`, as pairs.
fn environment(service: &Value) -> Vec<(String, String)> {
    match &service["environment"] {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                )
            })
            .collect(),
        Value::Array(items) => items
            .iter()
            .filter_map(|i| i.as_str()?.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        _ => Vec::new(),
    }
}

fn env_value(service: &Value, key: &str) -> Option<String> {
    environment(service)
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

/// The container ports a service publishes (`"HOST:CONTAINER"` entries, comments stripped by
/// the YAML parser).
fn published(service: &Value) -> Vec<(u16, u16)> {
    service["ports"]
        .as_array()
        .map(|ports| {
            ports
                .iter()
                .filter_map(|p| {
                    let (host, container) = p.as_str()?.rsplit_once(':')?;
                    let host = host.rsplit(':').next()?;
                    Some((host.parse().ok()?, container.parse().ok()?))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_compose_file_follows_the_compose_specification() {
    let schema_path = std::env::var("HOT_POTATO_COMPOSE_SCHEMA")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_file("target/compose-spec/compose_spec.json"));
    if !schema_path.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{} is missing: scripts/test.sh unpacks it from Debian's docker-compose package",
            schema_path.display()
        );
        eprintln!(
            "skipped: no compose schema at {} (scripts/test.sh fetches it)",
            schema_path.display()
        );
        return;
    }
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(&schema_path).expect("schema"))
            .expect("the schema is JSON");
    let mut schemas = boon::Schemas::new();
    let mut compiler = boon::Compiler::new();
    compiler
        .add_resource("file:///compose_spec.json", schema)
        .expect("schema resource");
    let index = compiler
        .compile("file:///compose_spec.json", &mut schemas)
        .expect("the compose schema compiles");
    let document = compose();
    if let Err(e) = schemas.validate(&document, index) {
        panic!("docker-compose.yml does not follow the Compose specification: {e:#}");
    }
    // The schema must be able to fail: a port that is not a port, an unknown service key.
    let mut broken = document.clone();
    broken["services"]["hot-potato"]["restartt"] = Value::from("always");
    assert!(
        schemas.validate(&broken, index).is_err(),
        "an unknown key passes the schema"
    );
}

#[test]
fn the_compose_file_wires_hot_potato_to_artemis() {
    let doc = compose();
    let services = &doc["services"];
    let artemis = &services["artemis"];
    assert!(
        artemis["image"]
            .as_str()
            .is_some_and(|i| i.starts_with("apache/activemq-artemis")),
        "{artemis}"
    );
    let user = env_value(artemis, "ARTEMIS_USER").expect("ARTEMIS_USER");
    let password = env_value(artemis, "ARTEMIS_PASSWORD").expect("ARTEMIS_PASSWORD");
    assert!(published(artemis).contains(&(5672, 5672)), "AMQP published");
    assert!(
        published(artemis).contains(&(8161, 8161)),
        "console published"
    );
    assert!(artemis["healthcheck"]["test"].is_array(), "a health check");

    let hp = &services["hot-potato"];
    assert_eq!(hp["build"], ".", "built from this repository");
    assert_eq!(
        env_value(hp, "AMQP_URL").as_deref(),
        Some(format!("amqp://{user}:{password}@artemis:5672").as_str()),
        "AMQP_URL points at the artemis service with its credentials"
    );
    assert_eq!(env_value(hp, "HTTP_HOST").as_deref(), Some("0.0.0.0"));
    let port: u16 = env_value(hp, "HTTP_PORT").map_or(8080, |p| p.parse().expect("port"));
    assert!(
        published(hp).contains(&(port, port)),
        "the API port published"
    );
    let store = env_value(hp, "SQLITE_BACKUP_PATH").expect("SQLITE_BACKUP_PATH");
    let volumes: Vec<&str> = hp["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let data = volumes
        .iter()
        .find_map(|v| v.strip_prefix("hot-potato-data:"))
        .expect("the data volume is mounted");
    assert!(
        store.starts_with(&format!("{data}/")),
        "the store {store} lives on the volume {data}"
    );
    assert!(
        doc["volumes"].get("hot-potato-data").is_some(),
        "the volume is declared"
    );
    assert_eq!(
        hp["depends_on"]["artemis"]["condition"], "service_healthy",
        "starts once Artemis takes connections"
    );
    // Every variable given to hot-potato is one the daemon reads (listed in .env.example).
    let example = std::fs::read_to_string(repo_file(".env.example")).expect(".env.example");
    for (key, _) in environment(hp) {
        assert!(
            example
                .lines()
                .any(|l| l.trim_start_matches("# ").starts_with(&format!("{key}="))),
            "{key} is not a documented setting"
        );
    }

    let demo = &services["demo-receiver"];
    let command: Vec<&str> = demo["command"]
        .as_array()
        .expect("command")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(command.first(), Some(&"demo-receiver"));
    let demo_port: u16 = command
        .windows(2)
        .find(|w| w[0] == "--port")
        .map(|w| w[1].parse().expect("port"))
        .expect("--port");
    assert!(published(demo).contains(&(demo_port, demo_port)));
}

#[test]
fn the_dockerfile_builds_in_one_stage_and_runs_unprivileged_in_another() {
    let text = std::fs::read_to_string(repo_file("Dockerfile")).expect("Dockerfile");
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let stages: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(stages.len(), 2, "{stages:?}");
    assert!(stages[0].starts_with("FROM rust:") && stages[0].ends_with(" AS builder"));
    assert!(stages[1].starts_with("FROM debian:"), "{}", stages[1]);
    assert!(text.contains("cargo build --release --locked --bin hot-potato"));
    let runtime_start = lines
        .iter()
        .position(|l| *l == stages[1])
        .expect("runtime stage");
    let runtime = &lines[runtime_start..];
    assert!(runtime.iter().any(|l| l.starts_with("COPY --from=builder")));
    let user = runtime
        .iter()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER in the runtime stage");
    assert_ne!(user.trim(), "root");
    assert!(runtime.contains(&"EXPOSE 8080"));
    assert!(
        runtime
            .iter()
            .any(|l| l.starts_with("ENTRYPOINT [\"/usr/local/bin/hot-potato\"]"))
    );
    assert!(
        runtime
            .iter()
            .any(|l| l.contains("SQLITE_BACKUP_PATH=/data/"))
    );
}
