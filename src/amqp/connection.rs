//! Connections to the broker: opening one (TCP with Nagle off, TLS for `amqps`, SASL PLAIN
//! from the URL, or a stream the caller supplies), and where each enrollment's session lives.
//! By default every enrollment owns its connection, so a broker-side problem on one connection
//! touches one enrollment. With `AMQP_CONNECTION_POOL=N` enrollments share N connections
//! instead (a session and receiver each), which large fleets need: fewer sockets, broker
//! processes and heartbeats, at the price that a connection failure or a flow-controlled
//! connection affects every enrollment on it.

use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::{BeginError, SessionHandle};
use fe2o3_amqp::{Connection, Session};
use percent_encoding::percent_decode_str;
use tokio::io::DuplexStream;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use url::Url;
use uuid::Uuid;

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

/// Connection settings shared by every link the daemon opens.
pub struct BrokerSettings {
    pub url: Url,
    pub connect_timeout: Duration,
    /// `None`: a dedicated connection per enrollment.
    pub pool: Option<ConnectionPool>,
    pub dialer: Dialer,
    /// The receiver's `max-message-size` (`AMQP_MAX_MESSAGE_BYTES`): a bound on the memory
    /// one message may take. The link fails on a larger message, which stays on the broker.
    pub max_message_size: u64,
}

/// A fixed set of shared connections, each opened on first use and reopened once it is closed
/// or broken. A session the broker refuses on a live connection leaves the connection in place.
pub struct ConnectionPool {
    slots: Vec<Mutex<Option<ConnectionHandle<()>>>>,
}

impl ConnectionPool {
    pub fn new(size: usize) -> Self {
        Self {
            slots: (0..size.max(1)).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// An enrollment always lands on the same slot, so its container id (which names a
    /// durable subscription on Artemis) is stable while the pool size is.
    fn slot_of(&self, enrollment: Uuid) -> usize {
        (enrollment.as_u128() % self.slots.len() as u128) as usize
    }
}

/// An enrollment's session, and the connection under it when the enrollment owns one.
pub struct SessionLease {
    pub session: SessionHandle<()>,
    owned: Option<ConnectionHandle<()>>,
}

/// How long a session may take to end, or a connection to close, before it is left behind:
/// a broker that stops answering must not hold a worker, a DELETE or the shutdown.
pub(crate) const END_TIMEOUT: Duration = Duration::from_secs(5);

impl SessionLease {
    fn pooled(session: SessionHandle<()>) -> Self {
        Self {
            session,
            owned: None,
        }
    }

    /// Ends the session, or closes the connection when it is this enrollment's own (which
    /// ends its session too). Bounded in time: fe2o3-amqp 0.18's session task busy-polls
    /// once its links are gone until the broker's `end` arrives, so it must not be left
    /// waiting on a broker that never answers.
    pub async fn end(mut self) {
        match self.owned.take() {
            Some(mut connection) => {
                if tokio::time::timeout(END_TIMEOUT, connection.close())
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        "the broker did not confirm closing the connection; dropping it"
                    );
                }
            }
            None => {
                if tokio::time::timeout(END_TIMEOUT, self.session.end())
                    .await
                    .is_err()
                {
                    tracing::warn!("the broker did not confirm ending the session; dropping it");
                }
            }
        }
    }
}

impl BrokerSettings {
    /// A session for `enrollment`: on its own connection, or on its pool slot's connection
    /// (opened or reopened as needed).
    pub async fn session(
        &self,
        enrollment: Uuid,
        own_container_id: &str,
    ) -> Result<SessionLease, LinkError> {
        let Some(pool) = &self.pool else {
            let mut connection = connect(&self.url, &self.dialer, own_container_id).await?;
            return match Session::begin(&mut connection).await {
                Ok(session) => Ok(SessionLease {
                    session,
                    owned: Some(connection),
                }),
                Err(e) => {
                    close_quietly(connection).await;
                    Err(e.into())
                }
            };
        };
        let index = pool.slot_of(enrollment);
        // Held across the connect on purpose: the enrollments of a slot wait for one
        // reconnect instead of each opening a connection of its own.
        let mut slot = pool.slots[index].lock().await;
        // A connection whose event loop has stopped serves no one: replace it without trying.
        if slot.as_ref().is_some_and(ConnectionHandle::is_closed)
            && let Some(dead) = slot.take()
        {
            close_quietly(dead).await;
        }
        if let Some(connection) = slot.as_mut() {
            match Session::begin(connection).await {
                Ok(session) => return Ok(SessionLease::pooled(session)),
                Err(e) if !connection_is_broken(connection, &e) => {
                    // Only this enrollment's session was refused; the sessions of the other
                    // enrollments on this connection are fine and must not be torn down.
                    tracing::warn!(
                        slot = index,
                        error = %e,
                        "no session on the pooled connection for this enrollment; the connection stays open for the others"
                    );
                    return Err(e.into());
                }
                Err(e) => {
                    tracing::info!(slot = index, error = %e, "pooled connection is broken; reopening it");
                    if let Some(dead) = slot.take() {
                        close_quietly(dead).await;
                    }
                }
            }
        }
        let mut connection =
            connect(&self.url, &self.dialer, &format!("hot-potato-pool-{index}")).await?;
        match Session::begin(&mut connection).await {
            Ok(session) => {
                *slot = Some(connection);
                Ok(SessionLease::pooled(session))
            }
            Err(e) => {
                // A live connection stays in the slot for the next enrollment that needs one.
                if connection_is_broken(&connection, &e) {
                    close_quietly(connection).await;
                } else {
                    *slot = Some(connection);
                }
                Err(e.into())
            }
        }
    }

    /// A connection of its own under `container_id` (the publisher's, the reply link's),
    /// bounded by the connect timeout.
    pub async fn dedicated(&self, container_id: &str) -> Result<ConnectionHandle<()>, LinkError> {
        tokio::time::timeout(
            self.connect_timeout,
            connect(&self.url, &self.dialer, container_id),
        )
        .await
        .map_err(|_| LinkError::ConnectTimeout(self.connect_timeout))?
    }

    /// Closes the pooled connections (shutdown). Dedicated ones close with their sessions.
    pub async fn close_pool(&self) {
        if let Some(pool) = &self.pool {
            for slot in &pool.slots {
                if let Some(connection) = slot.lock().await.take() {
                    close_quietly(connection).await;
                }
            }
        }
    }
}

/// Whether a failed `begin` shows the connection itself gone (so it may be reopened) rather
/// than one session refused on a connection that still carries other enrollments' sessions.
/// Exhaustive on purpose: a new fe2o3 error kind must be sorted here, not guessed.
fn connection_is_broken(connection: &ConnectionHandle<()>, error: &BeginError) -> bool {
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
async fn connect(
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

    /// The in-memory peer advertises channel-max 0: each connection carries one session, so a
    /// second `begin` on the pooled connection fails while the connection itself is healthy.
    #[tokio::test]
    async fn a_refused_session_leaves_the_pooled_connection_to_the_others() {
        use hot_potato_testkit::peer::{Peer, PeerConfig};
        let peer = Arc::new(Peer::start(PeerConfig {
            channel_max: 0,
            ..PeerConfig::default()
        }));
        let dial = Arc::clone(&peer);
        let broker = BrokerSettings {
            url: Url::parse("amqp://in-memory-peer").expect("url"),
            connect_timeout: Duration::from_secs(10),
            pool: Some(ConnectionPool::new(1)),
            dialer: Dialer::Stream(Arc::new(move || dial.dial())),
            max_message_size: 1024,
        };
        let first = broker
            .session(Uuid::new_v4(), "a")
            .await
            .expect("the first session");
        let refused = broker.session(Uuid::new_v4(), "b").await;
        assert!(
            matches!(
                refused,
                Err(LinkError::Begin(BeginError::LocalChannelMaxReached))
            ),
            "{:?}",
            refused.err()
        );
        assert!(!first.session.is_ended(), "the first session is untouched");
        assert_eq!(peer.live_connections(), 1);
        assert!(
            peer.frames().iter().all(|f| f.as_close().is_none()),
            "the pooled connection was not closed"
        );
        // Once the first enrollment lets its session go, the next one gets the freed channel on
        // the same connection.
        first.end().await;
        let next = broker
            .session(Uuid::new_v4(), "c")
            .await
            .expect("a session once a channel is free");
        assert!(
            peer.frames().iter().all(|f| f.connection == 1),
            "one connection only"
        );
        next.end().await;
        broker.close_pool().await;
    }

    #[test]
    fn an_enrollment_keeps_its_slot() {
        let pool = ConnectionPool::new(8);
        let id = Uuid::new_v4();
        assert_eq!(pool.slot_of(id), pool.slot_of(id));
        assert!(pool.slot_of(id) < 8);
    }
}
