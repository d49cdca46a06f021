//! Throttling (seed RATE-02..05): the per-device polling limit of 5 operations per 10 s,
//! and an optional service-wide registration rate. Over a limit the device gets 429 with a
//! retry-after. Limits are kept per node: with several nodes, each enforces them for the
//! requests it serves.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::error::ServiceError;

pub struct Throttle {
    polls: DefaultKeyedRateLimiter<String>,
    registrations: Option<DefaultDirectRateLimiter>,
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Throttle(..)")
    }
}

/// Seconds to wait, as an integer the SDKs accept (2 to 5, wire-protocol.md §3.7).
fn retry_after(wait: Duration) -> u32 {
    u32::try_from(wait.as_secs() + 1).unwrap_or(5).clamp(2, 5)
}

impl Throttle {
    pub fn new(registrations_per_minute: Option<u32>) -> Self {
        // 5 at once, then one every 2 s: at most 5 in any 10 s on average.
        let poll_quota = Quota::with_period(Duration::from_secs(2))
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(5).unwrap_or(NonZeroU32::MIN));
        let registrations = registrations_per_minute
            .and_then(NonZeroU32::new)
            .map(|rate| RateLimiter::direct(Quota::per_minute(rate)));
        Self {
            polls: RateLimiter::keyed(poll_quota),
            registrations,
        }
    }

    pub fn admit_poll(&self, registration_id: &str) -> Result<(), ServiceError> {
        self.polls
            .check_key(&registration_id.to_ascii_lowercase())
            .map_err(|not_until| ServiceError::Throttled {
                message: "this device polls more than 5 times in 10 seconds".to_owned(),
                retry_after: retry_after(not_until.wait_time_from(DefaultClock::default().now())),
            })
    }

    pub fn admit_registration(&self) -> Result<(), ServiceError> {
        match &self.registrations {
            Some(limiter) => limiter
                .check()
                .map_err(|not_until| ServiceError::Throttled {
                    message: "the service-wide registration rate is exceeded".to_owned(),
                    retry_after: retry_after(
                        not_until.wait_time_from(DefaultClock::default().now()),
                    ),
                }),
            None => Ok(()),
        }
    }

    pub fn forget_idle(&self) {
        self.polls.retain_recent();
        self.polls.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sixth_poll_in_a_burst_is_throttled() {
        let throttle = Throttle::new(None);
        for _ in 0..5 {
            throttle.admit_poll("Dev-1").unwrap();
        }
        let error = throttle.admit_poll("dev-1").unwrap_err();
        assert_eq!(error.status(), 429);
        assert!(matches!(
            error,
            ServiceError::Throttled {
                retry_after: 2..=5,
                ..
            }
        ));
        throttle.admit_poll("dev-2").unwrap();
        assert!(
            throttle.admit_registration().is_ok(),
            "unlimited by default"
        );
        let limited = Throttle::new(Some(2));
        limited.admit_registration().unwrap();
        limited.admit_registration().unwrap();
        assert_eq!(limited.admit_registration().unwrap_err().status(), 429);
    }
}
