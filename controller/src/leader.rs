//! Leader election on a coordination.k8s.io Lease, exclusive by construction.
//!
//! Every change of the Lease is a replace with the resourceVersion this replica last read, so
//! of two candidates racing for an expired Lease exactly one wins (the other gets a conflict).
//! A follower judges expiry by its own clock: the Lease must stay unchanged for
//! `lease_duration` from when it saw it, so clock skew between replicas does not matter. A
//! leader stops writing once `renew_deadline` (shorter than the lease duration) has passed
//! since the start of its last successful renewal: a hung or failing renewal, or a paused
//! process, cannot keep it writing after another replica could have taken over.

use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;

use crate::config::LeaderElection;

/// Whether this replica may write now; cheap to clone and to ask.
///
/// With leader election, each leadership term gets a view of its own ([`Leadership::new_term`]):
/// it leads while the Lease is renewed *and* its term is the current one. A term's view closes
/// for good when the next term starts, so a reconcile of an ended term never writes again, even
/// when the same process leads again.
#[derive(Clone, Debug)]
pub struct Leadership {
    shared: Option<Arc<Shared>>,
    /// The term this view belongs to (0: the process's own view, which follows the Lease alone).
    term: u64,
}

#[derive(Debug, Default)]
struct Shared {
    until: Mutex<Option<Instant>>,
    /// The current term.
    epoch: AtomicU64,
}

impl Leadership {
    /// A replica without leader election always leads.
    pub fn always() -> Self {
        Self {
            shared: None,
            term: 0,
        }
    }

    /// A replica that leads only while its leader election says so.
    pub(crate) fn elected() -> Self {
        Self {
            shared: Some(Arc::default()),
            term: 0,
        }
    }

    /// Whether leader election decides (else this replica always leads).
    pub fn is_elected(&self) -> bool {
        self.shared.is_some()
    }

    /// True while the last renewal is younger than the renew deadline, and (for a term's view)
    /// while its term is the current one.
    pub fn is_leading(&self) -> bool {
        match &self.shared {
            None => true,
            Some(shared) => {
                (self.term == 0 || shared.epoch.load(Ordering::Acquire) == self.term)
                    && shared
                        .until
                        .lock()
                        .is_some_and(|until| Instant::now() < until)
            }
        }
    }

    /// Starts a new term and returns its view; every earlier term's view stops leading.
    pub(crate) fn new_term(&self) -> Self {
        match &self.shared {
            None => self.clone(),
            Some(shared) => Self {
                shared: Some(shared.clone()),
                term: shared.epoch.fetch_add(1, Ordering::AcqRel) + 1,
            },
        }
    }

    /// Ends every term: no view leads until the next [`Leadership::new_term`].
    pub(crate) fn end_terms(&self) {
        if let Some(shared) = &self.shared {
            shared.epoch.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn lead_until(&self, until: Option<Instant>) {
        if let Some(shared) = &self.shared {
            *shared.until.lock() = until;
        }
    }

    fn until(&self) -> Option<Instant> {
        self.shared.as_ref().and_then(|shared| *shared.until.lock())
    }
}

/// When this replica last completed a round about the Lease with the API server (read it, or
/// wrote it): what the `controller` command's `/readyz` reports on.
#[derive(Debug, Clone, Default)]
pub struct LeaseContact(Arc<Mutex<Option<Instant>>>);

impl LeaseContact {
    fn record(&self) {
        *self.0.lock() = Some(Instant::now());
    }

    /// How long ago the last round completed; `None` before the first.
    pub fn since(&self) -> Option<Duration> {
        self.0.lock().map(|at| at.elapsed())
    }
}

/// A candidate for the Lease.
pub struct Elector {
    api: Api<Lease>,
    election: LeaderElection,
    /// The configured identity with a random suffix: two processes never share it.
    identity: String,
    /// The field manager of this replica's writes to the Lease.
    manager: String,
    leadership: Leadership,
    /// The Lease as last read or written, and when this replica first saw that version.
    observed: Option<(Lease, Instant)>,
    contact: LeaseContact,
}

impl Elector {
    /// A candidate whose renewals keep `leadership` (from [`Leadership::elected`]) current, and
    /// that records each completed round in `contact`.
    pub fn new(
        client: Client,
        election: LeaderElection,
        leadership: Leadership,
        contact: LeaseContact,
    ) -> Self {
        let suffix = format!("{:08x}", fastrand::u32(..));
        let identity = format!("{}_{suffix}", election.identity);
        Self {
            manager: format!("seinode-tls-controller_{suffix}"),
            api: Api::namespaced(client, &election.lease_namespace),
            election,
            identity,
            leadership,
            observed: None,
            contact,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Campaigns and renews until `stop` flips to true, publishing whether this replica leads
    /// on `leading`; then releases the Lease if held.
    pub async fn run(mut self, leading: watch::Sender<bool>, mut stop: watch::Receiver<bool>) {
        let retry = self.election.retry_period;
        loop {
            let started = Instant::now();
            let held = tokio::time::timeout(retry, self.try_acquire_or_renew())
                .await
                .unwrap_or_else(|_| Err("the request timed out".to_owned()));
            if held.is_ok() {
                self.contact.record();
            }
            match held {
                Ok(true) => self
                    .leadership
                    .lead_until(Some(started + self.election.renew_deadline)),
                Ok(false) => self.leadership.lead_until(None),
                Err(error) => {
                    tracing::warn!(identity = %self.identity, %error, "leader election: failed to read or update the Lease");
                }
            }
            let now_leading = self.leadership.is_leading();
            if *leading.borrow() != now_leading {
                if now_leading {
                    tracing::info!(identity = %self.identity, "leader election: acquired the Lease");
                } else {
                    tracing::warn!(identity = %self.identity, "leader election: not leading (the Lease is another's, or could not be renewed in time)");
                }
                leading.send_replace(now_leading);
            }
            // Wake at the deadline too, to step down on time if renewals hang.
            let deadline = self
                .leadership
                .until()
                .map(|u| u.saturating_duration_since(Instant::now()));
            let wait = started + retry;
            let wait = wait.saturating_duration_since(Instant::now());
            let wait = deadline.map_or(wait, |d| wait.min(d + Duration::from_millis(1)));
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|stop| *stop) => break,
            }
        }
        if self.leadership.is_leading() {
            self.leadership.lead_until(None);
            leading.send_replace(false);
            if let Err(error) = tokio::time::timeout(retry, self.release())
                .await
                .unwrap_or_else(|_| Err("the request timed out".to_owned()))
            {
                tracing::warn!(identity = %self.identity, %error, "leader election: failed to release the Lease");
            }
        }
    }

    /// One round: returns whether this replica holds the Lease afterwards.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, String> {
        let name = self.election.lease_name.clone();
        let current = match self.api.get_opt(&name).await.map_err(|e| e.to_string())? {
            Some(lease) => lease,
            None => {
                let created = self.api.create(&self.params(), &self.record(None)).await;
                return match created {
                    Ok(lease) => {
                        self.observe(lease);
                        Ok(true)
                    }
                    Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                    Err(error) => Err(error.to_string()),
                };
            }
        };
        self.observe(current.clone());
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        let mine = holder == Some(self.identity.as_str());
        if !mine && holder.is_some() && !self.expired(&spec) {
            return Ok(false);
        }
        let mut next = self.record(Some(&current));
        next.metadata.resource_version = current.metadata.resource_version.clone();
        match self.api.replace(&name, &self.params(), &next).await {
            Ok(lease) => {
                self.observe(lease);
                Ok(true)
            }
            // Another replica changed it first: it won.
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(error.to_string()),
        }
    }

    /// Remembers the Lease, restarting the expiry clock only when it changed.
    fn observe(&mut self, lease: Lease) {
        let same = self.observed.as_ref().is_some_and(|(seen, _)| {
            seen.metadata.resource_version == lease.metadata.resource_version
        });
        if !same {
            self.observed = Some((lease, Instant::now()));
        }
    }

    /// Whether the holder has not renewed for a whole lease duration, by this replica's clock.
    fn expired(&self, spec: &LeaseSpec) -> bool {
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.election.lease_duration, Duration::from_secs);
        self.observed
            .as_ref()
            .is_some_and(|(_, seen)| seen.elapsed() >= duration)
    }

    /// The Lease as this replica writes it when acquiring or renewing.
    fn record(&self, current: Option<&Lease>) -> Lease {
        let now = MicroTime(Timestamp::now());
        let spec = current.and_then(|l| l.spec.clone()).unwrap_or_default();
        let renewing = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let transitions = spec.lease_transitions.unwrap_or_default();
        Lease {
            metadata: ObjectMeta {
                name: Some(self.election.lease_name.clone()),
                namespace: Some(self.election.lease_namespace.clone()),
                ..current.map(|l| l.metadata.clone()).unwrap_or_default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(
                    i32::try_from(self.election.lease_duration.as_secs().max(1)).unwrap_or(15),
                ),
                acquire_time: if renewing {
                    spec.acquire_time.clone()
                } else {
                    Some(now.clone())
                },
                renew_time: Some(now),
                lease_transitions: Some(if renewing || current.is_none() {
                    transitions
                } else {
                    transitions + 1
                }),
                ..spec
            }),
        }
    }

    /// Gives the Lease up so another replica takes it at once.
    async fn release(&mut self) -> Result<(), String> {
        let Some((lease, _)) = self.observed.clone() else {
            return Ok(());
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        let released = Lease {
            spec: Some(LeaseSpec {
                holder_identity: None,
                lease_duration_seconds: Some(1),
                ..spec
            }),
            ..lease
        };
        self.api
            .replace(&self.election.lease_name, &self.params(), &released)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn params(&self) -> PostParams {
        PostParams {
            field_manager: Some(self.manager.clone()),
            ..PostParams::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A term's view leads only while its term is the current one: once the next term starts
    /// (the same process leading again), a reconcile left over from the old term is fenced off.
    #[test]
    fn an_ended_term_never_leads_again_even_when_the_process_does() {
        let leadership = Leadership::elected();
        leadership.lead_until(Some(Instant::now() + Duration::from_secs(60)));
        let first = leadership.new_term();
        assert!(first.is_leading() && leadership.is_leading());

        leadership.end_terms();
        assert!(!first.is_leading(), "its term ended");
        assert!(leadership.is_leading(), "the process still holds the Lease");

        let second = leadership.new_term();
        assert!(second.is_leading());
        assert!(!first.is_leading(), "a new term does not reopen an old one");

        leadership.lead_until(None);
        assert!(!second.is_leading() && !leadership.is_leading());
        assert!(Leadership::always().new_term().is_leading());
    }
}
