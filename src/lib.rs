//! # Sallyport
//!
//! A DMZ gateway: it exposes internal TCP services (SFTP, FTPS, HTTPS, any TCP protocol) to the
//! internet without a single inbound connection from the DMZ into the internal network, and
//! without storing configuration or payload in the DMZ.
//!
//! Two daemons come from one binary:
//!
//! - the [`gateway`] runs in the DMZ and holds almost no configuration of its own;
//! - the [`agent`] runs inside, dials *out* to the gateway's control port, pushes the listener
//!   configuration, and for each client dials a data connection back and connects to the
//!   backend. The gateway pipes the client and the data connection together.
//!
//! The wire protocol between them is in [`protocol`] (specified in `docs/protocol.md`); the
//! config files in [`config`]; the byte pump in [`pipe`].

pub mod access;
pub mod addr;
pub mod agent;
pub mod certs;
pub mod cli;
pub mod config;
pub mod demo;
pub mod gateway;
pub mod limits;
pub mod net;
pub mod pipe;
pub mod protocol;
pub mod transport;
