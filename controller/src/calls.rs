//! Sidecar calls apart from the reconciles.
//!
//! A reconcile that finds its node due for a probe or for `mark-ready` starts the call and goes
//! on without waiting for it: at most one call is in flight per node, and at most
//! `--max-concurrent-probes` at once. A finished call keeps its result for the node and wakes
//! it; the node's next reconcile takes the result (each is used once). So no sidecar, however
//! slow, holds a reconcile, a worker, or any other node's decision.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::runtime::reflector::ObjectRef;
use seinode_tls_crds::SeiNode;
use tokio::sync::{Semaphore, mpsc};

use crate::decide::Outcome;
use crate::sidecar::ProbeResult;

/// What a call is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// `GET /v0/healthz`, for `SidecarReady`.
    Probe,
    /// The plan's `MarkSidecarReady`.
    MarkReady,
}

/// A finished call's result.
#[derive(Debug, Clone, PartialEq)]
pub enum Finished {
    Probe(ProbeResult),
    MarkReady(Outcome),
}

impl Finished {
    fn kind(&self) -> CallKind {
        match self {
            Finished::Probe(_) => CallKind::Probe,
            Finished::MarkReady(_) => CallKind::MarkReady,
        }
    }
}

#[derive(Default)]
struct NodeCalls {
    in_flight: Option<CallKind>,
    done: Option<Finished>,
    /// When the last call of each kind finished: a new one waits its gap after it.
    finished_at: HashMap<CallKindKey, Instant>,
    /// A wake-up is due at the end of a gap (a call refused for its gap is asked again then).
    wake_due: bool,
}

type CallKindKey = u8;

fn key(kind: CallKind) -> CallKindKey {
    match kind {
        CallKind::Probe => 0,
        CallKind::MarkReady => 1,
    }
}

/// The calls of every node of one leadership term.
pub struct SidecarCalls {
    permits: Arc<Semaphore>,
    nodes: Arc<Mutex<HashMap<String, NodeCalls>>>,
    wake: mpsc::UnboundedSender<ObjectRef<SeiNode>>,
}

impl SidecarCalls {
    /// Calls at most `limit` at once; the receiver yields the nodes whose call finished.
    pub fn new(limit: usize) -> (Self, mpsc::UnboundedReceiver<ObjectRef<SeiNode>>) {
        let (wake, woken) = mpsc::unbounded_channel();
        let calls = Self {
            permits: Arc::new(Semaphore::new(limit.max(1))),
            nodes: Arc::default(),
            wake,
        };
        (calls, woken)
    }

    /// The finished result of a `kind` call for node `uid`, taken.
    pub fn take(&self, uid: &str, kind: CallKind) -> Option<Finished> {
        let mut nodes = self.nodes.lock();
        let node = nodes.get_mut(uid)?;
        if node.done.as_ref().map(Finished::kind) == Some(kind) {
            node.done.take()
        } else {
            None
        }
    }

    /// Starts `call` for node `uid` unless a call of the node is in flight, a result waits
    /// to be taken, or its last `kind` call finished less than `gap` ago. Returns at once.
    pub fn start<F>(
        &self,
        uid: &str,
        node: ObjectRef<SeiNode>,
        kind: CallKind,
        gap: Duration,
        call: F,
    ) where
        F: Future<Output = Finished> + Send + 'static,
    {
        {
            let mut nodes = self.nodes.lock();
            let entry = nodes.entry(uid.to_owned()).or_default();
            if entry.in_flight.is_some() || entry.done.is_some() {
                return;
            }
            let wait = entry
                .finished_at
                .get(&key(kind))
                .map(|at| gap.saturating_sub(at.elapsed()))
                .filter(|wait| !wait.is_zero());
            if let Some(wait) = wait {
                // Too soon: the node is woken when the gap ends, so what made it ask now (its
                // pod came up, say) is not left waiting for its next requeue.
                if !entry.wake_due {
                    entry.wake_due = true;
                    let (nodes, wake, uid) =
                        (self.nodes.clone(), self.wake.clone(), uid.to_owned());
                    tokio::spawn(async move {
                        tokio::time::sleep(wait).await;
                        if let Some(entry) = nodes.lock().get_mut(&uid) {
                            entry.wake_due = false;
                        }
                        let _ = wake.send(node);
                    });
                }
                return;
            }
            entry.in_flight = Some(kind);
        }
        let (permits, nodes, wake, uid) = (
            self.permits.clone(),
            self.nodes.clone(),
            self.wake.clone(),
            uid.to_owned(),
        );
        tokio::spawn(async move {
            let Ok(_permit) = permits.acquire_owned().await else {
                return;
            };
            let finished = call.await;
            {
                let mut nodes = nodes.lock();
                let entry = nodes.entry(uid).or_default();
                entry.in_flight = None;
                entry.finished_at.insert(key(kind), Instant::now());
                entry.done = Some(finished);
            }
            // The term may be over (nobody listens): nothing to wake then.
            let _ = wake.send(node);
        });
    }

    /// Whether a call of node `uid` is in flight.
    pub fn in_flight(&self, uid: &str) -> bool {
        self.nodes
            .lock()
            .get(uid)
            .is_some_and(|n| n.in_flight.is_some())
    }

    /// Forgets nodes `keep` rejects (deleted ones).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.nodes.lock().retain(|uid, _| keep(uid));
    }

    /// Stops handing out permits: calls not started yet end without calling.
    pub fn close(&self) {
        self.permits.close();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn node_ref() -> ObjectRef<SeiNode> {
        ObjectRef::new("rpc").within("ns")
    }

    /// A call that never ends holds its node's slot of calls and one permit, nothing else: a
    /// second node's call runs, finishes and wakes that node at once.
    #[tokio::test]
    async fn a_call_that_never_ends_holds_nothing_but_its_own_permit() {
        let (calls, mut woken) = SidecarCalls::new(2);
        calls.start("a", node_ref(), CallKind::Probe, Duration::ZERO, async {
            std::future::pending::<Finished>().await
        });
        assert!(calls.in_flight("a"));
        // While it hangs, another call of the same node does not start.
        calls.start("a", node_ref(), CallKind::Probe, Duration::ZERO, async {
            Finished::Probe(ProbeResult::Healthy("second".to_owned()))
        });
        calls.start(
            "b",
            ObjectRef::new("other").within("ns"),
            CallKind::MarkReady,
            Duration::ZERO,
            async { Finished::MarkReady(Outcome::Done) },
        );
        let woke = tokio::time::timeout(Duration::from_secs(5), woken.recv())
            .await
            .expect("the finished call wakes its node")
            .unwrap();
        assert_eq!(woke.name, "other");
        assert_eq!(
            calls.take("b", CallKind::Probe),
            None,
            "a result of its own kind only"
        );
        assert_eq!(
            calls.take("b", CallKind::MarkReady),
            Some(Finished::MarkReady(Outcome::Done))
        );
        assert_eq!(calls.take("b", CallKind::MarkReady), None, "taken once");
        assert!(calls.in_flight("a"));
    }

    #[tokio::test]
    async fn a_call_is_not_started_again_within_its_gap() {
        let (calls, mut woken) = SidecarCalls::new(1);
        let gap = Duration::from_secs(60);
        calls.start("a", node_ref(), CallKind::Probe, gap, async {
            Finished::Probe(ProbeResult::Healthy("first".to_owned()))
        });
        woken.recv().await.unwrap();
        assert!(calls.take("a", CallKind::Probe).is_some());
        calls.start("a", node_ref(), CallKind::Probe, gap, async {
            Finished::Probe(ProbeResult::Healthy("too soon".to_owned()))
        });
        assert!(!calls.in_flight("a"), "within the gap: not started");
        calls.start("a", node_ref(), CallKind::MarkReady, gap, async {
            Finished::MarkReady(Outcome::Done)
        });
        assert!(woken.recv().await.is_some(), "another kind has its own gap");
    }

    /// A call refused for its gap wakes its node when the gap ends, so the reason it was
    /// asked for (its pod came up, say) does not wait for the node's next requeue.
    #[tokio::test]
    async fn a_call_refused_for_its_gap_wakes_the_node_when_the_gap_ends() {
        let (calls, mut woken) = SidecarCalls::new(1);
        let gap = Duration::from_millis(200);
        calls.start("a", node_ref(), CallKind::MarkReady, gap, async {
            Finished::MarkReady(Outcome::Waiting("pod not there yet".to_owned()))
        });
        woken.recv().await.unwrap();
        assert!(calls.take("a", CallKind::MarkReady).is_some());
        let refused = Instant::now();
        for _ in 0..3 {
            calls.start("a", node_ref(), CallKind::MarkReady, gap, async {
                Finished::MarkReady(Outcome::Done)
            });
        }
        assert!(!calls.in_flight("a"));
        tokio::time::timeout(Duration::from_secs(5), woken.recv())
            .await
            .expect("woken at the end of the gap")
            .unwrap();
        assert!(refused.elapsed() < Duration::from_secs(2));
        assert!(
            tokio::time::timeout(Duration::from_millis(300), woken.recv())
                .await
                .is_err(),
            "one wake-up, however often the call was refused"
        );
    }
}
