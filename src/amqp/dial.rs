//! Opening one connection to the broker: TCP with Nagle off, TLS for `amqps`, SASL PLAIN from
//! the URL, or a stream the caller supplies; closing one within a bound; and telling a broken
//! connection from a refused session.

use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::Connection;
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::BeginError;
use percent_encoding::percent_decode_str;
use tokio::io::DuplexStream;
use tokio::net::TcpStream;
use url::Url;

use crate::amqp::error::LinkError;

/// Where a connection's bytes go.
#[derive(Clone, Default)]
pub enum Dialer {
    /// TCP to the URL's host and port (TLS on top for `amqps`).
    #[default]
    Tcp,
    /// A stream the caller makes, e.g. one end of a `tokio::io::duplex` whose other end is an
    /// in-memory AMQP peer: tests stage broker behaviour a real broker can't show on demand.
    Stream(Arc<dyn Fn() -> DuplexStream + Send + Sync>),
}

/// How long a session may take to end, or a connection to close, before it is left behind:
/// a broker that stops answering must not hold a worker, a DELETE or the shutdown.
pub(crate) const END_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether a failed `begin` shows the connection itself gone (so it may be reopened) rather
/// than one session refused on a connection that still carries other enrollments' sessions.
/// Exhaustive on purpose: a new fe2o3 error kind must be sorted here, not guessed.
pub(crate) fn connection_is_broken(connection: &ConnectionHandle<()>, error: &BeginError) -> bool {
    if connection.is_closed() {
        return true;
    }
    match error {
        // The connection's event loop stopped (closed by either side, I/O error, missed
        // heartbeats) or never got as far as `open`.
        BeginError::ConnectionStopped(_) | BeginError::ConnectionNotOpened => true,
        // fe2o3 and the broker disagree about the connection's state: nothing on it can be
        // trusted any more.
        BeginError::IllegalState => true,
        // Every channel up to the negotiated channel-max is taken: the connection is healthy,
        // it just carries as many sessions as it may.
        BeginError::LocalChannelMaxReached => false,
        // The broker answered this one `begin` with an `end`: it refused the session, not the
        // connection.
        BeginError::RemoteEnded | BeginError::RemoteEndedWithError(_) => false,
    }
}

/// Closes a connection this code is done with, bounded by [`END_TIMEOUT`]; the outcome is of
/// no interest (it is usually closed already).
pub async fn close_quietly(mut connection: ConnectionHandle<()>) {
    let _ = tokio::time::timeout(END_TIMEOUT, connection.close()).await;
}

/// Opens one connection: TCP with Nagle off (every disposition is a small frame we want out at
/// once), direct TLS for `amqps`, SASL PLAIN when the URL has a user.
pub(crate) async fn connect(
    url: &Url,
    dialer: &Dialer,
    container_id: &str,
) -> Result<ConnectionHandle<()>, LinkError> {
    let host = url.host_str().ok_or(LinkError::BadUrl)?;
    let mut builder = Connection::builder()
        .container_id(container_id.to_string())
        .scheme(url.scheme())
        .hostname(host)
        .domain(url.domain())
        // amqps listeners (5671 on RabbitMQ, Artemis, Service Bus) expect TLS at once, not the
        // AMQP TLS protocol header first.
        .alt_tls_establishment(true)
        // Room for many sessions when pooled; the broker's own channel-max still applies.
        .channel_max(u16::MAX)
        .idle_time_out(30_000u32);
    if let Some(profile) = sasl_plain(url) {
        builder = builder.sasl_profile(profile);
    }
    match dialer {
        Dialer::Tcp => {
            let port = url
                .port()
                .unwrap_or(if url.scheme() == "amqps" { 5671 } else { 5672 });
            let stream = TcpStream::connect((host, port)).await?;
            stream.set_nodelay(true)?;
            Ok(builder.open_with_stream(stream).await?)
        }
        Dialer::Stream(make) => Ok(builder.open_with_stream(make()).await?),
    }
}

/// SASL PLAIN from the URL's user info, percent-decoded: Service Bus keys end in `=`, which
/// a URL carries as `%3D`.
fn sasl_plain(url: &Url) -> Option<SaslProfile> {
    if url.username().is_empty() {
        return None;
    }
    let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
    Some(SaslProfile::Plain {
        username: decode(url.username()),
        password: decode(url.password().unwrap_or("")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_percent_decoded() {
        let url =
            Url::parse("amqps://RootManageSharedAccessKey:abc%2Fdef%3D@x.servicebus.windows.net")
                .expect("url");
        match sasl_plain(&url) {
            Some(SaslProfile::Plain { username, password }) => {
                assert_eq!(username, "RootManageSharedAccessKey");
                assert_eq!(password, "abc/def=");
            }
            _ => panic!("expected SASL PLAIN"),
        }
        assert!(sasl_plain(&Url::parse("amqp://localhost").expect("url")).is_none());
    }
}
