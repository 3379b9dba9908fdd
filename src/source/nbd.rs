//! An NBD export as a backup source: allocation from `base:allocation`, changed blocks from
//! `qemu:dirty-bitmap:NAME`, reads spread over several requests in flight and, where the
//! server advertises multi-conn, several connections.

use super::{Extent, Source, SourceError};
use crate::nbd::{proto, Client, ConnectOptions};
use std::sync::Arc;

/// Requests in flight per connection, and the size of each read request.
const IN_FLIGHT: usize = 16;
const READ_PIECE: u64 = 1 << 20;
/// Connections to open when the server allows multi-conn.
const MULTI_CONN: usize = 4;
/// Block status is asked in steps of this many bytes.
const STATUS_STEP: u64 = 1 << 30;

pub struct NbdSource {
    uri: String,
    rt: tokio::runtime::Runtime,
    clients: Vec<Arc<Client>>,
    size: u64,
    bitmap: Option<String>,
    /// Read buffers reused across requests (a fresh 256 KiB allocation per request costs
    /// more in page faults than the copy out of it).
    pool: std::sync::Mutex<Vec<Vec<u8>>>,
}

fn err(uri: &str, e: impl std::fmt::Display) -> SourceError {
    SourceError::Nbd { uri: uri.to_string(), msg: e.to_string() }
}

impl NbdSource {
    /// Connect; with `bitmap`, also select `qemu:dirty-bitmap:<bitmap>` (an error if the server
    /// does not offer it).
    pub fn connect(uri: &str, bitmap: Option<&str>) -> Result<Self, SourceError> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(|e| err(uri, e))?;
        let mut contexts = vec![proto::CONTEXT_BASE_ALLOCATION.to_string()];
        if let Some(b) = bitmap {
            contexts.push(format!("qemu:dirty-bitmap:{b}"));
        }
        let opts = ConnectOptions { meta_contexts: contexts.clone(), max_in_flight: IN_FLIGHT, ..Default::default() };
        let first = rt.block_on(Client::connect(uri, &opts)).map_err(|e| err(uri, format!("cannot connect ({e}); is the NBD server running and the URI right?")))?;
        let have: Vec<&str> = first.meta_contexts().iter().map(|(_, n)| n.as_str()).collect();
        for c in &contexts {
            if !have.contains(&c.as_str()) {
                return Err(err(uri, format!("the server does not offer {c}; check the bitmap name (qemu-nbd -B NAME, or the export's bitmaps)")));
            }
        }
        let mut clients = vec![Arc::new(first)];
        if clients[0].can_multi_conn() {
            for _ in 1..MULTI_CONN {
                let c = rt.block_on(Client::connect(uri, &opts)).map_err(|e| err(uri, e))?;
                clients.push(Arc::new(c));
            }
        }
        let size = clients[0].size();
        Ok(NbdSource { uri: uri.to_string(), rt, clients, size, bitmap: bitmap.map(String::from), pool: Default::default() })
    }

    /// Ranges of one context whose flags match `want`, merged.
    fn ranges(&self, context: &str, want: impl Fn(u32) -> bool) -> Result<Vec<Extent>, SourceError> {
        let c = self.clients[0].clone();
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = 0;
        while pos < self.size {
            let len = STATUS_STEP.min(self.size - pos) as u32;
            let ex = self.rt.block_on(c.block_status_for(pos, len, context)).map_err(|e| err(&self.uri, e))?;
            let mut advanced = pos;
            for e in ex {
                let end = (e.offset + u64::from(e.len)).min(self.size);
                if want(e.flags) && end > e.offset {
                    match out.last_mut() {
                        Some(last) if last.1 == e.offset => last.1 = end,
                        _ => out.push((e.offset, end)),
                    }
                }
                advanced = advanced.max(end);
            }
            if advanced <= pos {
                return Err(err(&self.uri, format!("block status at {pos} made no progress")));
            }
            pos = advanced;
        }
        Ok(out)
    }
}

impl Source for NbdSource {
    fn size(&self) -> u64 {
        self.size
    }

    /// Data is whatever is neither a hole nor known to read as zeros.
    fn extents(&self) -> Result<Vec<Extent>, SourceError> {
        self.ranges(proto::CONTEXT_BASE_ALLOCATION, |f| f & (proto::STATE_HOLE | proto::STATE_ZERO) == 0)
    }

    fn dirty(&self) -> Result<Option<Vec<Extent>>, SourceError> {
        let Some(b) = &self.bitmap else { return Ok(None) };
        self.ranges(&format!("qemu:dirty-bitmap:{b}"), |f| f & proto::STATE_DIRTY != 0).map(Some)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), SourceError> {
        let n = self.clients.len();
        let pieces: Vec<(usize, u64, u32)> = (0..buf.len() as u64)
            .step_by(READ_PIECE as usize)
            .enumerate()
            .map(|(i, at)| (i % n, offset + at, READ_PIECE.min(buf.len() as u64 - at) as u32))
            .collect();
        let clients = &self.clients;
        let spares: Vec<Vec<u8>> = {
            let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            (0..pieces.len()).map(|_| p.pop().unwrap_or_default()).collect()
        };
        let results = self.rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for ((i, (ci, at, len)), spare) in pieces.iter().copied().enumerate().zip(spares) {
                let c = clients[ci].clone();
                set.spawn(async move { (i, c.read_with(at, len, spare).await) });
            }
            let mut out = Vec::with_capacity(pieces.len());
            while let Some(r) = set.join_next().await {
                out.push(r);
            }
            out
        });
        for r in results {
            let (i, data) = r.map_err(|e| err(&self.uri, e))?;
            let data = data.map_err(|e| SourceError::Read { path: self.uri.clone(), offset: pieces[i].1, source: std::io::Error::other(e.to_string()) })?;
            let start = (pieces[i].1 - offset) as usize;
            if data.len() != pieces[i].2 as usize {
                return Err(err(&self.uri, "short read"));
            }
            buf[start..start + data.len()].copy_from_slice(&data);
            let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            if p.len() < 64 {
                p.push(data);
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.uri.clone()
    }

    fn bitmap(&self) -> Option<String> {
        self.bitmap.clone()
    }

    /// Segments read at once: each spreads its requests over the connections; six keep enough
    /// requests in flight to hide the round trips (measured: 2, 3, 4, 6, 8 readers).
    fn parallel_readers(&self) -> usize {
        6
    }
}
