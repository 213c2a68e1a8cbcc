//! The names and the source an enrollment's link asks for: a stable link name (Artemis names a
//! durable subscription from container id and link name) and the source terminus built from
//! the subscription arguments.

use fe2o3_amqp::types::messaging::{FilterSet, Source, TerminusDurability, TerminusExpiryPolicy};
use fe2o3_amqp::types::primitives::{Symbol, Value};
use fe2o3_amqp_ext::filters::SelectorFilter;

use crate::enrollment::record::{Enrollment, SubscriptionArgs};

/// The stable names an enrollment uses on the broker, so that a durable subscription
/// (named from container id and link name on Artemis) is found again after a restart.
pub fn link_name(enrollment: &Enrollment) -> String {
    format!("hot-potato-{}", enrollment.id)
}

pub fn build_source(queue: &str, args: &SubscriptionArgs) -> Source {
    let mut source = Source::builder().address(queue.to_string());
    if args.durable == Some(true) {
        source = source
            .durable(TerminusDurability::UnsettledState)
            .expiry_policy(TerminusExpiryPolicy::Never);
    }
    if let Some(selector) = &args.selector {
        let mut filter = FilterSet::new();
        filter.insert(
            Symbol::from("apache.org:selector-filter:string"),
            Value::Described(Box::new(SelectorFilter::new(selector.clone()).into())),
        );
        source = source.filter(filter);
    }
    if let Some(capabilities) = &args.capabilities {
        source = source.capabilities(
            capabilities
                .iter()
                .map(|c| Symbol::from(c.as_str()))
                .collect::<Vec<_>>(),
        );
    }
    source.build()
}
