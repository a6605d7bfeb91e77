//! A TCP relay between agent and gateway that knows which connections are control channels
//! (it decodes each connection's hello with the library's own protocol module) and can cut
//! them: reset every control connection and refuse new connections for a while, leaving data
//! connections untouched. It can also silence control channels without closing them.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use sallyport::protocol::{Message, RawFrame, Role, MAGIC};
use socket2::SockRef;

struct Link {
    down: TcpStream,
    up: TcpStream,
    cut: Arc<AtomicBool>,
}

#[derive(Default)]
struct State {
    controls: Vec<Link>,
    refuse_until: Option<Instant>,
}

pub struct Relay {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// While set, bytes on control connections toward the gateway are swallowed.
    silent_to_gateway: Arc<AtomicBool>,
    /// While set, bytes on control connections toward the agent are swallowed.
    silent_to_agent: Arc<AtomicBool>,
    pub control_conns: Arc<AtomicUsize>,
    pub data_conns: Arc<AtomicUsize>,
    pub refused: Arc<AtomicUsize>,
}

impl Relay {
    pub fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let relay = Relay {
            addr,
            state: Arc::default(),
            silent_to_gateway: Arc::default(),
            silent_to_agent: Arc::default(),
            control_conns: Arc::default(),
            data_conns: Arc::default(),
            refused: Arc::default(),
        };
        let state = relay.state.clone();
        let silent = (
            relay.silent_to_gateway.clone(),
            relay.silent_to_agent.clone(),
        );
        let (controls, datas, refused) = (
            relay.control_conns.clone(),
            relay.data_conns.clone(),
            relay.refused.clone(),
        );
        std::thread::spawn(move || {
            for down in listener.incoming() {
                let Ok(down) = down else { continue };
                let refusing = state
                    .lock()
                    .refuse_until
                    .is_some_and(|t| Instant::now() < t);
                if refusing {
                    refused.fetch_add(1, Ordering::SeqCst);
                    let _ = SockRef::from(&down).set_linger(Some(Duration::ZERO));
                    drop(down);
                    continue;
                }
                let (state, silent) = (state.clone(), silent.clone());
                let (controls, datas) = (controls.clone(), datas.clone());
                std::thread::spawn(move || {
                    handle(down, upstream, state, silent, controls, datas);
                });
            }
        });
        relay
    }

    /// Resets every live control connection and refuses all new connections for `refuse_for`.
    pub fn cut_control(&self, refuse_for: Duration) {
        let mut state = self.state.lock();
        state.refuse_until = Some(Instant::now() + refuse_for);
        for link in state.controls.drain(..) {
            link.cut.store(true, Ordering::SeqCst);
            for s in [&link.down, &link.up] {
                let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
                let _ = s.shutdown(Shutdown::Read);
            }
        }
    }

    /// Swallows (or again forwards) what control connections send toward the gateway and/or
    /// the agent, keeping the connections open: a peer that went silent.
    pub fn set_control_silent(&self, to_gateway: bool, to_agent: bool) {
        self.silent_to_gateway.store(to_gateway, Ordering::SeqCst);
        self.silent_to_agent.store(to_agent, Ordering::SeqCst);
    }
}

/// Reads the preamble and the whole first frame, so the role is known before forwarding.
fn read_hello(down: &mut TcpStream) -> Option<(Vec<u8>, bool)> {
    let mut head = [0u8; 8];
    down.read_exact(&mut head).ok()?;
    if head[..4] != MAGIC {
        return Some((head.to_vec(), false));
    }
    let len = u32::from_be_bytes(head[4..8].try_into().unwrap()) as usize;
    if len > 64 * 1024 {
        return Some((head.to_vec(), false));
    }
    let mut body = vec![0u8; len];
    down.read_exact(&mut body).ok()?;
    let frame = RawFrame {
        kind: u16::from_be_bytes([body[0], body[1]]),
        payload: Bytes::copy_from_slice(&body[2..]),
    };
    let is_control = matches!(
        Message::from_frame(&frame),
        Ok(Some(Message::Hello(h))) if matches!(h.role, Role::Control(_))
    );
    let mut all = head.to_vec();
    all.extend_from_slice(&body);
    Some((all, is_control))
}

fn handle(
    mut down: TcpStream,
    upstream: SocketAddr,
    state: Arc<Mutex<State>>,
    silent: (Arc<AtomicBool>, Arc<AtomicBool>),
    controls: Arc<AtomicUsize>,
    datas: Arc<AtomicUsize>,
) {
    let Some((first, is_control)) = read_hello(&mut down) else {
        return;
    };
    let Ok(mut up) = TcpStream::connect(upstream) else {
        return;
    };
    if up.write_all(&first).is_err() {
        return;
    }
    let cut = Arc::new(AtomicBool::new(false));
    let (to_gateway, to_agent) = if is_control {
        controls.fetch_add(1, Ordering::SeqCst);
        state.lock().controls.push(Link {
            down: down.try_clone().unwrap(),
            up: up.try_clone().unwrap(),
            cut: cut.clone(),
        });
        (Some(silent.0), Some(silent.1))
    } else {
        datas.fetch_add(1, Ordering::SeqCst);
        (None, None)
    };
    let (d2, u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
    let cut2 = cut.clone();
    let t = std::thread::spawn(move || copy(d2, u2, &cut2, to_gateway.as_deref()));
    copy(up, down, &cut, to_agent.as_deref());
    let _ = t.join();
}

/// Copies until end of stream and passes the half-close on, unless the link was cut: then it
/// just drops its sockets, whose zero linger turns the close into a reset.
fn copy(mut from: TcpStream, mut to: TcpStream, cut: &AtomicBool, silent: Option<&AtomicBool>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if silent.is_some_and(|s| s.load(Ordering::SeqCst)) {
                    continue;
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    if !cut.load(Ordering::SeqCst) {
        let _ = to.shutdown(Shutdown::Write);
    }
}
