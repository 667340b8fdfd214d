//! Access changes every edge must apply at once (a key revoked, a team disabled): NATS core pub/sub in
//! production, a broadcast channel in process. Messages are `key:<id>`, `team:<id>` or `org:<id>`.
//! Best effort by design: an edge that misses one still drops the entry when its cache TTL runs out.

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use tokio::sync::broadcast;

pub const INVALIDATION_SUBJECT: &str = "relay.keys.v1.invalidate";

#[derive(Clone)]
pub enum InvalidationBus {
    Nats { client: async_nats::Client, subject: String },
    Local(broadcast::Sender<String>),
}

impl InvalidationBus {
    pub fn local() -> Self {
        Self::Local(broadcast::channel(1024).0)
    }

    pub fn nats(client: async_nats::Client, subject: impl Into<String>) -> Self {
        Self::Nats { client, subject: subject.into() }
    }

    /// Announces `target` (`key:<id>`, `team:<id>`, `org:<id>`).
    pub async fn publish(&self, target: String) {
        match self {
            Self::Local(tx) => {
                let _ = tx.send(target);
            }
            Self::Nats { client, subject } => {
                if let Err(e) = client.publish(subject.clone(), target.into()).await {
                    tracing::warn!(error = %e, "invalidation not published; caches expire by TTL");
                } else {
                    let _ = client.flush().await;
                }
            }
        }
    }

    /// Every announcement from now on.
    pub async fn subscribe(&self) -> anyhow::Result<Pin<Box<dyn Stream<Item = String> + Send>>> {
        Ok(match self {
            Self::Local(tx) => Box::pin(receiver_stream(tx.subscribe())),
            Self::Nats { client, subject } => {
                let sub = client.subscribe(subject.clone()).await?;
                Box::pin(sub.map(|m| String::from_utf8_lossy(&m.payload).into_owned()))
            }
        })
    }
}

fn receiver_stream(rx: broadcast::Receiver<String>) -> impl Stream<Item = String> + Send {
    futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(v) => return Some((v, rx)),
                // Missed messages: caches still expire by TTL.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}
