//! The listener's idle timeout: a connection with no request in flight and no bytes moving for
//! that long is closed, as Envoy's `idle_timeout` does. The connection's IO reports end of file
//! to hyper once idle, which closes it cleanly between requests.

use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Shared between a connection's IO and its request handler.
#[derive(Clone)]
pub(crate) struct Activity {
    in_flight: Rc<Cell<usize>>,
    last: Rc<Cell<Instant>>,
}

impl Activity {
    pub fn new() -> Self {
        Self {
            in_flight: Rc::new(Cell::new(0)),
            last: Rc::new(Cell::new(Instant::now())),
        }
    }

    /// Marks a request in flight until the guard drops.
    pub fn request(&self) -> RequestGuard {
        self.in_flight.set(self.in_flight.get() + 1);
        RequestGuard(self.clone())
    }

    fn touch(&self) {
        self.last.set(Instant::now());
    }
}

pub(crate) struct RequestGuard(Activity);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let activity = &self.0;
        activity
            .in_flight
            .set(activity.in_flight.get().saturating_sub(1));
        activity.touch();
    }
}

pub(crate) struct IdleIo<T> {
    inner: T,
    activity: Activity,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
}

impl<T> IdleIo<T> {
    pub fn new(inner: T, activity: Activity, idle: Duration) -> Self {
        let timer = Box::pin(tokio::time::sleep(idle));
        Self {
            inner,
            activity,
            idle,
            timer,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    self.activity.touch();
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                if self.activity.in_flight.get() > 0 {
                    return Poll::Pending;
                }
                let deadline = self.activity.last.get() + self.idle;
                if Instant::now() >= deadline {
                    // Idle: end of file closes the connection between requests.
                    return Poll::Ready(Ok(()));
                }
                self.timer.as_mut().reset(deadline);
                match self.timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Ok(())),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
