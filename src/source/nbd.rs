//! An NBD export as a backup source: allocation from `base:allocation`, changed blocks from
//! `qemu:dirty-bitmap:NAME`, reads spread over several requests in flight and, where the
//! server advertises multi-conn, several connections.

use super::{Extent, ReadJob, Source, SourceError};
use crate::nbd::{proto, Client, ConnectOptions, PendingRead};
use bytes::BytesMut;
use std::sync::Arc;

/// Requests in flight per connection, and the size of each read request.
const IN_FLIGHT: usize = 16;
/// Jobs (segments, 4 MiB each by default) read at once: enough requests in flight to hide the
/// round trips (measured on 2 cores: 4, 6 and 8; the earlier design measured 2 to 8 readers).
const JOBS_IN_FLIGHT: usize = 6;
const READ_PIECE: u64 = 1 << 20;
/// Connections to open when the server allows multi-conn.
const MULTI_CONN: usize = 4;
/// Block status is asked in steps of this many bytes.
const STATUS_STEP: u64 = 1 << 30;

pub struct NbdSource {
    uri: String,
    rt: tokio::runtime::Runtime,
    clients: Arc<[Arc<Client>]>,
    size: u64,
    bitmap: Option<String>,
}

fn err(uri: &str, e: impl std::fmt::Display) -> SourceError {
    SourceError::Nbd {
        uri: uri.to_string(),
        msg: e.to_string(),
    }
}

impl NbdSource {
    /// Connect; with `bitmap`, also select `qemu:dirty-bitmap:<bitmap>` (an error if the server
    /// does not offer it).
    pub fn connect(uri: &str, bitmap: Option<&str>) -> Result<Self, SourceError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| err(uri, e))?;
        let mut contexts = vec![proto::CONTEXT_BASE_ALLOCATION.to_string()];
        if let Some(b) = bitmap {
            contexts.push(format!("qemu:dirty-bitmap:{b}"));
        }
        let opts = ConnectOptions {
            meta_contexts: contexts.clone(),
            max_in_flight: IN_FLIGHT,
            ..Default::default()
        };
        let first = rt.block_on(Client::connect(uri, &opts)).map_err(|e| {
            err(
                uri,
                format!("cannot connect ({e}); is the NBD server running and the URI right?"),
            )
        })?;
        let have: Vec<&str> = first
            .meta_contexts()
            .iter()
            .map(|(_, n)| n.as_str())
            .collect();
        for c in &contexts {
            if !have.contains(&c.as_str()) {
                return Err(err(uri, format!("the server does not offer {c}; check the bitmap name (qemu-nbd -B NAME, or the export's bitmaps)")));
            }
        }
        let mut clients = vec![Arc::new(first)];
        if clients[0].can_multi_conn() {
            for _ in 1..MULTI_CONN {
                let c = rt
                    .block_on(Client::connect(uri, &opts))
                    .map_err(|e| err(uri, e))?;
                clients.push(Arc::new(c));
            }
        }
        let size = clients[0].size();
        Ok(NbdSource {
            uri: uri.to_string(),
            rt,
            clients: clients.into(),
            size,
            bitmap: bitmap.map(String::from),
        })
    }

    /// Ranges of one context whose flags match `want`, merged.
    fn ranges(
        &self,
        context: &str,
        want: impl Fn(u32) -> bool,
    ) -> Result<Vec<Extent>, SourceError> {
        let c = self.clients[0].clone();
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = 0;
        while pos < self.size {
            let len = STATUS_STEP.min(self.size - pos) as u32;
            let ex = self
                .rt
                .block_on(c.block_status_for(pos, len, context))
                .map_err(|e| err(&self.uri, e))?;
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
                return Err(err(
                    &self.uri,
                    format!("block status at {pos} made no progress"),
                ));
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
        self.ranges(proto::CONTEXT_BASE_ALLOCATION, |f| {
            f & (proto::STATE_HOLE | proto::STATE_ZERO) == 0
        })
    }

    fn dirty(&self) -> Result<Option<Vec<Extent>>, SourceError> {
        let Some(b) = &self.bitmap else {
            return Ok(None);
        };
        self.ranges(&format!("qemu:dirty-bitmap:{b}"), |f| {
            f & proto::STATE_DIRTY != 0
        })
        .map(Some)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), SourceError> {
        let job = ReadJob {
            tag: 0,
            offset,
            buf: BytesMut::zeroed(buf.len()),
            ranges: vec![(0, buf.len())],
        };
        let got = self
            .rt
            .block_on(read_job(self.clients.clone(), 0, job, self.uri.clone()))?;
        buf.copy_from_slice(&got.buf);
        Ok(())
    }

    /// Up to `JOBS_IN_FLIGHT` jobs at once, all on this thread: the runtime is single-threaded,
    /// so the connections' reply readers and the jobs hand over to each other without a thread
    /// switch, and a finished job goes to `done` (the pipeline) straight from here.
    fn read_jobs(
        &self,
        next: &mut dyn FnMut() -> Option<ReadJob>,
        done: &mut dyn FnMut(Result<ReadJob, SourceError>) -> bool,
    ) {
        self.rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            let (mut more, mut turn) = (true, 0);
            loop {
                while more && set.len() < JOBS_IN_FLIGHT {
                    match next() {
                        Some(job) => {
                            set.spawn(read_job(self.clients.clone(), turn, job, self.uri.clone()));
                            turn += 1;
                        }
                        None => more = false,
                    }
                }
                let Some(r) = set.join_next().await else {
                    return;
                };
                if !done(r.map_err(|e| err(&self.uri, e)).and_then(|r| r)) {
                    set.abort_all();
                    return;
                }
            }
        })
    }

    fn describe(&self) -> String {
        self.uri.clone()
    }

    fn bitmap(&self) -> Option<String> {
        self.bitmap.clone()
    }
}

/// Read one job: its ranges in request-sized pieces spread over the connections starting at
/// `turn`, every request sent before the first reply is awaited. The buffer is split into
/// pieces of the same allocation and joined again, so replies land where the job keeps them.
async fn read_job(
    clients: Arc<[Arc<Client>]>,
    turn: usize,
    mut job: ReadJob,
    uri: String,
) -> Result<ReadJob, SourceError> {
    let mut rest = std::mem::take(&mut job.buf);
    let total = rest.len();
    let mut parts: Vec<(BytesMut, Option<u64>)> = Vec::new(); // Some(disk offset): to read
    let mut pos = 0;
    for &(a, b) in &job.ranges {
        if a < pos || b > total || a > b {
            return Err(err(
                &uri,
                "read job ranges out of order or outside the buffer",
            ));
        }
        if a > pos {
            parts.push((rest.split_to(a - pos), None));
        }
        let mut at = a;
        while at < b {
            let n = (READ_PIECE as usize).min(b - at);
            parts.push((rest.split_to(n), Some(job.offset + at as u64)));
            at += n;
        }
        pos = b;
    }
    parts.push((rest, None));
    enum Part {
        Kept(BytesMut),
        Reading(u64, PendingRead),
    }
    let mut sent = Vec::with_capacity(parts.len());
    for (i, (part, at)) in parts.into_iter().enumerate() {
        sent.push(match at {
            Some(at) => {
                let c = &clients[(turn + i) % clients.len()];
                Part::Reading(
                    at,
                    c.send_read(at, part)
                        .await
                        .map_err(|e| read_err(&uri, at, e))?,
                )
            }
            None => Part::Kept(part),
        });
    }
    let mut whole = BytesMut::new();
    for part in sent {
        whole.unsplit(match part {
            Part::Kept(p) => p,
            Part::Reading(at, r) => r.data().await.map_err(|e| read_err(&uri, at, e))?,
        }); // neighbours in one allocation: no copy
    }
    job.buf = whole;
    Ok(job)
}

fn read_err(uri: &str, offset: u64, e: impl std::fmt::Display) -> SourceError {
    SourceError::Read {
        path: uri.to_string(),
        offset,
        source: std::io::Error::other(e.to_string()),
    }
}
