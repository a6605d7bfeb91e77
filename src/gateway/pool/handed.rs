//! A pooled connection once it is handed a client: waiting for the agent's `PoolAccepted`
//! while forwarding the client's first bytes and holding a copy (at most [`HOLD_LIMIT`]), so an
//! agent that does not answer within [`ACCEPT_LIMIT`] costs the client nothing but a re-offer;
//! then, for a reuse-framed connection whose client ended cleanly, parking it again in its
//! site's pool.

use super::*;

/// What became of a client handed to a pooled connection.
pub(crate) enum Answer {
    /// The agent took it. `forwarded` bytes of the held ones already went to it.
    Accepted { data: DataConn, forwarded: usize },
    /// No answer within [`ACCEPT_LIMIT`] (or the connection failed first): the connection was
    /// reset; offer the client elsewhere with the held bytes.
    Unanswered,
    /// The agent had closed the connection in an orderly way (its pool shrank) as the client
    /// was handed to it: not a sign of a hung agent. Offer the client to the next one.
    Closed,
    /// The client reset its connection meanwhile.
    ClientGone,
}

/// Client bytes read before any agent has taken the client, to be replayed on another data
/// connection if the first does not answer.
#[derive(Default)]
pub(crate) struct Held {
    pub bytes: BytesMut,
    /// The client half-closed after them.
    pub eof: bool,
}

impl Handed {
    /// Waits for the agent's `PoolAccepted` (v2), forwarding the client's bytes meanwhile and
    /// holding a copy; a v1 agent never answers, so its connection is taken as it is.
    pub async fn answer<C>(self, id: u64, client: &mut C, held: &mut Held) -> Answer
    where
        C: tokio::io::AsyncRead + Unpin,
    {
        if !Feature::PoolAccepted.on(self.version) {
            return self.taken_unanswered();
        }
        let (mut reader, mut sink) = self.conn.split();
        let deadline = Instant::now() + ACCEPT_LIMIT;
        let mut forwarded = 0;
        // Bytes written since the last completed flush (a TLS writer holds them until then).
        let mut unflushed = false;
        // On the heap: an array here would make every client's task 8 KiB larger for its whole
        // life, piping included (a future is as large as its largest state).
        let mut chunk = vec![0u8; 8192];
        // Reuse-framed: held bytes go as whole records; `out` is the record being written, and
        // `encoded` counts the held bytes put in records so far.
        let framed = self.reuse.is_some();
        let mut out = BytesMut::new();
        let mut encoded = 0;
        loop {
            let room = HOLD_LIMIT.saturating_sub(held.bytes.len()).min(chunk.len());
            if framed && out.is_empty() && encoded < held.bytes.len() {
                let n = (held.bytes.len() - encoded).min(u16::MAX as usize);
                out.extend_from_slice(&crate::reuse::data_header(n));
                out.extend_from_slice(&held.bytes[encoded..encoded + n]);
                encoded += n;
            }
            let to_send = if framed {
                &out[..]
            } else {
                &held.bytes[forwarded..]
            };
            let event = tokio::select! {
                biased;
                msg = reader.read_message() => match msg {
                    Ok(Some(Message::PoolAccepted(PoolAccepted { id: answered }))) if answered == id => Waiting::Accepted,
                    Ok(None) => Waiting::Closed,
                    _ => Waiting::Failed,
                },
                read = client.read(&mut chunk[..room]), if room > 0 && !held.eof => Waiting::Read(read),
                pushed = push(sink.get_mut(), to_send), if !to_send.is_empty() || unflushed => Waiting::Pushed(pushed),
                () = tokio::time::sleep_until(deadline) => Waiting::Failed,
            };
            match event {
                Waiting::Accepted => break,
                Waiting::Failed | Waiting::Pushed(Err(_)) => {
                    abort(reader, sink);
                    return Answer::Unanswered;
                }
                Waiting::Closed => {
                    abort(reader, sink);
                    return Answer::Closed;
                }
                Waiting::Read(Err(_)) => {
                    abort(reader, sink);
                    return Answer::ClientGone;
                }
                Waiting::Read(Ok(0)) => held.eof = true,
                Waiting::Read(Ok(n)) => held.bytes.extend_from_slice(&chunk[..n]),
                Waiting::Pushed(Ok(Pushed::Wrote(n))) if framed => {
                    out.advance(n);
                    if out.is_empty() {
                        forwarded = encoded;
                    }
                    unflushed = true;
                }
                Waiting::Pushed(Ok(Pushed::Wrote(n))) => {
                    forwarded += n;
                    unflushed = true;
                }
                Waiting::Pushed(Ok(Pushed::Flushed)) => unflushed = false,
            }
        }
        if !out.is_empty() {
            // The rest of a record begun: the pipe's records follow it. Not bounded by a
            // timeout (a record cut in the middle would corrupt the stream); an agent that
            // stops reading stalls this client only, as it would stall the pipe.
            if sink.get_mut().write_all(&out).await.is_ok() {
                forwarded = encoded;
                unflushed = true;
            }
        }
        let (stream, leftover) = rejoin(reader, sink, unflushed).await;
        let data = DataConn {
            stream,
            leftover,
            agent_addr: self.agent_addr,
            agent: Some(self.agent),
            reuse: self.reuse.map(|served| Ticket {
                agent_id: self.agent_id,
                version: self.version,
                served,
            }),
        };
        Answer::Accepted { data, forwarded }
    }
}

impl Handed {
    /// A v1 agent never answers: its connection is the client's as it is, unframed.
    fn taken_unanswered(self) -> Answer {
        let (stream, leftover) = self.conn.into_parts();
        let data = DataConn {
            stream,
            leftover,
            agent_addr: self.agent_addr,
            agent: Some(self.agent),
            reuse: None,
        };
        Answer::Accepted { data, forwarded: 0 }
    }
}

/// The halves of a connection an agent accepted, whole again, with the bytes read past its
/// answer. What was written goes out now (if the agent reads slowly, the pipe's next write or
/// flush pushes the rest: it is in the writer, never written twice).
async fn rejoin(reader: PoolReader, mut sink: PoolSink, unflushed: bool) -> (Stream, BytesMut) {
    if unflushed {
        let _ = tokio::time::timeout(ACCEPT_LIMIT, sink.get_mut().flush()).await;
    }
    let (read, leftover) = reader.into_parts();
    (read.unsplit(sink.into_inner()), leftover)
}

/// What happened while a pooled connection had not answered yet.
enum Waiting {
    Accepted,
    /// The agent closed the connection (an orderly end) before it read the assignment.
    Closed,
    /// No answer in time, something else than the answer, or the connection ended.
    Failed,
    Read(std::io::Result<usize>),
    Pushed(std::io::Result<Pushed>),
}

/// One step of forwarding held bytes.
enum Pushed {
    /// This many bytes were taken by the writer.
    Wrote(usize),
    Flushed,
}

type PoolReader = MessageReader<ReadHalf<Stream>>;

type PoolSink = FramedWrite<WriteHalf<Stream>, FrameCodec>;

/// One cancel-safe step of forwarding: a single write while there is something to write (its
/// count is returned as soon as the writer took the bytes, so a `select!` that drops this future
/// loses no count), else a flush (which may be interrupted and simply run again). Writing and
/// flushing in one future would not be safe: bytes a TLS writer took before a pending flush
/// would go uncounted and be sent a second time.
async fn push<W: AsyncWrite + Unpin>(w: &mut W, buf: &[u8]) -> std::io::Result<Pushed> {
    if buf.is_empty() {
        w.flush().await?;
        Ok(Pushed::Flushed)
    } else {
        Ok(Pushed::Wrote(w.write(buf).await?))
    }
}

/// Resets a pooled connection that is being given up, so an agent that wakes up later sees a
/// reset, not a client: its `PoolAccepted` write fails and it drops the assignment.
fn abort(reader: PoolReader, sink: PoolSink) {
    let (read, _) = reader.into_parts();
    let stream = read.unsplit(sink.into_inner());
    let _ = SockRef::from(stream.tcp()).set_linger(Some(Duration::ZERO));
}

/// A reuse-framed connection whose client ended cleanly both ways, and what it served.
pub(crate) struct Returned {
    pub stream: Stream,
    /// Bytes read past the agent's end-of-stream record.
    pub leftover: BytesMut,
    pub agent_id: u64,
    pub agent_addr: SocketAddr,
    pub agent: String,
    /// The version its hello negotiated.
    pub version: u16,
    pub reuse: Reuse,
}

/// Parks a connection that served a client back in `site`'s pool, under its agent's session;
/// closes it (close_notify) when that session has ended or the pool is full, or when the agent
/// wrote past its end-of-stream record (it never writes between clients). Whether its next
/// client is its last is decided when that client is assigned ([`is_last`]).
pub(crate) async fn park_again(site: &Site, max_frame: usize, back: Returned) {
    let Returned {
        mut stream,
        leftover,
        agent_id,
        agent_addr,
        agent,
        version,
        reuse,
    } = back;
    if !leftover.is_empty() || !idle_now(&mut stream) {
        tracing::debug!(agent = %agent, "bytes or an end after a reused connection's client: closed, not parked");
        net::close_gently(&mut stream, Duration::from_secs(1)).await;
        return;
    }
    let conn = Connection::with_prefix(stream, max_frame, &leftover);
    let pooled = Pooled {
        conn,
        agent_addr,
        agent,
        since: Instant::now(),
        version,
        reuse: Some(reuse),
    };
    let refused = match site.agents().into_iter().find(|a| a.id == agent_id) {
        Some(handle) => site.pool.add(&handle, pooled).err().map(|(_, p)| *p),
        None => Some(pooled),
    };
    if let Some(mut pooled) = refused {
        net::close_gently(pooled.conn.get_mut(), Duration::from_secs(1)).await;
    }
}

/// One read attempt that never waits: true when nothing is there to read (the connection is
/// idle, as it must be between clients: bytes or an end of stream here mean it is not).
fn idle_now(stream: &mut Stream) -> bool {
    use futures::FutureExt;
    let mut probe = [0u8; 1];
    stream.read(&mut probe).now_or_never().is_none()
}

/// Whether a reuse-framed connection that served `reuse` takes its last client now.
pub(crate) fn is_last(reuse: &Reuse, limits: &crate::config::Limits) -> bool {
    reuse.clients + 1 >= limits.data_reuse_clients || reuse.bytes >= limits.data_reuse_bytes
}
