//! The reconcile slots: `--max-concurrent-reconciles` reconciles do API work at once, and a node
//! not decided yet goes before plan work.
//!
//! kube-runtime's own concurrency limit hands the next free slot to whichever node its queue
//! yields, in no particular order, so at a cold start with 1,000 nodes the first decisions and the
//! plans' applies interleave and the last node is decided only when nearly all the work is done.
//! Here kube-runtime runs every queued reconcile at once (at most one per node), each waits for a
//! slot holding nothing but its node, and an urgent one (a node with no decision yet) takes a
//! free slot before any other. A node just decided ends its reconcile there and is queued again,
//! as normal work (see `reconcile`).

use std::sync::Mutex;

use tokio::sync::Notify;

use crate::lock;

/// Which reconciles a free slot goes to first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// A node with no decision yet: its condition tells the user what is wrong.
    Urgent,
    /// Everything else (plan tasks, re-checks).
    Normal,
}

/// A fixed number of slots with two priorities; closed at the end of a leadership term.
pub struct Slots {
    state: Mutex<State>,
    changed: Notify,
}

struct State {
    free: usize,
    urgent_waiting: usize,
    closed: bool,
}

/// A held slot, given back when dropped.
#[must_use]
pub struct Slot<'a> {
    slots: &'a Slots,
    priority: Priority,
}

impl Slots {
    pub fn new(slots: usize) -> Self {
        Self {
            state: Mutex::new(State {
                free: slots,
                urgent_waiting: 0,
                closed: false,
            }),
            changed: Notify::new(),
        }
    }

    /// Waits for a free slot (an urgent waiter goes first); `None` once the slots are closed.
    pub async fn acquire(&self, priority: Priority) -> Option<Slot<'_>> {
        let _waiting = (priority == Priority::Urgent).then(|| UrgentWaiting::new(self));
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the state is read, so a change in between still wakes this.
            changed.as_mut().enable();
            {
                let mut state = lock(&self.state);
                if state.closed {
                    return None;
                }
                if state.free > 0 && (priority == Priority::Urgent || state.urgent_waiting == 0) {
                    state.free -= 1;
                    return Some(Slot {
                        slots: self,
                        priority,
                    });
                }
            }
            changed.await;
        }
    }

    /// Wakes every waiter with `None`, now and later: the term is over, so queued reconciles
    /// end without API work instead of holding up the controller's shutdown.
    pub fn close(&self) {
        lock(&self.state).closed = true;
        self.changed.notify_waiters();
    }

    fn release(&self) {
        lock(&self.state).free += 1;
        self.changed.notify_waiters();
    }
}

impl Slot<'_> {
    pub fn priority(&self) -> Priority {
        self.priority
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.slots.release();
    }
}

/// Counts an urgent waiter while it waits (also when its reconcile is dropped mid-wait).
struct UrgentWaiting<'a>(&'a Slots);

impl<'a> UrgentWaiting<'a> {
    fn new(slots: &'a Slots) -> Self {
        lock(&slots.state).urgent_waiting += 1;
        Self(slots)
    }
}

impl Drop for UrgentWaiting<'_> {
    fn drop(&mut self) {
        lock(&self.0.state).urgent_waiting -= 1;
        // Normal waiters held back by this one may go now.
        self.0.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use futures::FutureExt;

    use super::*;

    /// A waiter that has not got a slot after the runtime ran everything it could.
    async fn still_waiting<T>(future: &mut (impl Future<Output = T> + Unpin)) -> bool {
        tokio::task::yield_now().await;
        future.now_or_never().is_none()
    }

    #[tokio::test]
    async fn a_free_slot_goes_to_an_urgent_waiter_before_an_earlier_normal_one() {
        let slots = Slots::new(1);
        let held = slots.acquire(Priority::Normal).await.unwrap();
        let mut normal = Box::pin(slots.acquire(Priority::Normal));
        assert!(still_waiting(&mut normal).await);
        let mut urgent = Box::pin(slots.acquire(Priority::Urgent));
        assert!(still_waiting(&mut urgent).await);

        drop(held);
        assert!(
            still_waiting(&mut normal).await,
            "a normal waiter took the slot while an urgent one waited"
        );
        let urgent = urgent.await.unwrap();
        assert_eq!(urgent.priority(), Priority::Urgent);
        assert!(still_waiting(&mut normal).await);
        drop(urgent);
        assert_eq!(normal.await.unwrap().priority(), Priority::Normal);
    }

    #[tokio::test]
    async fn slots_bound_the_holders_of_either_priority() {
        let slots = Slots::new(2);
        let a = slots.acquire(Priority::Urgent).await.unwrap();
        let b = slots.acquire(Priority::Normal).await.unwrap();
        let mut third = Box::pin(slots.acquire(Priority::Urgent));
        assert!(still_waiting(&mut third).await);
        drop(b);
        let _third = third.await.unwrap();
        drop(a);
    }

    #[tokio::test]
    async fn an_urgent_waiter_dropped_mid_wait_holds_back_nobody() {
        let slots = Slots::new(1);
        let held = slots.acquire(Priority::Normal).await.unwrap();
        let mut urgent = Box::pin(slots.acquire(Priority::Urgent));
        assert!(still_waiting(&mut urgent).await);
        let mut normal = Box::pin(slots.acquire(Priority::Normal));
        assert!(still_waiting(&mut normal).await);
        drop(urgent);
        drop(held);
        assert!(normal.await.is_some());
    }

    #[tokio::test]
    async fn closing_ends_every_wait_now_and_later() {
        let slots = Arc::new(Slots::new(1));
        let held = slots.acquire(Priority::Normal).await.unwrap();
        let waiter = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.acquire(Priority::Urgent).await.is_none() })
        };
        tokio::task::yield_now().await;
        slots.close();
        let ended = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("a waiter outlived close")
            .unwrap();
        assert!(ended, "a waiter got a slot after close");
        drop(held);
        assert!(slots.acquire(Priority::Normal).await.is_none());
    }
}
