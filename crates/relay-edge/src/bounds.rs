//! What one replica lets a client occupy: requests in progress, request-body bytes buffered, and time.
//!
//! Both counts are taken before a body is read (a flood of large uploads is refused with 503 instead of
//! filling memory), and released when the answer's last byte has gone out. The answer body carries the
//! request deadline: a stream still running at `request_timeout_secs` is cut off.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Method, header};
use bytes::Bytes;
use relay_core::{ErrorCode, RelayError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Body bytes are counted in KiB, so a gibibyte fits a semaphore's permits.
const UNIT: usize = 1024;

pub struct Bounds {
    in_flight: Arc<Semaphore>,
    body_units: Arc<Semaphore>,
    max_body_bytes: usize,
    pub deadline: Duration,
}

/// A request's share of the bounds, released on drop.
pub struct Held {
    _in_flight: OwnedSemaphorePermit,
    _body: Option<OwnedSemaphorePermit>,
}

impl Bounds {
    pub fn new(cfg: &crate::EdgeConfig) -> Self {
        let units = (cfg.max_buffered_body_bytes / UNIT).clamp(1, Semaphore::MAX_PERMITS);
        Self {
            in_flight: Arc::new(Semaphore::new(cfg.max_in_flight.clamp(1, Semaphore::MAX_PERMITS))),
            body_units: Arc::new(Semaphore::new(units)),
            max_body_bytes: cfg.max_body_bytes,
            deadline: Duration::from_secs(cfg.request_timeout_secs.max(1)),
        }
    }

    /// Takes a request slot and room for its body, or says why not (before anything is read).
    pub fn admit(&self, method: &Method, headers: &HeaderMap) -> Result<Held, RelayError> {
        let busy = || {
            metrics::counter!("relay_edge_overload_refusals_total").increment(1);
            RelayError::new(ErrorCode::Unavailable, "The relay is at capacity; retry shortly.")
                .with_retry_after(Some(1))
        };
        let in_flight = self.in_flight.clone().try_acquire_owned().map_err(|_| busy())?;
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if let Some(n) = declared
            && n > self.max_body_bytes as u64
        {
            return Err(RelayError::new(
                ErrorCode::PayloadTooLarge,
                format!("Request body too large: the limit is {} bytes.", self.max_body_bytes),
            ));
        }
        let has_body = !matches!(*method, Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS);
        let bytes = match declared {
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
            None if has_body => self.max_body_bytes,
            None => 0,
        };
        let body = if bytes == 0 {
            None
        } else {
            let units = u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX);
            Some(self.body_units.clone().try_acquire_many_owned(units).map_err(|_| busy())?)
        };
        Ok(Held { _in_flight: in_flight, _body: body })
    }
}

/// An answer body that holds the request's share of the bounds until its end, and stops at the deadline.
pub struct Bounded {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    _held: Held,
}

impl Bounded {
    pub fn new(inner: Body, until: tokio::time::Instant, held: Held) -> Self {
        Self { inner, deadline: Box::pin(tokio::time::sleep_until(until)), _held: held }
    }
}

impl http_body::Body for Bounded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            metrics::counter!("relay_edge_deadline_cuts_total").increment(1);
            return Poll::Ready(Some(Err(axum::Error::new("the request deadline passed"))));
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(in_flight: usize, buffered: usize) -> crate::EdgeConfig {
        crate::EdgeConfig {
            max_in_flight: in_flight,
            max_body_bytes: 4096,
            max_buffered_body_bytes: buffered,
            ..Default::default()
        }
    }

    fn len(n: usize) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, n.to_string().parse().unwrap());
        h
    }

    #[test]
    fn requests_and_body_bytes_are_admitted_up_to_their_bounds() {
        let b = Bounds::new(&cfg(2, 6144));
        let one = b.admit(&Method::POST, &len(4096)).unwrap();
        let e = b.admit(&Method::POST, &len(4096)).err().unwrap();
        assert_eq!((e.code, e.retry_after_secs), (ErrorCode::Unavailable, Some(1)), "no room for the body");
        let two = b.admit(&Method::GET, &HeaderMap::new()).unwrap();
        let e = b.admit(&Method::GET, &HeaderMap::new()).err().unwrap();
        assert_eq!(e.code, ErrorCode::Unavailable, "two in flight");
        drop((one, two));
        let unsized_body = b.admit(&Method::POST, &HeaderMap::new()).unwrap();
        let e = b.admit(&Method::POST, &len(4096)).err().unwrap();
        assert_eq!(e.code, ErrorCode::Unavailable, "an unsized body counts as the largest allowed");
        drop(unsized_body);
        let e = b.admit(&Method::POST, &len(4097)).err().unwrap();
        assert_eq!(e.code, ErrorCode::PayloadTooLarge, "refused by its declared length, unread");
    }
}
