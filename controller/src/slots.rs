//! The reconcile slots: `--max-concurrent-reconciles` reconciles do API work at once, and a node
//! not decided yet goes before plan work.
//!
//! kube-runtime's own concurrency limit hands the next free slot to whichever node its queue
//! yields, in no particular order, so at a cold start with 1,000 nodes the first decisions and the
//! plans' applies interleave and the last node is decided only when nearly all the work is done.
//! Here kube-runtime runs every queued reconcile at once (at most one per node), each waits for a
//! slot holding nothing but its node, and an urgent one (a node whose user waits on the verdict
//! about its Secret) takes a free slot before any other. A node whose Secret has just been judged
//! ready ends its reconcile there and is queued again, as normal work (see `reconcile`).

use parking_lot::Mutex;
use std::collections::VecDeque;

use tokio::sync::oneshot;

/// Which reconciles a free slot goes to first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// A node with no verdict on its Secret yet, or one whose Secret is not ready: its condition
    /// tells the user what is wrong, and a Secret that arrives releases its plan.
    Urgent,
    /// Everything else (plan tasks, re-checks).
    Normal,
}

/// A fixed number of slots with two priorities; closed at the end of a leadership term.
///
/// A released slot is handed to exactly one waiter (the first urgent one, else the first normal
/// one), never announced to all: with a thousand reconciles queued, waking every waiter on each
/// release cost more CPU than the reconciles themselves.
pub struct Slots {
    state: Mutex<State>,
}

/// Invariant: a slot is free only while no live waiter is queued (a release hands its slot to a
/// waiter if there is one).
struct State {
    free: usize,
    urgent: VecDeque<oneshot::Sender<()>>,
    normal: VecDeque<oneshot::Sender<()>>,
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
                urgent: VecDeque::new(),
                normal: VecDeque::new(),
                closed: false,
            }),
        }
    }

    /// Waits for a free slot (urgent waiters first, each priority in arrival order); `None`
    /// once the slots are closed.
    pub async fn acquire(&self, priority: Priority) -> Option<Slot<'_>> {
        let handed = {
            let mut state = self.state.lock();
            if state.closed {
                return None;
            }
            if state.free > 0 {
                state.free -= 1;
                return Some(Slot {
                    slots: self,
                    priority,
                });
            }
            let (tx, rx) = oneshot::channel();
            match priority {
                Priority::Urgent => state.urgent.push_back(tx),
                Priority::Normal => state.normal.push_back(tx),
            }
            rx
        };
        let mut waiting = Waiting {
            slots: self,
            handed,
        };
        // An error: the slots closed, dropping every queued sender.
        (&mut waiting.handed).await.ok()?;
        Some(Slot {
            slots: self,
            priority,
        })
    }

    /// Ends every wait with `None`, now and later: the term is over, so queued reconciles end
    /// without API work instead of holding up the controller's shutdown.
    pub fn close(&self) {
        let mut state = self.state.lock();
        state.closed = true;
        state.urgent.clear();
        state.normal.clear();
    }

    /// Hands the slot to the first waiter still waiting, or frees it.
    fn release(&self) {
        let mut state = self.state.lock();
        while let Some(waiter) = state
            .urgent
            .pop_front()
            .or_else(|| state.normal.pop_front())
        {
            if waiter.send(()).is_ok() {
                return;
            }
        }
        state.free += 1;
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

/// A queued waiter. Dropped mid-wait (its reconcile cancelled), it passes on a slot that was
/// handed to it but not yet taken, so no slot is lost.
struct Waiting<'a> {
    slots: &'a Slots,
    handed: oneshot::Receiver<()>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.handed.close();
        if self.handed.try_recv().is_ok() {
            self.slots.release();
        }
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

    #[derive(Default)]
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl futures::task::ArcWake for Wakes {
        fn wake_by_ref(wakes: &Arc<Self>) {
            wakes.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_release_wakes_one_waiter_in_arrival_order_not_every_waiter() {
        let slots = Slots::new(1);
        let held = slots
            .acquire(Priority::Normal)
            .now_or_never()
            .flatten()
            .unwrap();
        let wakes = Arc::new(Wakes::default());
        let waker = futures::task::waker(wakes.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        let mut waiters: Vec<_> = (0..100)
            .map(|_| Box::pin(slots.acquire(Priority::Normal)))
            .collect();
        for waiter in &mut waiters {
            assert!(waiter.as_mut().poll(&mut cx).is_pending());
        }

        drop(held);
        assert_eq!(wakes.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        let std::task::Poll::Ready(Some(first)) = waiters[0].as_mut().poll(&mut cx) else {
            panic!("the first waiter did not get the released slot");
        };
        for waiter in &mut waiters[1..] {
            assert!(waiter.as_mut().poll(&mut cx).is_pending());
        }
        drop(first);
        assert_eq!(wakes.0.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert!(waiters[1].as_mut().poll(&mut cx).is_ready());
    }

    #[tokio::test]
    async fn a_waiter_dropped_after_a_slot_was_handed_to_it_passes_the_slot_on() {
        let slots = Slots::new(1);
        let held = slots.acquire(Priority::Normal).await.unwrap();
        let mut first = Box::pin(slots.acquire(Priority::Normal));
        assert!(still_waiting(&mut first).await);
        let mut second = Box::pin(slots.acquire(Priority::Normal));
        assert!(still_waiting(&mut second).await);
        // Handed to `first`, which is cancelled before it runs again.
        drop(held);
        drop(first);
        assert!(second.await.is_some());
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
