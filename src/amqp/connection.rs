//! The broker settings every link uses, and where each enrollment's session lives (its lease).
//! By default every enrollment owns its connection, so a broker-side problem on one connection
//! touches one enrollment. With `AMQP_CONNECTION_POOL=N` enrollments share connections of the
//! pool instead (a session and receiver each, or a receiver on a shared session), which large
//! fleets need: fewer sockets, broker processes and heartbeats, at the price that a connection
//! failure or a flow-controlled connection affects every enrollment on it.

use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::Session;
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::session::SessionHandle;
use tokio::sync::MutexGuard;
use url::Url;
use uuid::Uuid;

pub use crate::amqp::dial::Dialer;
pub(crate) use crate::amqp::dial::END_TIMEOUT;
use crate::amqp::dial::{close_quietly, connect};
use crate::amqp::error::LinkError;
pub use crate::amqp::pool::ConnectionPool;
use crate::amqp::pool::{PoolSession, SharedSession};

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

/// An enrollment's session: on its own connection, on a pooled connection, or shared with
/// other enrollments' links on a pooled connection (`AMQP_LINKS_PER_SESSION`).
pub struct SessionLease {
    hold: Hold,
}

enum Hold {
    /// The session and the connection under it, both this enrollment's.
    Own {
        session: SessionHandle<()>,
        connection: ConnectionHandle<()>,
    },
    /// A session of its own on a pooled connection.
    Pooled(SessionHandle<()>),
    /// A session other enrollments' links use too; the pool keeps it.
    Shared(Arc<SharedSession>),
}

/// Mutable access to a lease's session, for attaching a link on it.
pub enum SessionGuard<'a> {
    Mine(&'a mut SessionHandle<()>),
    Shared(MutexGuard<'a, SessionHandle<()>>),
}

impl std::ops::Deref for SessionGuard<'_> {
    type Target = SessionHandle<()>;
    fn deref(&self) -> &Self::Target {
        match self {
            SessionGuard::Mine(session) => session,
            SessionGuard::Shared(guard) => guard,
        }
    }
}

impl std::ops::DerefMut for SessionGuard<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        match self {
            SessionGuard::Mine(session) => session,
            SessionGuard::Shared(guard) => guard,
        }
    }
}

impl SessionLease {
    /// Whether other enrollments' links live on this session: then ending this link must
    /// leave the session alone.
    pub fn is_shared(&self) -> bool {
        matches!(self.hold, Hold::Shared(_))
    }

    /// The session, to attach a link on (a shared one is held only for the attach).
    pub async fn session(&mut self) -> SessionGuard<'_> {
        match &mut self.hold {
            Hold::Own { session, .. } | Hold::Pooled(session) => SessionGuard::Mine(session),
            Hold::Shared(shared) => SessionGuard::Shared(shared.lock().await),
        }
    }

    /// Ends the session, or closes the connection when it is this enrollment's own (which
    /// ends its session too); a shared session is only let go. Bounded in time: fe2o3-amqp
    /// 0.18's session task busy-polls once its links are gone until the broker's `end`
    /// arrives, so it must not be left waiting on a broker that never answers.
    pub async fn end(self) {
        match self.hold {
            Hold::Own { mut connection, .. } => {
                if tokio::time::timeout(END_TIMEOUT, connection.close())
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        "the broker did not confirm closing the connection; dropping it"
                    );
                }
            }
            Hold::Pooled(mut session) => {
                if tokio::time::timeout(END_TIMEOUT, session.end())
                    .await
                    .is_err()
                {
                    tracing::warn!("the broker did not confirm ending the session; dropping it");
                }
            }
            Hold::Shared(_) => {}
        }
    }
}

impl BrokerSettings {
    /// A session for `enrollment`: on its own connection, or from the pool.
    pub async fn session(
        &self,
        enrollment: Uuid,
        own_container_id: &str,
    ) -> Result<SessionLease, LinkError> {
        if let Some(pool) = &self.pool {
            let hold = match pool.session(enrollment, &self.url, &self.dialer).await? {
                PoolSession::Own(session) => Hold::Pooled(session),
                PoolSession::Shared(shared) => Hold::Shared(shared),
            };
            return Ok(SessionLease { hold });
        }
        let mut connection = connect(&self.url, &self.dialer, own_container_id).await?;
        match Session::begin(&mut connection).await {
            Ok(session) => Ok(SessionLease {
                hold: Hold::Own {
                    session,
                    connection,
                },
            }),
            Err(e) => {
                close_quietly(connection).await;
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
            pool.close().await;
        }
    }
}
