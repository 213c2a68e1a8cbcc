//! The connection pool (`AMQP_CONNECTION_POOL`): which shared connection, and which session
//! on it, an enrollment's link goes on. A slot's connections never carry more sessions than
//! the broker's channel-max allows (a full slot opens one more connection), and with
//! `AMQP_LINKS_PER_SESSION` above 1 several enrollments' links share a session, which saves
//! the broker a session and the daemon about half of what an idle enrollment costs.

use std::sync::Arc;

use fe2o3_amqp::Session;
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::session::{BeginError, SessionHandle};
use tokio::sync::Mutex;
use url::Url;
use uuid::Uuid;

use crate::amqp::dial::{Dialer, close_quietly, connect, connection_is_broken};
use crate::amqp::error::LinkError;

/// A session from the pool: the enrollment's own, or one its link shares with others.
pub(crate) enum PoolSession {
    Own(SessionHandle<()>),
    Shared(Arc<SharedSession>),
}

/// Connections one slot may grow to: a bound for a broker that advertises a tiny channel-max.
/// RabbitMQ 4.0 takes 64 sessions per connection, so one slot carries up to 65,536 sessions;
/// past that, an enrollment's link fails naming the channel-max and is retried.
pub const MAX_CONNECTIONS_PER_SLOT: usize = 1024;

/// A fixed set of slots, each a growing list of shared connections, opened on first use and
/// reopened once closed or broken. A session the broker refuses on a live connection leaves
/// the connection in place.
pub struct ConnectionPool {
    slots: Vec<Mutex<Vec<Option<PooledConnection>>>>,
    links_per_session: usize,
}

struct PooledConnection {
    connection: ConnectionHandle<()>,
    /// Sessions several enrollments' links share (empty unless `links_per_session` > 1).
    shared: Vec<Arc<SharedSession>>,
}

/// A session several enrollments' links live on. The pool holds one reference and every
/// lease one more, so the number of links on it is the reference count less one.
pub struct SharedSession {
    handle: Mutex<SessionHandle<()>>,
}

impl SharedSession {
    /// The session, held while a link attaches on it.
    pub(crate) async fn lock(&self) -> tokio::sync::MutexGuard<'_, SessionHandle<()>> {
        self.handle.lock().await
    }

    /// Ended by either side (a session error ends every link on it): not to be handed out.
    /// A session busy attaching a link is taken as alive.
    fn is_ended(&self) -> bool {
        self.handle.try_lock().is_ok_and(|s| s.is_ended())
    }
}

impl ConnectionPool {
    /// `size` slots; `links_per_session` links at most on one session (1: a session each).
    pub fn new(size: usize, links_per_session: usize) -> Self {
        Self {
            slots: (0..size.max(1)).map(|_| Mutex::new(Vec::new())).collect(),
            links_per_session: links_per_session.max(1),
        }
    }

    /// An enrollment always lands on the same slot, so its container id (which names a
    /// durable subscription on Artemis) is stable while the pool size is.
    fn slot_of(&self, enrollment: Uuid) -> usize {
        (enrollment.as_u128() % self.slots.len() as u128) as usize
    }

    /// A session for `enrollment` on its slot: a shared session with room, else a new session
    /// on the first connection with a channel free, else a new connection.
    pub(crate) async fn session(
        &self,
        enrollment: Uuid,
        url: &Url,
        dialer: &Dialer,
    ) -> Result<PoolSession, LinkError> {
        let index = self.slot_of(enrollment);
        // Held across the connect on purpose: the enrollments of a slot wait for one
        // reconnect instead of each opening a connection of its own.
        let mut slot = self.slots[index].lock().await;
        for k in 0..slot.len() {
            // A connection whose event loop has stopped serves no one: replace it without
            // trying.
            if slot[k].as_ref().is_some_and(|p| p.connection.is_closed())
                && let Some(dead) = slot[k].take()
            {
                close_quietly(dead.connection).await;
            }
            let Some(pooled) = slot[k].as_mut() else {
                continue;
            };
            if let Some(lease) = self.room_on_shared(pooled) {
                return Ok(lease);
            }
            match Session::begin(&mut pooled.connection).await {
                Ok(session) => return Ok(self.lease(pooled, session)),
                // Full: every channel the broker agreed to is taken; the next one may have room.
                Err(BeginError::LocalChannelMaxReached) => continue,
                Err(e) if !connection_is_broken(&pooled.connection, &e) => {
                    // Only this enrollment's session was refused; the sessions of the other
                    // enrollments on this connection are fine and must not be torn down.
                    tracing::warn!(
                        slot = index,
                        connection = k,
                        error = %e,
                        "no session on the pooled connection for this enrollment; the connection stays open for the others"
                    );
                    return Err(e.into());
                }
                Err(e) => {
                    tracing::info!(slot = index, connection = k, error = %e, "pooled connection is broken; reopening it");
                    if let Some(dead) = slot[k].take() {
                        close_quietly(dead.connection).await;
                    }
                }
            }
        }
        // Every live connection is full: reopen the first empty place, else add one.
        let k = match slot.iter().position(Option::is_none) {
            Some(k) => k,
            None if slot.len() < MAX_CONNECTIONS_PER_SLOT => {
                if !slot.is_empty() {
                    tracing::info!(
                        slot = index,
                        connection = slot.len(),
                        "every connection of the pool slot carries as many sessions as the broker allows; opening another"
                    );
                }
                slot.push(None);
                slot.len() - 1
            }
            None => return Err(BeginError::LocalChannelMaxReached.into()),
        };
        let mut connection = connect(url, dialer, &pooled_container_id(index, k)).await?;
        match Session::begin(&mut connection).await {
            Ok(session) => {
                let pooled = slot[k].insert(PooledConnection {
                    connection,
                    shared: Vec::new(),
                });
                Ok(self.lease(pooled, session))
            }
            Err(e) => {
                // A live connection stays in the slot for the next enrollment that needs one.
                if connection_is_broken(&connection, &e) {
                    close_quietly(connection).await;
                } else {
                    slot[k] = Some(PooledConnection {
                        connection,
                        shared: Vec::new(),
                    });
                }
                Err(e.into())
            }
        }
    }

    /// A lease on a shared session of `pooled` that has room for one more link, if any.
    fn room_on_shared(&self, pooled: &mut PooledConnection) -> Option<PoolSession> {
        if self.links_per_session <= 1 {
            return None;
        }
        pooled.shared.retain(|s| !s.is_ended());
        pooled
            .shared
            .iter()
            // The pool's own reference plus one per link.
            .find(|s| Arc::strong_count(s) <= self.links_per_session)
            .map(|s| PoolSession::Shared(Arc::clone(s)))
    }

    /// The lease for a session just begun on `pooled`: shared from now on when links share.
    fn lease(&self, pooled: &mut PooledConnection, session: SessionHandle<()>) -> PoolSession {
        if self.links_per_session <= 1 {
            return PoolSession::Own(session);
        }
        let shared = Arc::new(SharedSession {
            handle: Mutex::new(session),
        });
        pooled.shared.push(Arc::clone(&shared));
        PoolSession::Shared(shared)
    }

    /// Closes every pooled connection (shutdown), which ends the sessions on them.
    pub(crate) async fn close(&self) {
        for slot in &self.slots {
            for pooled in slot.lock().await.drain(..).flatten() {
                close_quietly(pooled.connection).await;
            }
        }
    }
}

/// The container id of a slot's `k`-th connection: the first keeps the name it always had.
fn pooled_container_id(slot: usize, k: usize) -> String {
    if k == 0 {
        format!("hot-potato-pool-{slot}")
    } else {
        format!("hot-potato-pool-{slot}-{k}")
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::amqp::connection::BrokerSettings;
    use crate::amqp::dial::Dialer;
    use hot_potato_testkit::peer::Peer;

    /// Broker settings whose connections go to the in-memory `peer`, through `pool`.
    fn on_peer(peer: &Arc<Peer>, pool: ConnectionPool) -> BrokerSettings {
        let dial = Arc::clone(peer);
        BrokerSettings {
            url: Url::parse("amqp://in-memory-peer").expect("url"),
            connect_timeout: Duration::from_secs(10),
            pool: Some(pool),
            dialer: Dialer::Stream(Arc::new(move || dial.dial())),
            max_message_size: 1024,
        }
    }

    /// The in-memory peer advertises channel-max 0: each connection carries one session, so
    /// the slot grows a connection per session instead of asking a full one for more, and a
    /// channel freed on an existing connection is used before a new connection is opened.
    #[tokio::test]
    async fn a_full_pooled_connection_makes_the_slot_open_another() {
        use hot_potato_testkit::peer::{FrameBody, PeerConfig};
        let peer = Arc::new(Peer::start(PeerConfig {
            channel_max: 0,
            ..PeerConfig::default()
        }));
        let broker = on_peer(&peer, ConnectionPool::new(1, 1));
        let mut sessions = Vec::new();
        for name in ["a", "b", "c"] {
            sessions.push(
                broker
                    .session(Uuid::new_v4(), name)
                    .await
                    .expect("a session"),
            );
        }
        let container_ids = |peer: &Peer| -> Vec<String> {
            peer.frames()
                .iter()
                .filter_map(|f| match &f.body {
                    FrameBody::Open(open) => Some(open.container_id.clone()),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(
            container_ids(&peer),
            [
                "hot-potato-pool-0",
                "hot-potato-pool-0-1",
                "hot-potato-pool-0-2"
            ]
        );

        assert!(
            peer.frames().iter().all(|f| f.as_close().is_none()),
            "no connection was closed"
        );
        // The second connection's channel is freed: the next session takes it.
        sessions.remove(1).end().await;
        let next = broker
            .session(Uuid::new_v4(), "d")
            .await
            .expect("a session once a channel is free");
        assert_eq!(container_ids(&peer).len(), 3, "no fourth connection");
        assert_eq!(peer.live_connections(), 3);
        next.end().await;
        for s in sessions {
            s.end().await;
        }
        broker.close_pool().await;
    }

    /// With two links per session, three leases take two sessions on one connection; letting
    /// a shared lease go ends nothing, and the room it leaves is used before a new session.
    #[tokio::test]
    async fn links_share_a_session_up_to_the_bound() {
        use hot_potato_testkit::peer::{FrameBody, PeerConfig};
        let peer = Arc::new(Peer::start(PeerConfig::default()));
        let broker = on_peer(&peer, ConnectionPool::new(1, 2));
        let begins = |peer: &Peer| {
            peer.frames()
                .iter()
                .filter(|f| matches!(f.body, FrameBody::Begin(_)))
                .count()
        };
        let mut leases = Vec::new();
        for _ in 0..3 {
            let lease = broker
                .session(Uuid::new_v4(), "unused")
                .await
                .expect("lease");
            assert!(lease.is_shared());
            leases.push(lease);
        }
        assert_eq!(
            begins(&peer),
            2,
            "two links on the first session, one on the second"
        );
        assert_eq!(peer.live_connections(), 1);
        leases.remove(0).end().await;
        assert!(
            peer.frames().iter().all(|f| f.as_end().is_none()),
            "a shared session outlives the link that let it go"
        );
        for _ in 0..2 {
            let lease = broker.session(Uuid::new_v4(), "unused").await;
            leases.push(lease.expect("lease"));
        }
        assert_eq!(
            begins(&peer),
            2,
            "the freed place and the second session's room"
        );
        leases.push(
            broker
                .session(Uuid::new_v4(), "unused")
                .await
                .expect("lease"),
        );
        assert_eq!(begins(&peer), 3, "both sessions full: a third");
        for lease in leases {
            lease.end().await;
        }
        broker.close_pool().await;
    }

    #[test]
    fn an_enrollment_keeps_its_slot() {
        let pool = ConnectionPool::new(8, 1);
        let id = Uuid::new_v4();
        assert_eq!(pool.slot_of(id), pool.slot_of(id));
        assert!(pool.slot_of(id) < 8);
    }
}
