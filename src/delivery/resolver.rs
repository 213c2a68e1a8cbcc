//! The HTTP client's resolver: every address a target's name resolves to is checked against
//! the target rules when the connection is made, not only when the name was enrolled, so a
//! name that later points at a metadata or (with `TARGET_DENY_PRIVATE`) a private address is
//! never connected to. IP-literal targets skip resolution; they are checked when enrolled and
//! loaded.

use std::net::SocketAddr;
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use crate::enrollment::target::TargetPolicy;

/// A connection the target rules refused; found in a failed POST's error chain.
#[derive(Debug, thiserror::Error)]
#[error("target blocked: {name} {reason}")]
pub struct TargetBlocked {
    name: String,
    reason: String,
}

/// The system resolver (getaddrinfo) with the target rules applied to its answers.
pub struct GuardedResolver {
    policy: Arc<TargetPolicy>,
}

impl GuardedResolver {
    pub fn new(policy: TargetPolicy) -> Self {
        Self {
            policy: Arc::new(policy),
        }
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = Arc::clone(&self.policy);
        let name = name.as_str().to_string();
        Box::pin(async move {
            match resolve_allowed(&policy, &name, 0).await {
                Ok(allowed) => Ok(Box::new(allowed.into_iter()) as Addrs),
                Err(ResolveError::Blocked(blocked)) => Err(Box::new(blocked) as _),
                Err(ResolveError::Lookup(e)) => Err(Box::new(e) as _),
            }
        })
    }
}

/// Why a name gave no address to connect to.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Blocked(#[from] TargetBlocked),
    #[error("dns error: {0}")]
    Lookup(#[from] std::io::Error),
}

/// `name`'s addresses (with `port`) that the rules allow, or the refusal when they allow
/// none of them.
pub async fn resolve_allowed(
    policy: &TargetPolicy,
    name: &str,
    port: u16,
) -> Result<Vec<SocketAddr>, ResolveError> {
    let resolved = tokio::net::lookup_host((name, port)).await?;
    let (allowed, refused) = sort_addresses(policy, resolved);
    if allowed.is_empty()
        && let Some(reason) = refused
    {
        return Err(ResolveError::Blocked(TargetBlocked {
            name: name.to_string(),
            reason,
        }));
    }
    Ok(allowed)
}

/// The addresses the rules allow, and the first refusal. Refused addresses are left out, so
/// a name with one allowed address still works, through that address only.
fn sort_addresses(
    policy: &TargetPolicy,
    resolved: impl Iterator<Item = SocketAddr>,
) -> (Vec<SocketAddr>, Option<String>) {
    let mut allowed = Vec::new();
    let mut refused = None;
    for address in resolved {
        match policy.check_address(address.ip()) {
            Ok(()) => allowed.push(address),
            Err(reason) => {
                refused.get_or_insert(reason);
            }
        }
    }
    (allowed, refused)
}

/// The refusal in an error's source chain, if the rules refused the connection.
pub fn blocked_in<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a TargetBlocked> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(blocked) = e.downcast_ref::<TargetBlocked>() {
            return Some(blocked);
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_addresses_are_left_out_and_the_first_refusal_kept() {
        let policy = TargetPolicy {
            deny_private: true,
            ..TargetPolicy::default()
        };
        let addrs: Vec<SocketAddr> = ["127.0.0.1:80", "93.184.215.14:80", "[fd00:ec2::254]:80"]
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        let (allowed, refused) = sort_addresses(&policy, addrs.into_iter());
        assert_eq!(
            allowed,
            vec!["93.184.215.14:80".parse::<SocketAddr>().expect("addr")]
        );
        assert!(refused.is_some_and(|r| r.contains("127.0.0.1")));
    }

    #[tokio::test]
    async fn a_name_that_resolves_only_to_refused_addresses_is_blocked() {
        let strict = GuardedResolver::new(TargetPolicy {
            deny_private: true,
            ..TargetPolicy::default()
        });
        let name: Name = "localhost".parse().expect("name");
        let err = match strict.resolve(name).await {
            Ok(_) => panic!("localhost must be refused with deny_private"),
            Err(e) => e,
        };
        let blocked = blocked_in(err.as_ref()).expect("a TargetBlocked");
        assert!(blocked.to_string().contains("localhost"), "{blocked}");
        let open = GuardedResolver::new(TargetPolicy::default());
        let name: Name = "localhost".parse().expect("name");
        assert!(open.resolve(name).await.is_ok());
    }
}
