//! Network Block Device (NBD) protocol: wire format, async client, async
//! server. Spec: NetworkBlockDevice/nbd `doc/proto.md` (fixed newstyle
//! handshake, structured replies, metadata contexts; no TLS, no extended
//! headers).
//!
//! Invariants:
//! - [`proto`] is pure and never panics on any byte sequence; client and
//!   server do all parsing through it.
//! - Every length that arrives from the peer is capped before allocation
//!   (`proto::MAX_OPTION_LEN`, `proto::MAX_PAYLOAD`).
//! - Client and server never `unwrap`/`expect` on wire data; a malformed
//!   peer gets an error reply or a closed connection.

pub mod client;
pub mod export;
pub mod proto;
pub mod server;
mod uri;

pub use client::{Client, ClientError, ConnectOptions, Extent, PendingRead};
pub use export::{Export, FileExport, ReadPart};
pub use server::{Server, ServerConfig, ShutdownHandle};
pub use uri::{parse_uri, NbdUri};
