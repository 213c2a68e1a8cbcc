//! The HTTP side: a message as a request, the POST with its bounds, the pure verdict on an
//! answer, the circuit breaker, signing, and the dispatcher that runs one message's attempts.
//! Knows nothing of AMQP links or settlement.
//!
//! - [`request`]: message → POST (body, `Content-Type`, `amqp-*` headers).
//! - [`publish`]: the other direction: HTTP request → message, answer → reply, reply →
//!   HTTP answer.
//! - [`batch`]: several messages as one POST (`delivery.batch`): the body and the answer.
//! - [`post`]: one POST and what came back (the answer's body read up to a bound).
//! - [`plain_http`]: the direct HTTP/1.1 client for plain-HTTP targets, no task of its own.
//! - [`clients`]: which of the two clients an enrollment's target uses.
//! - [`resolver`]: the client's resolver, applying the target rules to every address.
//! - [`verdict`]: status → success, retry, reject, drop or fail.
//! - [`breaker`]: the per-enrollment circuit breaker.
//! - [`signing`]: static headers, credentials, Standard Webhooks signatures.
//! - [`dispatcher`]: one message's attempts, giving a [`DeliveryOutcome`].

pub mod amqp_json;
pub mod batch;
pub mod breaker;
pub mod clients;
pub mod dispatcher;
pub mod plain_http;
pub mod post;
pub mod publish;
pub mod request;
pub mod resolver;
pub mod signing;
pub mod verdict;

pub use dispatcher::{DeliveryOutcome, Dispatcher};
pub use request::PushRequest;
