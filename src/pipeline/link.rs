//! The seam between the worker and the broker: what the pipeline needs of a link, and of
//! whatever opens one. [`AmqpOpener`] is the real thing; tests drive the worker through fakes
//! or through an in-memory AMQP peer.

use std::future::Future;
use std::sync::Arc;

use fe2o3_amqp::link::delivery::DeliveryInfo;

use crate::amqp::connection::BrokerSettings;
use crate::amqp::error::LinkError;
use crate::amqp::link::{AmqpLink, Incoming};
use crate::amqp::outcome::Disposition;
use crate::enrollment::outcome::{FailureOutcome, FailureOutcomePolicy};
use crate::enrollment::record::Enrollment;

/// An attached receiver link.
pub trait Link: Send + 'static {
    /// What identifies a delivery for its settlement.
    type Delivery: Send + 'static;

    /// The outcome a failed delivery is handed back with, fixed at attach.
    fn failure_outcome(&self) -> FailureOutcome;
    /// The next delivery. Must be cancel-safe: it sits in the worker's `select!`.
    fn recv(&mut self) -> impl Future<Output = Result<Incoming<Self::Delivery>, LinkError>> + Send;
    fn settle(
        &mut self,
        delivery: Self::Delivery,
        disposition: Disposition,
    ) -> impl Future<Output = Result<(), LinkError>> + Send;
    /// Accepts several deliveries, in as few dispositions as the link can.
    fn accept_all(
        &mut self,
        deliveries: Vec<Self::Delivery>,
    ) -> impl Future<Output = Result<(), LinkError>> + Send;
    fn set_credit(&mut self, credit: u32) -> impl Future<Output = Result<(), LinkError>> + Send;
    /// Ends the link keeping a durable subscription (`closed=false`).
    fn detach(self) -> impl Future<Output = ()> + Send;
    /// Ends the link for good (`closed=true`): DELETE only.
    fn close(self) -> impl Future<Output = ()> + Send;
    /// Lets the link go after a failure: what is unsettled returns to the broker.
    fn abandon(self) -> impl Future<Output = ()> + Send;
}

/// Opens links for enrollments.
pub trait LinkOpener: Send + Sync + 'static {
    type Link: Link;
    fn open(
        &self,
        enrollment: &Enrollment,
        credit: u32,
    ) -> impl Future<Output = Result<Self::Link, LinkError>> + Send;
}

/// Opens AMQP receiver links on the configured broker.
pub struct AmqpOpener {
    pub broker: Arc<BrokerSettings>,
    pub failure_policy: FailureOutcomePolicy,
}

impl LinkOpener for AmqpOpener {
    type Link = AmqpLink;
    async fn open(&self, enrollment: &Enrollment, credit: u32) -> Result<AmqpLink, LinkError> {
        AmqpLink::open(&self.broker, enrollment, credit, self.failure_policy).await
    }
}

impl Link for AmqpLink {
    type Delivery = DeliveryInfo;

    fn failure_outcome(&self) -> FailureOutcome {
        AmqpLink::failure_outcome(self)
    }
    async fn recv(&mut self) -> Result<Incoming<DeliveryInfo>, LinkError> {
        AmqpLink::recv(self).await
    }
    async fn settle(
        &mut self,
        delivery: DeliveryInfo,
        disposition: Disposition,
    ) -> Result<(), LinkError> {
        AmqpLink::settle(self, delivery, disposition).await
    }
    async fn accept_all(&mut self, deliveries: Vec<DeliveryInfo>) -> Result<(), LinkError> {
        AmqpLink::accept_all(self, deliveries).await
    }
    async fn set_credit(&mut self, credit: u32) -> Result<(), LinkError> {
        AmqpLink::set_credit(self, credit).await
    }
    async fn detach(self) {
        AmqpLink::detach(self).await
    }
    async fn close(self) {
        AmqpLink::close(self).await
    }
    async fn abandon(self) {
        AmqpLink::abandon(self).await
    }
}
