//! The write side of a control channel, in a task of its own: a session loop queues messages and
//! never waits for the socket, so its heartbeat check and its shutdown arm run even while a hung
//! peer has stopped reading (its receive window full, our send queue pinned).
//!
//! Two queues feed the writer: the session's own messages (heartbeats, config results, the last
//! error), always written first, and the bulk of work from other tasks (client offers on the
//! gateway, client failures on the agent). A write that cannot finish within the stall limit
//! ends the writer with [`OutboxError::Stalled`], which ends the session.

use std::time::Duration;

use futures::SinkExt;
use tokio::io::AsyncWrite;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::codec::FramedWrite;

use super::{FrameCodec, Message, ProtocolError};

/// Session messages that may wait: a few intervals' worth. A full queue means the writer has
/// made no progress for that long, which is itself a stall.
const URGENT_QUEUE: usize = 16;

/// Messages written in one go before a flush.
const BATCH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("the peer read nothing for {0:?}: write abandoned")]
    Stalled(Duration),
    #[error("write failed: {0}")]
    Write(#[from] ProtocolError),
    #[error("the writer is gone")]
    Gone,
}

/// A running writer and the queue of its session's own messages.
pub struct Outbox {
    urgent: mpsc::Sender<Message>,
    stall_limit: Duration,
    task: Option<JoinHandle<Result<(), OutboxError>>>,
}

impl Outbox {
    /// Starts the writer. `bulk` carries other tasks' messages (written after urgent ones);
    /// `stall_limit` bounds every write (three heartbeats).
    pub fn spawn<W>(
        sink: FramedWrite<W, FrameCodec>,
        bulk: mpsc::Receiver<Message>,
        stall_limit: Duration,
    ) -> Outbox
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (urgent, urgent_rx) = mpsc::channel(URGENT_QUEUE);
        let task = tokio::spawn(write_all(sink, urgent_rx, bulk, stall_limit));
        Outbox {
            urgent,
            stall_limit,
            task: Some(task),
        }
    }

    /// Queues a session message without waiting. A full queue means the writer is stuck.
    pub fn send(&self, msg: Message) -> Result<(), OutboxError> {
        self.urgent.try_send(msg).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => OutboxError::Stalled(self.stall_limit),
            mpsc::error::TrySendError::Closed(_) => OutboxError::Gone,
        })
    }

    /// Resolves when the writer has ended, with why (for a session's select loop). Only ever
    /// resolves once: the loop that sees it must end the session.
    pub async fn failed(&mut self) -> OutboxError {
        let Some(task) = self.task.as_mut() else {
            return std::future::pending().await;
        };
        let result = task.await;
        self.task = None;
        match result {
            Ok(Err(e)) => e,
            Ok(Ok(())) | Err(_) => OutboxError::Gone,
        }
    }

    /// Writes `last` (an Error frame, say) after what is queued, then stops; gives up after
    /// `within`, so a peer that does not read cannot hold a closing session.
    pub async fn close(mut self, last: Option<Message>, within: Duration) {
        if let Some(msg) = last {
            let _ = self.urgent.try_send(msg);
        }
        let Some(mut task) = self.task.take() else {
            return;
        };
        // Closing the urgent queue tells the writer to finish.
        drop(std::mem::replace(&mut self.urgent, mpsc::channel(1).0));
        if tokio::time::timeout(within, &mut task).await.is_err() {
            task.abort();
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        // A session that ends without `close` takes its writer (and the socket's write half)
        // with it.
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The writer: urgent messages first, then bulk ones, a batch per flush, each flush bounded.
/// Ends when the urgent queue closes (the session is over: it then shuts the stream down) or a
/// write fails or stalls.
async fn write_all<W>(
    mut sink: FramedWrite<W, FrameCodec>,
    mut urgent: mpsc::Receiver<Message>,
    mut bulk: mpsc::Receiver<Message>,
    stall_limit: Duration,
) -> Result<(), OutboxError>
where
    W: AsyncWrite + Unpin,
{
    let mut bulk_open = true;
    loop {
        let first = tokio::select! {
            biased;
            msg = urgent.recv() => match msg {
                Some(msg) => msg,
                // The session is over: end the stream properly (a TLS close_notify, then FIN),
                // so the peer sees an orderly close rather than a cut connection.
                None => {
                    return match tokio::time::timeout(stall_limit, SinkExt::<super::RawFrame>::close(&mut sink)).await {
                        Ok(result) => result.map_err(OutboxError::from),
                        Err(_) => Err(OutboxError::Stalled(stall_limit)),
                    };
                }
            },
            msg = bulk.recv(), if bulk_open => match msg {
                Some(msg) => msg,
                None => { bulk_open = false; continue; }
            },
        };
        let batch = async {
            sink.feed(first.to_frame()).await?;
            for _ in 1..BATCH {
                let next = match urgent.try_recv() {
                    Ok(msg) => msg,
                    Err(_) => match bulk.try_recv() {
                        Ok(msg) => msg,
                        Err(_) => break,
                    },
                };
                sink.feed(next.to_frame()).await?;
            }
            SinkExt::<super::RawFrame>::flush(&mut sink).await
        };
        match tokio::time::timeout(stall_limit, batch).await {
            Ok(result) => result?,
            Err(_) => return Err(OutboxError::Stalled(stall_limit)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Connection, Heartbeat, DEFAULT_MAX_FRAME};

    fn beat(seq: u64) -> Message {
        Message::Heartbeat(Heartbeat { seq })
    }

    #[tokio::test]
    async fn urgent_messages_go_first_and_close_writes_the_last_one() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (_, sink) = Connection::new(a, DEFAULT_MAX_FRAME).split();
        let (bulk_tx, bulk_rx) = mpsc::channel(8);
        bulk_tx.send(beat(100)).await.unwrap();
        let outbox = Outbox::spawn(sink, bulk_rx, Duration::from_secs(1));
        outbox.send(beat(1)).unwrap();
        outbox.close(Some(beat(2)), Duration::from_secs(1)).await;
        let mut peer = Connection::new(b, DEFAULT_MAX_FRAME);
        let mut got = Vec::new();
        while let Some(m) = peer.read_message().await.unwrap() {
            got.push(m);
        }
        // The bulk message may or may not have gone before the close; the urgent ones did, in
        // order, and the stream ended.
        let urgent: Vec<_> = got.iter().filter(|m| **m != beat(100)).cloned().collect();
        assert_eq!(urgent, vec![beat(1), beat(2)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_stalls_the_writer_not_the_session() {
        // A tiny pipe nobody reads: the writer blocks once it is full.
        let (a, _b) = tokio::io::duplex(64);
        let (_, sink) = Connection::new(a, DEFAULT_MAX_FRAME).split();
        let (bulk_tx, bulk_rx) = mpsc::channel(1024);
        let mut outbox = Outbox::spawn(sink, bulk_rx, Duration::from_millis(300));
        for i in 0..100 {
            bulk_tx.send(beat(i)).await.unwrap();
        }
        let started = tokio::time::Instant::now();
        // Queuing never blocks, whatever the writer does.
        outbox.send(beat(1)).unwrap();
        let why = outbox.failed().await;
        assert!(matches!(why, OutboxError::Stalled(_)), "{why}");
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        // Closing a dead writer returns at once.
        outbox.close(Some(beat(2)), Duration::from_secs(5)).await;
        assert_eq!(started.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn close_gives_up_on_a_peer_that_does_not_read() {
        let (a, _b) = tokio::io::duplex(64);
        let (_, sink) = Connection::new(a, DEFAULT_MAX_FRAME).split();
        let (bulk_tx, bulk_rx) = mpsc::channel(1024);
        for i in 0..100 {
            bulk_tx.send(beat(i)).await.unwrap();
        }
        let outbox = Outbox::spawn(sink, bulk_rx, Duration::from_secs(60));
        tokio::task::yield_now().await;
        let started = tokio::time::Instant::now();
        outbox
            .close(Some(beat(1)), Duration::from_millis(500))
            .await;
        assert_eq!(started.elapsed(), Duration::from_millis(500));
    }
}
