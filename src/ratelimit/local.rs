//! In-process GCRA buckets (`governor`), one keyed limiter per scope.

use std::{num::NonZeroU32, time::Duration};

use governor::{
    Quota, RateLimiter,
    clock::{Clock, DefaultClock},
    middleware::StateInformationMiddleware,
    state::keyed::DefaultKeyedStateStore,
};

use super::{Scope, Subject, Verdict};

type Keyed =
    RateLimiter<Subject, DefaultKeyedStateStore<Subject>, DefaultClock, StateInformationMiddleware>;

pub struct LocalLimiter {
    /// Indexed by `Scope as usize` (`Scope::ALL` is in declaration order).
    scopes: [(NonZeroU32, Keyed); Scope::ALL.len()],
    clock: DefaultClock,
}

impl LocalLimiter {
    pub fn new(per_minute: impl Fn(Scope) -> NonZeroU32) -> Self {
        let clock = DefaultClock::default();
        let scopes = Scope::ALL.map(|scope| {
            let n = per_minute(scope);
            let limiter = RateLimiter::dashmap_with_clock(Quota::per_minute(n), clock.clone())
                .with_middleware::<StateInformationMiddleware>();
            (n, limiter)
        });
        Self { scopes, clock }
    }

    pub fn check(&self, scope: Scope, subject: &Subject) -> Verdict {
        let (limit, limiter) = &self.scopes[scope as usize];
        let limit = limit.get();
        let emission = Duration::from_secs(60) / limit;
        match limiter.check_key(subject) {
            Ok(state) => {
                let remaining = state.remaining_burst_capacity();
                Verdict {
                    limit,
                    remaining,
                    reset: emission * (limit - remaining),
                    retry_after: None,
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                Verdict {
                    limit,
                    remaining: 0,
                    reset: emission * limit,
                    retry_after: Some(wait.max(Duration::from_millis(1))),
                }
            }
        }
    }

    /// Forgets buckets that are full again (indistinguishable from new ones).
    pub fn cleanup(&self) {
        for (_, limiter) in &self.scopes {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Buckets held in memory, over all scopes.
    pub fn len(&self) -> usize {
        self.scopes.iter().map(|(_, l)| l.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Subject {
        Subject::Ip(s.parse().expect("address"))
    }

    fn limiter(n: u32) -> LocalLimiter {
        LocalLimiter::new(|_| NonZeroU32::new(n).expect("non-zero"))
    }

    #[test]
    fn a_burst_of_n_then_one_per_period() {
        let l = limiter(5);
        for left in (0..5).rev() {
            let v = l.check(Scope::Login, &ip("1.2.3.4"));
            assert!(v.allowed());
            assert_eq!((v.limit, v.remaining), (5, left));
        }
        let refused = l.check(Scope::Login, &ip("1.2.3.4"));
        let wait = refused.retry_after.expect("sixth refused");
        assert!(
            wait > Duration::from_secs(11) && wait <= Duration::from_secs(12),
            "{wait:?}"
        );
        // Another subject, and the same subject in another scope, have their own buckets.
        assert!(l.check(Scope::Login, &ip("1.2.3.5")).allowed());
        assert!(l.check(Scope::Register, &ip("1.2.3.4")).allowed());
    }

    #[test]
    fn idle_buckets_are_forgotten_so_memory_stays_bounded() {
        // 60 000 per minute: a bucket is full again 1 ms after its only request.
        let l = limiter(60_000);
        for i in 0..200_000u32 {
            let address = Subject::Ip(std::net::Ipv4Addr::from(i).into());
            assert!(l.check(Scope::General, &address).allowed());
        }
        assert_eq!(l.len(), 200_000);
        std::thread::sleep(Duration::from_millis(20));
        l.cleanup();
        assert!(l.is_empty(), "{} buckets left", l.len());
    }
}
