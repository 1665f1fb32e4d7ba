//! Leader election through a `coordination.k8s.io` Lease: only the holder reconciles, and a
//! standby replica takes over once the holder has not renewed for a lease duration.
//!
//! Expiry is judged by the standby's own clock from when it last saw the Lease *change*
//! (its resourceVersion), never by comparing the holder's renewTime with the local clock, so
//! clock skew between nodes cannot cut a lease short. Every write carries the resourceVersion
//! it was decided on: two candidates racing for an expired lease cannot both win.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client};

use crate::Error;

/// What a candidate does about the Lease it just read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No Lease yet: create it, holding it.
    Create,
    /// Vacant or expired: take it over.
    Take,
    /// Ours: renew it.
    Renew,
    /// Someone else holds it and renews it.
    Wait,
}

/// The candidate's memory of the Lease: its last resourceVersion and when that was first seen.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    version: Option<String>,
    since_ms: i64,
}

/// Judge a Lease read at `now_ms` (the candidate's monotonic clock). `lease` is
/// `(holder, resourceVersion, lease duration)`, or `None` when there is no Lease.
pub fn judge(
    identity: &str,
    lease: Option<(Option<&str>, &str, Duration)>,
    seen: &mut Seen,
    now_ms: i64,
) -> Verdict {
    let Some((holder, version, duration)) = lease else {
        return Verdict::Create;
    };
    match holder {
        Some(h) if h == identity => return Verdict::Renew,
        None | Some("") => return Verdict::Take,
        Some(_) => {}
    }
    if seen.version.as_deref() != Some(version) {
        seen.version = Some(version.to_string());
        seen.since_ms = now_ms;
        return Verdict::Wait;
    }
    if now_ms - seen.since_ms >= duration.as_millis() as i64 {
        Verdict::Take
    } else {
        Verdict::Wait
    }
}

/// Lease timing, as client-go names it.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// How long a lease is good for without renewal.
    pub lease_duration: Duration,
    /// A leader that could not renew for this long gives up (less than the lease duration,
    /// so it stops before anyone may take over).
    pub renew_deadline: Duration,
    /// Time between attempts.
    pub retry_period: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// One candidate for one Lease.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    epoch: Instant,
}

impl Elector {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timing: Timing,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            timing,
            epoch: Instant::now(),
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn now_ms(&self) -> i64 {
        self.epoch.elapsed().as_millis() as i64
    }

    fn spec(&self, previous: Option<&LeaseSpec>, taking: bool) -> LeaseSpec {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let transitions = previous.and_then(|s| s.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.timing.lease_duration.as_secs().max(1) as i32),
            acquire_time: if taking {
                Some(now.clone())
            } else {
                previous.and_then(|s| s.acquire_time.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(if taking { transitions + 1 } else { transitions }),
            ..Default::default()
        }
    }

    /// One round: read the Lease, act on the verdict. Returns whether we hold it now.
    async fn round(&self, seen: &mut Seen) -> Result<bool, kube::Error> {
        let lease = self.api.get_opt(&self.name).await?;
        let view = lease.as_ref().map(|l| {
            let spec = l.spec.as_ref();
            (
                spec.and_then(|s| s.holder_identity.as_deref()),
                l.metadata.resource_version.as_deref().unwrap_or(""),
                Duration::from_secs(
                    spec.and_then(|s| s.lease_duration_seconds)
                        .unwrap_or(self.timing.lease_duration.as_secs() as i32)
                        .max(1) as u64,
                ),
            )
        });
        let verdict = judge(&self.identity, view, seen, self.now_ms());
        let pp = PostParams::default();
        let result = match (verdict, lease) {
            (Verdict::Wait, _) => return Ok(false),
            (Verdict::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(self.spec(None, true)),
                };
                self.api.create(&pp, &lease).await.map(|_| ())
            }
            (Verdict::Take | Verdict::Renew, Some(mut lease)) => {
                let taking = verdict == Verdict::Take;
                lease.spec = Some(self.spec(lease.spec.as_ref(), taking));
                // Carries the resourceVersion that was judged: a lost race is a 409.
                self.api.replace(&self.name, &pp, &lease).await.map(|_| ())
            }
            (Verdict::Take | Verdict::Renew, None) => unreachable!("judged an existing lease"),
        };
        match result {
            Ok(()) => {
                if verdict == Verdict::Take || verdict == Verdict::Create {
                    tracing::info!(identity = %self.identity, lease = %self.name, "acquired the leader lease");
                }
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Wait until this candidate holds the Lease.
    pub async fn acquire(&self) {
        let mut seen = Seen::default();
        loop {
            match tokio::time::timeout(self.timing.lease_duration, self.round(&mut seen)).await {
                Ok(Ok(true)) => return,
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "leader election: reading the lease failed")
                }
                Err(_) => tracing::warn!("leader election: the API server did not answer"),
            }
            tokio::time::sleep(self.timing.retry_period).await;
        }
    }

    /// Keep renewing; returns (an error) only when the lease is lost: another holder, or no
    /// successful renewal within the renew deadline. Every call is bounded by what is left of
    /// the deadline, so a request that never returns cannot keep a deposed leader acting.
    pub async fn hold(&self) -> Error {
        let mut seen = Seen::default();
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(self.timing.retry_period).await;
            let left = self.timing.renew_deadline.saturating_sub(renewed.elapsed());
            match tokio::time::timeout(left, self.round(&mut seen)).await {
                Ok(Ok(true)) => renewed = Instant::now(),
                Ok(Ok(false)) => {
                    let left = self.timing.renew_deadline.saturating_sub(renewed.elapsed());
                    if let Ok(Ok(Some(l))) =
                        tokio::time::timeout(left, self.api.get_opt(&self.name)).await
                    {
                        let holder = l.spec.and_then(|s| s.holder_identity).unwrap_or_default();
                        if holder != self.identity {
                            return Error::LostLease(format!("now held by {holder:?}"));
                        }
                    }
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "leader election: renewing failed"),
                Err(_) => tracing::warn!("leader election: the renewal did not answer in time"),
            }
            if renewed.elapsed() >= self.timing.renew_deadline {
                return Error::LostLease(format!(
                    "not renewed within the renew deadline ({:?})",
                    self.timing.renew_deadline
                ));
            }
        }
    }

    /// Give the Lease up on a clean shutdown, so a standby takes over at once.
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await {
            let ours = lease
                .spec
                .as_ref()
                .and_then(|s| s.holder_identity.as_deref())
                == Some(self.identity.as_str());
            if ours {
                if let Some(spec) = lease.spec.as_mut() {
                    spec.holder_identity = None;
                }
                match self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => tracing::info!(identity = %self.identity, "released the leader lease"),
                    Err(e) => tracing::warn!(error = %e, "releasing the lease failed"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(15);

    #[test]
    fn no_lease_is_created_and_our_own_is_renewed() {
        let mut seen = Seen::default();
        assert_eq!(judge("a", None, &mut seen, 0), Verdict::Create);
        assert_eq!(
            judge("a", Some((Some("a"), "1", D)), &mut seen, 0),
            Verdict::Renew
        );
        assert_eq!(
            judge("a", Some((None, "1", D)), &mut seen, 0),
            Verdict::Take
        );
        assert_eq!(
            judge("a", Some((Some(""), "1", D)), &mut seen, 0),
            Verdict::Take
        );
    }

    #[test]
    fn a_held_lease_is_taken_only_after_a_full_duration_without_change() {
        let mut seen = Seen::default();
        let held = |v| Some((Some("b"), v, D));
        assert_eq!(judge("a", held("1"), &mut seen, 1_000), Verdict::Wait);
        assert_eq!(judge("a", held("1"), &mut seen, 15_999), Verdict::Wait);
        // The holder renewed: the clock starts again from this sighting.
        assert_eq!(judge("a", held("2"), &mut seen, 16_000), Verdict::Wait);
        assert_eq!(judge("a", held("2"), &mut seen, 30_999), Verdict::Wait);
        assert_eq!(judge("a", held("2"), &mut seen, 31_000), Verdict::Take);
    }

    #[test]
    fn a_lease_first_seen_late_still_gets_a_full_duration() {
        // The holder's renewTime is not trusted: a candidate that starts late waits a whole
        // duration from its own first sighting.
        let mut seen = Seen::default();
        assert_eq!(
            judge("a", Some((Some("b"), "9", D)), &mut seen, 1_000_000),
            Verdict::Wait
        );
        assert_eq!(
            judge("a", Some((Some("b"), "9", D)), &mut seen, 1_014_999),
            Verdict::Wait
        );
        assert_eq!(
            judge("a", Some((Some("b"), "9", D)), &mut seen, 1_015_000),
            Verdict::Take
        );
    }
}
