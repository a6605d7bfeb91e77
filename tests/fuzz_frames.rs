use sallyport::protocol::*;
use std::mem::size_of;
use std::net::SocketAddr;
#[test]
fn sizes() {
    eprintln!(
        "ListenerSpec {} ListenerResult {} SocketAddr {} String {} Message {} ListenerStatus {}",
        size_of::<ListenerSpec>(),
        size_of::<ListenerResult>(),
        size_of::<SocketAddr>(),
        size_of::<String>(),
        size_of::<Message>(),
        size_of::<ListenerStatus>()
    );
}
