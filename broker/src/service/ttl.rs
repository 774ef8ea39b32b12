//! The TTL of a grant, and the property that it never exceeds any of its caps.

use time::Duration;

/// The TTL of a grant: the requested TTL (or the default), capped by the broker-wide maximum,
/// by every allowing decision's ceiling (`min(rule.max_ttl, credential.max_ttl)`) and by the
/// time the job has left (GitLab's `exp`). Invariant: never above any of them. Below one second
/// the caller refuses the exchange.
pub(crate) fn effective_ttl(
    requested: Option<Duration>,
    default: Duration,
    grant_max: Duration,
    caps: &[Duration],
    job_left: Option<Duration>,
) -> Duration {
    let mut ttl = requested.unwrap_or(default).min(grant_max);
    for c in caps.iter().chain(job_left.as_ref()) {
        ttl = ttl.min(*c);
    }
    ttl
}

#[cfg(test)]
mod ttl_properties {
    use super::effective_ttl;
    use proptest::prelude::*;
    use time::Duration;

    pub(super) fn secs() -> impl Strategy<Value = Duration> {
        (-86_400i64..30 * 86_400).prop_map(Duration::seconds)
    }

    proptest! {
        #[test]
        fn ttl_never_exceeds_any_cap(
            requested in proptest::option::of(secs()),
            default in secs(),
            grant_max in secs(),
            caps in proptest::collection::vec(secs(), 0..5),
            job_left in proptest::option::of(secs()),
        ) {
            let ttl = effective_ttl(requested, default, grant_max, &caps, job_left);
            prop_assert!(ttl <= grant_max);
            prop_assert!(ttl <= requested.unwrap_or(default));
            for c in &caps {
                prop_assert!(ttl <= *c);
            }
            if let Some(j) = job_left {
                prop_assert!(ttl <= j);
            }
            // And it is one of the inputs, not something smaller made up.
            let mut inputs = vec![requested.unwrap_or(default), grant_max];
            inputs.extend(&caps);
            inputs.extend(job_left);
            prop_assert!(inputs.contains(&ttl));
        }
    }
}
