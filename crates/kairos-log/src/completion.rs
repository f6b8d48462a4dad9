//! A one-shot completion: the result of an asynchronous append.
//!
//! The log's writer thread resolves a [`Completion`] once the request's
//! records are durable. Callers may either `.await` it (it implements
//! [`Future`], storing the task's [`Waker`]) or block on it with
//! [`Completion::wait`]; no async runtime is required.
//!
//! Never hanging is part of the contract: if the producing side (a
//! [`Completer`]) is dropped without a value — because the writer thread
//! stopped, panicked or was shut down — the completion resolves to the
//! fallback value given to [`completion_pair`] (for the log, an error).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// The receiving half of a one-shot value, e.g. the result of
/// [`EventLog::append`](crate::EventLog::append).
///
/// `.await` it (it implements [`Future`] and stores the task's [`Waker`]) or
/// block on it with [`wait`](Self::wait); no async runtime is required. It is
/// `Send`, and the producing side may complete it from any thread.
///
/// It never hangs: if the [`Completer`] is dropped without a value — because
/// the log's writer thread stopped, panicked or was shut down — the
/// completion resolves to the fallback value given to [`completion_pair`]
/// (for the log, an error).
#[must_use = "a Completion does nothing unless waited on or awaited"]
pub struct Completion<T> {
    slot: Arc<Slot<T>>,
}

/// The sending half of a one-shot value. Dropping it without calling
/// [`Completer::complete`] resolves the paired [`Completion`] with the
/// fallback value.
pub struct Completer<T> {
    slot: Option<Arc<Slot<T>>>,
    on_abandon: fn() -> T,
}

struct Slot<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
}

struct State<T> {
    value: Option<T>,
    waker: Option<Waker>,
    consumed: bool,
}

/// Creates a connected [`Completer`]/[`Completion`] pair. `on_abandon`
/// produces the value the completion resolves to if the completer is dropped
/// without completing.
pub fn completion_pair<T>(on_abandon: fn() -> T) -> (Completer<T>, Completion<T>) {
    let slot = Arc::new(Slot::new(None));
    (
        Completer {
            slot: Some(Arc::clone(&slot)),
            on_abandon,
        },
        Completion { slot },
    )
}

impl<T> Slot<T> {
    fn new(value: Option<T>) -> Self {
        Slot {
            state: Mutex::new(State {
                value,
                waker: None,
                consumed: false,
            }),
            ready: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn fill(&self, value: T) {
        let waker = {
            let mut state = self.lock();
            state.value = Some(value);
            state.waker.take()
        };
        self.ready.notify_all();
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl<T> Completion<T> {
    /// A completion that is already resolved with `value`.
    pub fn ready(value: T) -> Self {
        Completion {
            slot: Arc::new(Slot::new(Some(value))),
        }
    }

    /// Whether the value is available, i.e. [`wait`](Self::wait) would not
    /// block.
    pub fn is_ready(&self) -> bool {
        self.slot.lock().value.is_some()
    }

    /// Blocks the current thread until the value is available and returns it.
    pub fn wait(self) -> T {
        let mut state = self.slot.lock();
        loop {
            if let Some(value) = state.value.take() {
                state.consumed = true;
                return value;
            }
            state = self
                .slot
                .ready
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Like [`wait`](Self::wait) but gives up after `timeout`, handing the
    /// still-pending completion back.
    pub fn wait_timeout(self, timeout: Duration) -> Result<T, Self> {
        let deadline = Instant::now().checked_add(timeout);
        let mut state = self.slot.lock();
        loop {
            if let Some(value) = state.value.take() {
                state.consumed = true;
                return Ok(value);
            }
            let remaining = match deadline {
                Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                    Some(remaining) if !remaining.is_zero() => remaining,
                    _ => break,
                },
                None => Duration::from_secs(3600),
            };
            state = self
                .slot
                .ready
                .wait_timeout(state, remaining)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        drop(state);
        Err(self)
    }
}

impl<T> Future for Completion<T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut state = self.slot.lock();
        if let Some(value) = state.value.take() {
            state.consumed = true;
            return Poll::Ready(value);
        }
        assert!(!state.consumed, "Completion polled after it returned Ready");
        match &state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => state.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl<T> fmt::Debug for Completion<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Completion")
            .field("ready", &self.is_ready())
            .finish()
    }
}

impl<T> Completer<T> {
    /// Resolves the paired completion with `value`, waking a blocked
    /// [`Completion::wait`] or the task awaiting it.
    pub fn complete(mut self, value: T) {
        if let Some(slot) = self.slot.take() {
            slot.fill(value);
        }
    }
}

impl<T> Drop for Completer<T> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            slot.fill((self.on_abandon)());
        }
    }
}

impl<T> fmt::Debug for Completer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Completer").finish_non_exhaustive()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;
    use std::thread;

    /// Wakes a parked thread and counts wake-ups.
    struct ThreadWaker {
        thread: thread::Thread,
        wakes: AtomicUsize,
    }

    impl Wake for ThreadWaker {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }

        fn wake_by_ref(self: &Arc<Self>) {
            self.wakes.fetch_add(1, Ordering::SeqCst);
            self.thread.unpark();
        }
    }

    /// A minimal executor: polls `future` on the current thread, parking
    /// between polls. Returns the output and the number of polls.
    pub(crate) fn block_on<F: Future>(future: F) -> (F::Output, usize) {
        let waker_state = Arc::new(ThreadWaker {
            thread: thread::current(),
            wakes: AtomicUsize::new(0),
        });
        let waker = Waker::from(Arc::clone(&waker_state));
        let mut cx = Context::from_waker(&waker);
        let mut future = std::pin::pin!(future);
        let mut polls = 0;
        loop {
            polls += 1;
            if let Poll::Ready(value) = future.as_mut().poll(&mut cx) {
                return (value, polls);
            }
            thread::park_timeout(Duration::from_secs(5));
        }
    }

    #[test]
    fn wait_returns_value_completed_on_another_thread() {
        let (completer, completion) = completion_pair(|| 0u32);
        let handle = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            completer.complete(7);
        });
        assert_eq!(completion.wait(), 7);
        handle.join().expect("completer thread");
    }

    #[test]
    fn future_is_woken_by_completion() {
        let (completer, completion) = completion_pair(|| "abandoned");
        let handle = thread::spawn(move || {
            thread::sleep(Duration::from_millis(30));
            completer.complete("done");
        });
        let (value, polls) = block_on(completion);
        assert_eq!(value, "done");
        assert!(polls >= 2, "first poll must be pending, got {polls} polls");
        handle.join().expect("completer thread");
    }

    #[test]
    fn dropped_completer_resolves_with_fallback() {
        let (completer, completion) = completion_pair(|| Err::<u8, &str>("writer gone"));
        drop(completer);
        assert_eq!(completion.wait(), Err("writer gone"));

        let (completer, completion) = completion_pair(|| -1i32);
        let handle = thread::spawn(move || drop(completer));
        assert_eq!(block_on(completion).0, -1);
        handle.join().expect("dropping thread");
    }

    #[test]
    fn ready_and_timeout() {
        let completion = Completion::ready(5u8);
        assert!(completion.is_ready());
        assert_eq!(block_on(completion).0, 5);

        let (completer, completion) = completion_pair(|| 0u8);
        let completion = completion
            .wait_timeout(Duration::from_millis(10))
            .expect_err("nothing completed yet");
        completer.complete(9);
        assert_eq!(
            completion.wait_timeout(Duration::from_secs(5)).ok(),
            Some(9)
        );
    }

    #[test]
    fn completion_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Completion<Result<Vec<u8>, crate::LogError>>>();
        assert_send::<Completer<Result<Vec<u8>, crate::LogError>>>();
    }
}
