//! The controller's own dispatch: which node is reconciled next, by one of the
//! `--max-concurrent-reconciles` workers.
//!
//! A node is queued at most once. A trigger (a watch event of the node, of an object it owns, of
//! its Pod or its Secret; a finished sidecar call) makes it ready now; the end of its reconcile
//! says when it is to be ready again if nothing wakes it sooner. Of the ready nodes, one whose
//! user waits on the verdict about its Secret (urgent) goes before every other (normal), each
//! priority in arrival order, so that at a cold start with a thousand nodes every node is
//! decided before the plans' applies take the workers. A node triggered while it is being
//! reconciled runs again once that reconcile ends: never two reconciles of a node at once.
//!
//! Only the workers are futures. A queued node is an entry in a map, not a future waiting for a
//! slot: kube-runtime's runner, which this replaces, polled every reconcile it held each time
//! any of them was woken, and it held every queued node (see docs/benchmarks.md).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use kube::runtime::reflector::ObjectRef;
use parking_lot::Mutex;
use seinode_tls_crds::SeiNode;
use tokio::sync::Notify;

/// Which ready node a free worker takes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    /// A node with no verdict on its Secret yet, or one whose Secret is not ready: its condition
    /// tells the user what is wrong, and a Secret that arrives releases its plan.
    Urgent,
    /// Everything else (plan tasks, re-checks).
    Normal,
}

impl Priority {
    /// Urgent: a node with no status yet, or a TLS node whose Secret is not (yet) judged ready:
    /// its user waits on this verdict, and its reconcile is short (one Secret check, at most one
    /// status write), so a Secret that arrives or is fixed does not queue behind plan work.
    pub fn of(node: &SeiNode) -> Self {
        let waiting = node.status.as_ref().is_none_or(|status| {
            let conditions = status.conditions.as_deref().unwrap_or_default();
            crate::plan::gate(node.sidecar_tls().is_some(), conditions) != crate::plan::Gate::Open
        });
        if waiting { Self::Urgent } else { Self::Normal }
    }
}

/// When a node is to be reconciled again if no trigger comes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    After(Duration),
    /// Only when something changes.
    OnChange,
}

type Key = ObjectRef<SeiNode>;

/// The queue of nodes to reconcile, shared by the triggers and the workers; closed at the end
/// of a leadership term.
#[derive(Default)]
pub struct Queue {
    state: Mutex<State>,
    /// Wakes one idle worker: a node turned ready, or the earliest due time moved closer.
    wake: Notify,
}

impl Queue {
    /// Makes `key` ready now (see [`State::trigger`]).
    pub fn trigger(&self, key: Key, priority: Priority) {
        if self.state.lock().trigger(key, priority, Instant::now()) {
            self.wake.notify_one();
        }
    }

    /// The next node to reconcile, with its priority, once one is ready; `None` once the queue
    /// is closed. The node counts as running until [`Queue::done`].
    pub async fn next(&self) -> Option<(Key, Priority)> {
        loop {
            let woken = self.wake.notified();
            tokio::pin!(woken);
            // Registered before the state is read: a wake that comes between the two is kept.
            woken.as_mut().enable();
            let due = {
                let mut state = self.state.lock();
                if state.closed {
                    return None;
                }
                if let Some(next) = state.pop(Instant::now()) {
                    return Some(next);
                }
                state.earliest_due()
            };
            match due {
                Some(due) => {
                    tokio::select! {
                        () = &mut woken => {}
                        () = tokio::time::sleep_until(due.into()) => {}
                    }
                }
                None => woken.await,
            }
        }
    }

    /// Ends `key`'s reconcile: it runs again after `next`, or at once if it was triggered
    /// meanwhile, with `priority`: the one its reconcile left it at (fresher than a trigger's
    /// while it ran, which saw the node before the reconcile's writes).
    pub fn done(&self, key: &Key, next: Next, priority: Priority) {
        if self.state.lock().done(key, next, priority, Instant::now()) {
            self.wake.notify_one();
        }
    }

    /// No node is handed out any more; every waiting worker returns `None`.
    pub fn close(&self) {
        self.state.lock().closed = true;
        self.wake.notify_waiters();
    }

    /// Nodes queued or running.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.state.lock().entries.len()
    }
}

/// Where a queued node stands. `seq` orders the nodes of one priority (arrival order) and of
/// one due time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    Ready {
        priority: Priority,
        seq: u64,
    },
    Delayed {
        due: Instant,
        seq: u64,
        priority: Priority,
    },
    /// Being reconciled; `again`: when it is to run once that ends.
    Running {
        again: Option<Instant>,
    },
}

/// The queue itself, without the waiting: every method takes the time it runs at.
#[derive(Default)]
struct State {
    entries: HashMap<Key, Entry>,
    urgent: BTreeMap<u64, Key>,
    normal: BTreeMap<u64, Key>,
    delayed: BTreeMap<(Instant, u64), Key>,
    seq: u64,
    closed: bool,
}

impl State {
    /// Makes `key` ready now; a ready node keeps its place unless this raises its priority.
    /// Returns whether a node turned ready.
    fn trigger(&mut self, key: Key, priority: Priority, now: Instant) -> bool {
        match self.entries.get(&key).copied() {
            Some(Entry::Running { .. }) => {
                self.entries
                    .insert(key, Entry::Running { again: Some(now) });
                false
            }
            Some(Entry::Ready {
                priority: queued, ..
            }) if queued <= priority => false,
            Some(entry) => {
                self.unqueue(&entry);
                self.make_ready(key, priority);
                true
            }
            None => {
                self.make_ready(key, priority);
                true
            }
        }
    }

    /// Takes the first ready node (urgent ones first), once the due ones are ready.
    fn pop(&mut self, now: Instant) -> Option<(Key, Priority)> {
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let key = entry.remove();
            let priority = match self.entries.get(&key) {
                Some(Entry::Delayed { priority, .. }) => *priority,
                _ => continue,
            };
            self.make_ready(key, priority);
        }
        let (key, priority) = match self.urgent.pop_first() {
            Some((_, key)) => (key, Priority::Urgent),
            None => (self.normal.pop_first()?.1, Priority::Normal),
        };
        self.entries
            .insert(key.clone(), Entry::Running { again: None });
        Some((key, priority))
    }

    /// Ends a reconcile. Returns whether the node turned ready, or the earliest due time moved
    /// closer (an idle worker is to look again).
    fn done(&mut self, key: &Key, next: Next, priority: Priority, now: Instant) -> bool {
        let again = match self.entries.get(key) {
            Some(Entry::Running { again }) => *again,
            // Not running: nothing to end (a term's queue is never handed back a stranger).
            _ => return false,
        };
        let scheduled = match next {
            Next::After(delay) => Some(now + delay),
            Next::OnChange => None,
        };
        let due = match (again, scheduled) {
            (Some(again), Some(scheduled)) => again.min(scheduled),
            (Some(one), None) | (None, Some(one)) => one,
            (None, None) => {
                self.entries.remove(key);
                return false;
            }
        };
        if due <= now {
            self.make_ready(key.clone(), priority);
            return true;
        }
        self.seq += 1;
        let seq = self.seq;
        self.entries
            .insert(key.clone(), Entry::Delayed { due, seq, priority });
        self.delayed.insert((due, seq), key.clone());
        self.delayed.first_key_value().map(|(first, _)| *first) == Some((due, seq))
    }

    fn earliest_due(&self) -> Option<Instant> {
        self.delayed.first_key_value().map(|((due, _), _)| *due)
    }

    fn make_ready(&mut self, key: Key, priority: Priority) {
        self.seq += 1;
        let seq = self.seq;
        match priority {
            Priority::Urgent => self.urgent.insert(seq, key.clone()),
            Priority::Normal => self.normal.insert(seq, key.clone()),
        };
        self.entries.insert(key, Entry::Ready { priority, seq });
    }

    /// Takes a queued (ready or delayed) node out of its queue; its entry stays.
    fn unqueue(&mut self, entry: &Entry) {
        match *entry {
            Entry::Ready {
                priority: Priority::Urgent,
                seq,
            } => {
                self.urgent.remove(&seq);
            }
            Entry::Ready {
                priority: Priority::Normal,
                seq,
            } => {
                self.normal.remove(&seq);
            }
            Entry::Delayed { due, seq, .. } => {
                self.delayed.remove(&(due, seq));
            }
            Entry::Running { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use jiff::Timestamp;
    use seinode_tls_crds::{SIDECAR_TLS_SECRET_READY, SeiNodeStatus};

    use super::*;
    use Priority::{Normal, Urgent};

    fn key(name: &str) -> Key {
        ObjectRef::new(name).within("ns")
    }

    fn names(popped: &[(Key, Priority)]) -> Vec<(&str, Priority)> {
        popped.iter().map(|(k, p)| (k.name.as_str(), *p)).collect()
    }

    fn drain(state: &mut State, now: Instant) -> Vec<(Key, Priority)> {
        std::iter::from_fn(|| state.pop(now)).collect()
    }

    #[test]
    fn a_node_waiting_on_its_secret_verdict_is_urgent() {
        let with_tls = |tls: bool, ready: Option<bool>| {
            let mut node = crate::decide::tests::node("ghcr.io/sei-protocol/sei:v6.3.0", 1);
            if !tls {
                node.spec.sidecar = None;
            }
            node.status = ready.map(|ok| SeiNodeStatus {
                conditions: Some(vec![crate::status::condition(
                    SIDECAR_TLS_SECRET_READY,
                    ok,
                    "Reason",
                    "message",
                    None,
                    None,
                    Timestamp::UNIX_EPOCH,
                )]),
                ..SeiNodeStatus::default()
            });
            node
        };
        let mut no_verdict = with_tls(true, Some(true));
        no_verdict.status.as_mut().unwrap().conditions = None;
        let mut plain_decided = with_tls(false, None);
        plain_decided.status = Some(SeiNodeStatus::default());

        for (node, want, what) in [
            (with_tls(true, None), Urgent, "TLS, no status"),
            (no_verdict, Urgent, "TLS, no verdict yet"),
            (with_tls(true, Some(false)), Urgent, "TLS, Secret not ready"),
            (with_tls(true, Some(true)), Normal, "TLS, Secret ready"),
            (with_tls(false, None), Urgent, "no TLS, no status"),
            (plain_decided, Normal, "no TLS, with status"),
        ] {
            assert_eq!(Priority::of(&node), want, "{what}");
        }
    }

    #[test]
    fn urgent_nodes_go_first_each_priority_in_arrival_order() {
        let now = Instant::now();
        let mut state = State::default();
        for (name, priority) in [("a", Normal), ("b", Urgent), ("c", Normal), ("d", Urgent)] {
            assert!(state.trigger(key(name), priority, now));
        }
        let popped = drain(&mut state, now);
        assert_eq!(
            names(&popped),
            [("b", Urgent), ("d", Urgent), ("a", Normal), ("c", Normal)]
        );
    }

    #[test]
    fn a_node_is_queued_once_and_a_trigger_can_only_raise_its_priority() {
        let now = Instant::now();
        let mut state = State::default();
        assert!(state.trigger(key("a"), Normal, now));
        assert!(state.trigger(key("b"), Normal, now));
        assert!(!state.trigger(key("a"), Normal, now), "already ready");
        assert!(state.trigger(key("b"), Urgent, now), "raised");
        assert!(!state.trigger(key("b"), Normal, now), "never lowered");
        let popped = drain(&mut state, now);
        assert_eq!(names(&popped), [("b", Urgent), ("a", Normal)]);
    }

    #[test]
    fn a_node_triggered_while_running_runs_again_once_after_it_ends() {
        let now = Instant::now();
        let mut state = State::default();
        state.trigger(key("a"), Normal, now);
        assert_eq!(names(&drain(&mut state, now)), [("a", Normal)]);
        assert!(!state.trigger(key("a"), Normal, now), "not while it runs");
        // A trigger that saw the node before its reconcile's writes (say, still undecided).
        assert!(!state.trigger(key("a"), Urgent, now));
        assert!(drain(&mut state, now).is_empty(), "never twice at once");
        // Its reconcile decided it (now normal work) and asked for an hour: the trigger
        // meanwhile wins the time, the reconcile's priority wins over the trigger's.
        assert!(state.done(
            &key("a"),
            Next::After(Duration::from_secs(3600)),
            Normal,
            now
        ));
        state.trigger(key("undecided"), Urgent, now);
        assert_eq!(
            names(&drain(&mut state, now)),
            [("undecided", Urgent), ("a", Normal)]
        );
        assert!(!state.done(&key("undecided"), Next::OnChange, Normal, now));
        assert!(!state.done(&key("a"), Next::OnChange, Normal, now));
        assert!(state.entries.is_empty(), "forgotten: nothing asked for it");
    }

    #[test]
    fn a_delayed_node_turns_ready_when_due_or_when_triggered() {
        let now = Instant::now();
        let later = |s| now + Duration::from_secs(s);
        let mut state = State::default();
        for name in ["a", "b", "c"] {
            state.trigger(key(name), Urgent, now);
        }
        drain(&mut state, now);
        assert!(state.done(&key("a"), Next::After(Duration::from_secs(20)), Normal, now));
        assert!(
            state.done(&key("b"), Next::After(Duration::from_secs(10)), Urgent, now),
            "the earliest due moved closer"
        );
        assert!(
            !state.done(&key("c"), Next::After(Duration::from_secs(30)), Normal, now),
            "not the earliest"
        );
        assert_eq!(state.earliest_due(), Some(later(10)));
        assert!(state.pop(later(9)).is_none());
        assert!(
            state.trigger(key("c"), Normal, later(9)),
            "a trigger does not wait"
        );
        assert_eq!(names(&drain(&mut state, later(9))), [("c", Normal)]);
        assert_eq!(
            names(&drain(&mut state, later(25))),
            [("b", Urgent), ("a", Normal)],
            "each with the priority its reconcile gave"
        );
        assert_eq!(state.earliest_due(), None);
        assert!(state.delayed.is_empty() && state.urgent.is_empty() && state.normal.is_empty());
    }

    #[test]
    fn a_requeue_without_delay_is_ready_at_once_and_done_of_a_stranger_is_ignored() {
        let now = Instant::now();
        let mut state = State::default();
        state.trigger(key("a"), Urgent, now);
        drain(&mut state, now);
        assert!(state.done(&key("a"), Next::After(Duration::ZERO), Normal, now));
        assert_eq!(names(&drain(&mut state, now)), [("a", Normal)]);
        assert!(!state.done(&key("x"), Next::After(Duration::ZERO), Normal, now));
        assert!(!state.entries.contains_key(&key("x")));
    }

    /// A requeue that brings the earliest due time closer wakes an idle worker, which would
    /// otherwise wait for a trigger that may never come.
    #[tokio::test]
    async fn a_closer_due_time_wakes_an_idle_worker() {
        let queue = Arc::new(Queue::default());
        let deadline = Duration::from_secs(5);
        queue.trigger(key("x"), Normal);
        let (taken, priority) = tokio::time::timeout(deadline, queue.next())
            .await
            .unwrap()
            .unwrap();
        // An idle worker: nothing ready, nothing due.
        let idle = tokio::spawn({
            let queue = queue.clone();
            async move { queue.next().await }
        });
        tokio::task::yield_now().await;
        queue.done(&taken, Next::After(Duration::from_millis(50)), priority);
        let (again, _) = tokio::time::timeout(deadline, idle)
            .await
            .expect("the idle worker woke for the new due time")
            .unwrap()
            .unwrap();
        assert_eq!(again.name, "x");
    }

    /// Workers wait for work, wake for a trigger and for a due time, and all return once the
    /// queue closes.
    #[tokio::test]
    async fn workers_wake_for_triggers_and_due_times_and_end_when_closed() {
        let queue = Arc::new(Queue::default());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let workers: Vec<_> = (0..3)
            .map(|_| {
                let (queue, tx) = (queue.clone(), tx.clone());
                tokio::spawn(async move {
                    while let Some((key, priority)) = queue.next().await {
                        let _ = tx.send(key.name.clone());
                        let next = if key.name == "again" {
                            Next::After(Duration::from_millis(50))
                        } else {
                            Next::OnChange
                        };
                        queue.done(&key, next, priority);
                    }
                })
            })
            .collect();
        let deadline = Duration::from_secs(5);
        queue.trigger(key("one"), Normal);
        assert_eq!(
            tokio::time::timeout(deadline, rx.recv())
                .await
                .unwrap()
                .as_deref(),
            Some("one")
        );
        queue.trigger(key("again"), Urgent);
        for _ in 0..3 {
            let got = tokio::time::timeout(deadline, rx.recv()).await.unwrap();
            assert_eq!(got.as_deref(), Some("again"), "requeued after its delay");
        }
        queue.close();
        for worker in workers {
            tokio::time::timeout(deadline, worker)
                .await
                .unwrap()
                .unwrap();
        }
    }
}
