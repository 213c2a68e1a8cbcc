//! The demo receiver (`hot-potato demo-receiver`): an HTTP endpoint that prints every POST it
//! gets and answers with a chosen status, for the README walkthrough and local trials.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context as _, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use tokio::net::TcpListener;

/// Longest body excerpt printed per request.
const SHOWN_BODY_BYTES: usize = 2048;

struct Options {
    host: IpAddr,
    port: u16,
    status: StatusCode,
}

fn parse(args: &[String]) -> anyhow::Result<Options> {
    let mut options = Options {
        host: IpAddr::from([127, 0, 0, 1]),
        port: 8089,
        status: StatusCode::OK,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--host" => options.host = value.parse().context("--host must be an IP address")?,
            "--port" => options.port = value.parse().context("--port must be a port number")?,
            "--status" => {
                let code: u16 = value.parse().context("--status must be a number")?;
                options.status =
                    StatusCode::from_u16(code).context("--status must be an HTTP status code")?;
            }
            other => bail!("unknown option {other}; options: --host IP --port N --status CODE"),
        }
    }
    Ok(options)
}

/// Runs the receiver until Ctrl-C.
pub async fn main(args: &[String]) -> anyhow::Result<()> {
    let options = parse(args)?;
    let addr = SocketAddr::new(options.host, options.port);
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    println!(
        "demo receiver on http://{addr}/ answering {}",
        options.status
    );
    let app = Router::new().fallback(receive).with_state(options.status);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

async fn receive(
    State(status): State<StatusCode>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let mut lines = vec![format!(
        "POST {uri} ({} bytes) -> {}",
        body.len(),
        status.as_u16()
    )];
    for (name, value) in &headers {
        let name = name.as_str();
        if name.starts_with("amqp-") || name.starts_with("hot-potato-") || name == "content-type" {
            lines.push(format!(
                "  {name}: {}",
                value.to_str().unwrap_or("<binary>")
            ));
        }
    }
    let shown = &body[..body.len().min(SHOWN_BODY_BYTES)];
    lines.push(format!("  {}", String::from_utf8_lossy(shown)));
    println!("{}", lines.join("\n"));
    status
}
