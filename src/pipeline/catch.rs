//! Keeping one message's failure to that message: a panic while mapping or delivering a
//! message is caught and becomes that message's outcome, so it never unwinds through the
//! worker that owns the link (which would drop the link and, with it, every other message in
//! hand).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The text of a panic payload.
pub fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Runs `f`, turning a panic into `Err` with its message.
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(panic_message)
}

/// Polls a pinned future, turning a panic into `Err` with its message.
pub struct CatchUnwind<'a, F>(pub Pin<&'a mut F>);

impl<F: Future> Future for CatchUnwind<'_, F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(value)) => Poll::Ready(Ok(value)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(Err(panic_message(payload))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_future_becomes_an_error() {
        let ok = std::pin::pin!(async { 7 });
        assert_eq!(CatchUnwind(ok).await, Ok(7));
        let boom = std::pin::pin!(async {
            if std::hint::black_box(true) {
                panic!("header map full");
            }
            1
        });
        assert_eq!(CatchUnwind(boom).await, Err("header map full".to_string()));
        assert_eq!(catch(|| 3), Ok(3));
        assert!(catch(|| -> u8 { panic!("x") }).is_err());
    }
}
