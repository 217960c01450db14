//! Training across machines: the node level of a data-parallel run.
//!
//! Every machine (a node) runs `pf train` with the same recipe and data, and its own devices
//! (see [`crate::parallel`]); node 0, the master, listens on `--master ADDR:PORT` and every other
//! node connects to it. Within a node the devices sum their gradients on burn-collective; across
//! nodes the master adds the nodes' sums in node order and sends the total back to every node
//! (a star: one bucket up and one down per node and step), so every device of every node steps
//! on the same bits.
//!
//! burn-collective 0.21 has a global level too, but it has no timeouts (a node that dies leaves
//! the others blocked for good) and its global reduce and broadcast are unimplemented; this one
//! is small and owns its failure modes. Every connection carries a heartbeat while its node
//! computes, validates or writes a checkpoint: a node that sends nothing for the timeout, or whose
//! connection closes (its process ended), stops the run on every node with an error that names
//! it. The master also checks, before the first step, that every node runs the same recipe, model,
//! data and device count, and sends every node the weights to start from (its own, or on
//! `--resume` its latest checkpoint with the optimizer state), so that only the master needs the
//! `--init` file or the checkpoints.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where a node stands in the group, from `--nodes`, `--node-rank`, `--master` and `--node-timeout`.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub nodes: usize,
    pub rank: usize,
    /// The master's address (`HOST:PORT`); the master listens on it.
    pub master: String,
    /// How long a node may stay silent (no heartbeat, no answer) before the others give it up.
    pub timeout: Duration,
}

impl NodeSpec {
    /// Checks the flags together; `None` for a run on one node.
    pub fn new(nodes: usize, rank: usize, master: Option<String>, timeout_s: f64) -> Result<Option<Self>> {
        if nodes == 0 {
            return Err(Error::flag("--nodes", "0: give at least 1"));
        }
        if rank >= nodes {
            return Err(Error::flag("--node-rank", format!("{rank} is not below --nodes {nodes} (ranks are 0 to {})", nodes - 1)));
        }
        if !(timeout_s.is_finite() && (1.0..=86_400.0).contains(&timeout_s)) {
            return Err(Error::flag("--node-timeout", format!("{timeout_s}: give 1 to 86400 seconds")));
        }
        if nodes == 1 {
            return Ok(None);
        }
        let master =
            master.ok_or_else(|| Error::flag("--master", format!("is needed with --nodes {nodes}: the master's HOST:PORT, the same on every node")))?;
        resolve(&master)?;
        Ok(Some(Self { nodes, rank, master, timeout: Duration::from_secs_f64(timeout_s) }))
    }
}

fn resolve(master: &str) -> Result<SocketAddr> {
    let bad = |reason: String| Error::flag("--master", format!("{master}: {reason}"));
    let mut addrs = master.to_socket_addrs().map_err(|e| bad(format!("not a HOST:PORT address ({e})")))?;
    addrs.next().ok_or_else(|| bad("resolves to no address".into()))
}

/// What every node must agree on before the first step (compared as JSON).
#[derive(Serialize, Deserialize)]
struct Hello {
    rank: usize,
    nodes: usize,
    /// The run as this node sees it: recipe, model, data size, devices, resume.
    run: String,
}

/// The kinds of message on a connection.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(u8)]
enum Tag {
    Hello = 1,
    /// The master's answer to a hello: the files to start from.
    Start = 2,
    /// A bucket: up, a node's sum; down, the total.
    Sum = 3,
    /// The master stops the run; the payload says why.
    Abort = 4,
    Heartbeat = 5,
    /// The master is ready for the nodes' buckets.
    Go = 6,
}

impl Tag {
    fn from_byte(byte: u8) -> Option<Self> {
        [Tag::Hello, Tag::Start, Tag::Sum, Tag::Abort, Tag::Heartbeat, Tag::Go].into_iter().find(|t| *t as u8 == byte)
    }
}

/// The largest message accepted: a bucket of a billion values.
const MAX_MESSAGE: u64 = 4 << 30;

/// One connection: to the master (on a node), or to one node (on the master).
struct Link {
    node: usize,
    reader: TcpStream,
    writer: Arc<Mutex<TcpStream>>,
}

impl Link {
    fn send(&self, tag: Tag, payload: &[u8]) -> std::io::Result<()> {
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        send_on(&mut writer, tag, payload)
    }

    /// Sends `values` as one `tag` message: on a little-endian machine their own bytes, without
    /// a copy.
    fn send_values(&self, tag: Tag, values: &[f32]) -> std::io::Result<()> {
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        writer.write_all(&head(tag, 4 * values.len()))?;
        #[cfg(target_endian = "little")]
        writer.write_all(wire(values))?;
        #[cfg(not(target_endian = "little"))]
        for chunk in values.chunks(CHUNK) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
            writer.write_all(&bytes)?;
        }
        writer.flush()
    }

    /// The kind and length of the next message other than a heartbeat; a closed connection and
    /// a silence of the read timeout are errors.
    fn recv_head(&mut self) -> std::io::Result<(Tag, usize)> {
        loop {
            let mut head = [0u8; 9];
            self.reader.read_exact(&mut head)?;
            let tag = Tag::from_byte(head[0]).ok_or_else(|| invalid(format!("unknown message kind {}", head[0])))?;
            let len = u64::from_le_bytes(head[1..].try_into().expect("8 bytes"));
            if len > MAX_MESSAGE {
                return Err(invalid(format!("a message of {len} bytes")));
            }
            if tag != Tag::Heartbeat {
                return Ok((tag, len as usize));
            }
            // A heartbeat has no payload.
        }
    }

    /// The payload of an `Abort` of `bytes` bytes: why the other side stopped.
    fn read_reason(&mut self, bytes: usize) -> Vec<u8> {
        let mut reason = vec![0u8; bytes];
        match self.reader.read_exact(&mut reason) {
            Ok(()) => reason,
            Err(e) => format!("(its reason was lost: {e})").into_bytes(),
        }
    }

    /// The next message other than a heartbeat.
    fn recv(&mut self) -> std::io::Result<(Tag, Vec<u8>)> {
        let (tag, len) = self.recv_head()?;
        let mut payload = vec![0u8; len];
        self.reader.read_exact(&mut payload)?;
        Ok((tag, payload))
    }

    /// Reads the payload of a message of `values.len()` f32s and adds it to `values` (`add`,
    /// a slice at a time) or stores it there.
    fn recv_values(&mut self, values: &mut [f32], add: bool) -> std::io::Result<()> {
        #[cfg(target_endian = "little")]
        if !add {
            return self.reader.read_exact(wire_mut(values));
        }
        let mut incoming = vec![0f32; CHUNK];
        for chunk in values.chunks_mut(CHUNK) {
            let incoming = &mut incoming[..chunk.len()];
            #[cfg(target_endian = "little")]
            self.reader.read_exact(wire_mut(incoming))?;
            #[cfg(not(target_endian = "little"))]
            {
                let mut bytes = vec![0u8; 4 * incoming.len()];
                self.reader.read_exact(&mut bytes)?;
                for (v, b) in incoming.iter_mut().zip(bytes.chunks_exact(4)) {
                    *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            if add {
                for (v, x) in chunk.iter_mut().zip(incoming.iter()) {
                    *v += x;
                }
            } else {
                chunk.copy_from_slice(incoming);
            }
        }
        Ok(())
    }
}

/// The bytes of `values` as they travel (little-endian f32, this machine's own layout).
#[cfg(target_endian = "little")]
fn wire(values: &[f32]) -> &[u8] {
    // SAFETY: the bytes of initialised f32s are initialised u8s, u8 needs no alignment, and
    // the slice covers exactly the values' memory for as long as they are borrowed.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values)) }
}

#[cfg(target_endian = "little")]
fn wire_mut(values: &mut [f32]) -> &mut [u8] {
    // SAFETY: as `wire`, and any 4 bytes written through the view are a valid f32.
    unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(values)) }
}

/// Values per slice of a bucket on the wire (1 MiB).
const CHUNK: usize = 1 << 18;

/// A message's head: its kind, then its payload's length in bytes (u64, little-endian).
fn head(tag: Tag, len: usize) -> [u8; 9] {
    let mut head = [0u8; 9];
    head[0] = tag as u8;
    head[1..].copy_from_slice(&(len as u64).to_le_bytes());
    head
}

fn send_on(stream: &mut TcpStream, tag: Tag, payload: &[u8]) -> std::io::Result<()> {
    stream.write_all(&head(tag, payload.len()))?;
    stream.write_all(payload)?;
    stream.flush()
}

fn invalid(reason: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, reason)
}

/// What went wrong on a connection, in words: "closed" (its process ended) or "silent".
fn lost(e: &std::io::Error, timeout: Duration) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe => "its connection closed (its process ended or its machine went away)".into(),
        WouldBlock | TimedOut => format!("it sent nothing for {} s (--node-timeout)", timeout.as_secs_f64()),
        _ => format!("its connection failed: {e}"),
    }
}

/// This node's connections, and the heartbeat that keeps them alive.
pub struct NodeGroup {
    spec: NodeSpec,
    links: Vec<Link>,
    stop: Arc<AtomicBool>,
    heartbeat: Option<JoinHandle<()>>,
    /// Exchanges done and their total time (for the figures at the end of a run).
    exchanges: usize,
    exchanging: Duration,
    values: usize,
}

impl NodeGroup {
    /// Connects the group: the master waits for every other node, a node connects to the
    /// master (retrying until the timeout: the master may start later). `run` describes the run
    /// as this node sees it; every node's must equal the master's.
    pub fn connect(spec: NodeSpec, run: &impl Serialize) -> Result<Self> {
        let run = serde_json::to_string(run).map_err(|e| Error::Tensor(format!("describing the run: {e}")))?;
        let links = if spec.rank == 0 { Self::gather(&spec, &run)? } else { vec![Self::join(&spec, &run)?] };
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = links.iter().map(|l| l.writer.clone()).collect();
        let beat = (spec.timeout / 4).max(Duration::from_millis(100));
        let flag = stop.clone();
        let heartbeat = std::thread::Builder::new()
            .name("pf-heartbeat".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    for writer in &writers {
                        // A failed send is seen by the reader of the same connection.
                        if let Ok(mut w) = writer.try_lock() {
                            let _ = send_on(&mut w, Tag::Heartbeat, &[]);
                        }
                    }
                    let until = Instant::now() + beat;
                    while !flag.load(Ordering::Relaxed) && Instant::now() < until {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            })
            .map_err(|e| Error::Node { node: spec.rank, reason: format!("starting the heartbeat: {e}") })?;
        Ok(Self { spec, links, stop, heartbeat: Some(heartbeat), exchanges: 0, exchanging: Duration::ZERO, values: 0 })
    }

    pub fn rank(&self) -> usize {
        self.spec.rank
    }

    pub fn nodes(&self) -> usize {
        self.spec.nodes
    }

    pub fn is_master(&self) -> bool {
        self.spec.rank == 0
    }

    fn gather(spec: &NodeSpec, run: &str) -> Result<Vec<Link>> {
        let addr = resolve(&spec.master)?;
        let listener = TcpListener::bind(addr).map_err(|e| Error::flag("--master", format!("{}: cannot listen there ({e})", spec.master)))?;
        listener.set_nonblocking(true).map_err(|e| Error::Node { node: 0, reason: format!("listening: {e}") })?;
        println!("node 0 of {}: waiting for {} more on {}", spec.nodes, spec.nodes - 1, spec.master);
        let deadline = Instant::now() + spec.timeout;
        let mut links: Vec<Option<Link>> = (0..spec.nodes).map(|_| None).collect();
        while links.iter().skip(1).any(Option::is_none) {
            let (stream, from) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        let missing: Vec<String> = (1..spec.nodes).filter(|&n| links[n].is_none()).map(|n| n.to_string()).collect();
                        let error = Error::Node {
                            node: 0,
                            reason: format!("node(s) {} did not join within {} s (--node-timeout)", missing.join(", "), spec.timeout.as_secs_f64()),
                        };
                        abort_all(links.iter().flatten(), &error);
                        return Err(error);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => return Err(Error::Node { node: 0, reason: format!("accepting a node: {e}") }),
            };
            let mut link = match Self::link(stream, usize::MAX, spec.timeout) {
                Ok(link) => link,
                Err(_) => continue,
            };
            let hello = match link.recv() {
                Ok((Tag::Hello, payload)) => serde_json::from_slice::<Hello>(&payload).ok(),
                _ => None,
            };
            // Something that is not a pf node (a port scan, a stray client): ignored.
            let Some(hello) = hello else { continue };
            link.node = hello.rank;
            let refused = if hello.nodes != spec.nodes {
                Some(format!("node {} (at {from}) was started with --nodes {}, the master with --nodes {}", hello.rank, hello.nodes, spec.nodes))
            } else if hello.rank == 0 || hello.rank >= spec.nodes {
                Some(format!("a node at {from} claims --node-rank {}; ranks 1 to {} join the master", hello.rank, spec.nodes - 1))
            } else if links[hello.rank].is_some() {
                Some(format!("two nodes claim --node-rank {} (the second at {from})", hello.rank))
            } else if hello.run != run {
                Some(format!(
                    "node {} (at {from}) runs another recipe, model, dataset or device count than the master:\n  master:  {run}\n  node {}:  {}",
                    hello.rank, hello.rank, hello.run
                ))
            } else {
                None
            };
            if let Some(reason) = refused {
                let error = Error::Node { node: hello.rank, reason };
                abort_all(std::iter::once(&link).chain(links.iter().flatten()), &error);
                return Err(error);
            }
            println!("node {} joined from {from}", hello.rank);
            let rank = hello.rank;
            links[rank] = Some(link);
        }
        Ok(links.into_iter().flatten().collect())
    }

    fn join(spec: &NodeSpec, run: &str) -> Result<Link> {
        let addr = resolve(&spec.master)?;
        let deadline = Instant::now() + spec.timeout;
        let stream = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(stream) => break stream,
                Err(e) if Instant::now() > deadline => {
                    return Err(Error::Node {
                        node: 0,
                        reason: format!("the master at {} could not be reached within {} s: {e}", spec.master, spec.timeout.as_secs_f64()),
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        let link = Self::link(stream, 0, spec.timeout)?;
        let hello = serde_json::to_vec(&Hello { rank: spec.rank, nodes: spec.nodes, run: run.to_string() }).expect("a hello serializes");
        link.send(Tag::Hello, &hello).map_err(|e| Error::Node { node: 0, reason: format!("greeting the master at {}: {e}", spec.master) })?;
        println!("node {} of {}: joined the master at {}", spec.rank, spec.nodes, spec.master);
        Ok(link)
    }

    fn link(stream: TcpStream, node: usize, timeout: Duration) -> Result<Link> {
        let failed = |e: std::io::Error| Error::Node { node, reason: format!("setting up its connection: {e}") };
        stream.set_nonblocking(false).map_err(failed)?;
        stream.set_nodelay(true).map_err(failed)?;
        stream.set_read_timeout(Some(timeout)).map_err(failed)?;
        stream.set_write_timeout(Some(timeout)).map_err(failed)?;
        let writer = stream.try_clone().map_err(failed)?;
        Ok(Link { node, reader: stream, writer: Arc::new(Mutex::new(writer)) })
    }

    /// The error for a connection to `node` that failed with `e`; on the master, every other
    /// node is told before the error returns.
    fn failed(&self, node: usize, e: &std::io::Error) -> Error {
        let what = if node == 0 { format!("the master ({})", self.spec.master) } else { format!("node {node}") };
        let error = Error::Node { node, reason: format!("{what} stopped the run: {}", lost(e, self.spec.timeout)) };
        if self.is_master() {
            abort_all(self.links.iter().filter(|l| l.node != node), &error);
        }
        error
    }

    /// An `Abort` from the master: its reason.
    fn aborted(payload: &[u8]) -> Error {
        Error::Node { node: 0, reason: format!("the master stopped the run: {}", String::from_utf8_lossy(payload)) }
    }

    /// On the master, sends the files of `dir` (flat) to every node; on a node, receives them
    /// into `into` (created, emptied first) and returns it.
    pub fn start_files(&mut self, dir: Option<&Path>, into: &Path) -> Result<PathBuf> {
        if self.is_master() {
            let dir = dir.ok_or_else(|| Error::Node { node: 0, reason: "the master has no files to start the nodes from".into() })?;
            let payload = pack(dir)?;
            for link in &self.links {
                link.send(Tag::Start, &payload).map_err(|e| self.failed(link.node, &e))?;
            }
            return Ok(dir.to_path_buf());
        }
        let payload = match self.links[0].recv() {
            Ok((Tag::Start, payload)) => payload,
            Ok((Tag::Abort, payload)) => return Err(Self::aborted(&payload)),
            Ok((tag, _)) => return Err(Error::Node { node: 0, reason: format!("the master sent {tag:?} where the start was due") }),
            Err(e) => return Err(self.failed(0, &e)),
        };
        if into.exists() {
            std::fs::remove_dir_all(into).map_err(Error::io("emptying", into))?;
        }
        std::fs::create_dir_all(into).map_err(Error::io("creating", into))?;
        unpack(&payload, into)?;
        Ok(into.to_path_buf())
    }

    /// The sum over the nodes of `values` (the same length on every node), added in node order
    /// on the master; every node gets the same bits.
    pub fn sum(&mut self, mut values: Vec<f32>) -> Result<Vec<f32>> {
        let started = Instant::now();
        let len = values.len();
        if self.is_master() {
            // The nodes send once the master is here to read: a node that sent at once would
            // block in its write for as long as the master validates or writes a checkpoint,
            // and its write timeout would end the run.
            for link in &self.links {
                link.send(Tag::Go, &[]).map_err(|e| self.failed(link.node, &e))?;
            }
            // Node by node in rank order, each added as it arrives.
            for i in 0..self.links.len() {
                let node = self.links[i].node;
                let received = match self.links[i].recv_head() {
                    Ok((Tag::Sum, bytes)) if bytes == 4 * len => self.links[i].recv_values(&mut values, true),
                    Ok((Tag::Abort, bytes)) => {
                        let reason = self.links[i].read_reason(bytes);
                        let error = Error::Node { node, reason: format!("node {node} stopped the run: {}", String::from_utf8_lossy(&reason)) };
                        abort_all(self.links.iter().filter(|l| l.node != node), &error);
                        return Err(error);
                    }
                    Ok((tag, bytes)) => Err(invalid(format!("sent {tag:?} of {bytes} bytes where {len} gradient values were due"))),
                    Err(e) => Err(e),
                };
                received.map_err(|e| self.failed(node, &e))?;
            }
            for link in &self.links {
                link.send_values(Tag::Sum, &values).map_err(|e| self.failed(link.node, &e))?;
            }
        } else {
            // Waiting for the master reads its heartbeats: a master that validates is alive.
            match self.links[0].recv_head() {
                Ok((Tag::Go, 0)) => {}
                Ok((Tag::Abort, bytes)) => {
                    let reason = self.links[0].read_reason(bytes);
                    return Err(Self::aborted(&reason));
                }
                Ok((tag, bytes)) => return Err(self.failed(0, &invalid(format!("sent {tag:?} of {bytes} bytes where the go was due")))),
                Err(e) => return Err(self.failed(0, &e)),
            }
            self.links[0].send_values(Tag::Sum, &values).map_err(|e| self.failed(0, &e))?;
            let received = match self.links[0].recv_head() {
                Ok((Tag::Sum, bytes)) if bytes == 4 * len => self.links[0].recv_values(&mut values, false),
                Ok((Tag::Abort, bytes)) => {
                    let reason = self.links[0].read_reason(bytes);
                    return Err(Self::aborted(&reason));
                }
                Ok((tag, bytes)) => Err(invalid(format!("sent {tag:?} of {bytes} bytes where {len} summed values were due"))),
                Err(e) => Err(e),
            };
            received.map_err(|e| self.failed(0, &e))?;
        }
        self.exchanges += 1;
        self.exchanging += started.elapsed();
        self.values = len;
        Ok(values)
    }

    /// What tells the other machines that this one's run failed, for use after the group has
    /// been handed to the data-parallel engine.
    pub fn aborter(&self) -> Aborter {
        Aborter { writers: self.links.iter().map(|l| l.writer.clone()).collect() }
    }

    /// `(exchanges, mean time of one, bytes each way per node and exchange)`.
    pub fn figures(&self) -> (usize, Duration, usize) {
        (self.exchanges, self.exchanging / self.exchanges.max(1) as u32, 4 * self.values)
    }
}

impl Drop for NodeGroup {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(heartbeat) = self.heartbeat.take() {
            let _ = heartbeat.join();
        }
        // The connections close when their last handle goes: an `Aborter` may still have to
        // say why the run ended.
    }
}

/// Tells the other machines that this one's run failed and why: node 0 tells every node, a node
/// tells node 0 (which tells the others).
pub struct Aborter {
    writers: Vec<Arc<Mutex<TcpStream>>>,
}

impl Aborter {
    pub fn tell(&self, error: &Error) {
        // An error about another machine came from that machine or was already told.
        if matches!(error, Error::Node { .. }) {
            return;
        }
        abort_and_close(&self.writers, &error.to_string());
    }
}

fn abort_all<'a>(links: impl Iterator<Item = &'a Link>, error: &Error) {
    let writers: Vec<_> = links.map(|l| l.writer.clone()).collect();
    abort_and_close(&writers, &error.to_string());
}

/// How long a connection that was told why the run stopped stays open for the other side to
/// read it.
const LINGER: Duration = Duration::from_secs(3);

/// Sends `reason` as an `Abort` on every connection and ends them so that it arrives. A socket
/// closed while the other side's data lies unread in it (a gradient bucket, a heartbeat) resets
/// the connection, and the reset can discard the abort before the other side reads it; so this
/// side ends its half (nothing more is sent, not even a heartbeat), then reads and drops what
/// still comes until the other side closes too, for at most [`LINGER`] in all.
fn abort_and_close(writers: &[Arc<Mutex<TcpStream>>], reason: &str) {
    let mut ended = Vec::new();
    for writer in writers {
        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
        let _ = send_on(&mut w, Tag::Abort, reason.as_bytes());
        let _ = w.shutdown(Shutdown::Write);
        if let Ok(stream) = w.try_clone() {
            ended.push(stream);
        }
    }
    let deadline = Instant::now() + LINGER;
    let mut sink = vec![0u8; 1 << 16];
    for mut stream in ended {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
                return;
            }
            match stream.read(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}

/// The files of `dir` (not its folders) as one message: per file, its name's length and name,
/// its length and bytes.
fn pack(dir: &Path) -> Result<Vec<u8>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).map_err(Error::io("listing", dir))?.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect();
    entries.sort();
    let mut payload = Vec::new();
    for path in entries {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let bytes = std::fs::read(&path).map_err(Error::io("reading", &path))?;
        payload.extend((name.len() as u64).to_le_bytes());
        payload.extend(name.as_bytes());
        payload.extend((bytes.len() as u64).to_le_bytes());
        payload.extend(bytes);
    }
    Ok(payload)
}

fn unpack(mut payload: &[u8], into: &Path) -> Result<()> {
    let broken = || Error::Node { node: 0, reason: "the master's start files arrived broken".into() };
    let take = |payload: &mut &[u8]| -> Result<Vec<u8>> {
        let len = payload.get(..8).ok_or_else(broken)?;
        let len = u64::from_le_bytes(len.try_into().expect("8 bytes")) as usize;
        let bytes = payload.get(8..8usize.checked_add(len).ok_or_else(broken)?).ok_or_else(broken)?.to_vec();
        *payload = &payload[8 + len..];
        Ok(bytes)
    };
    while !payload.is_empty() {
        let name = String::from_utf8(take(&mut payload)?).map_err(|_| broken())?;
        if name.is_empty() || name.contains('/') || name.contains('\\') || name.starts_with('.') {
            return Err(broken());
        }
        let bytes = take(&mut payload)?;
        let path = into.join(&name);
        std::fs::write(&path, bytes).map_err(Error::io("writing", &path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rank: usize, port: u16) -> NodeSpec {
        NodeSpec { nodes: 3, rank, master: format!("127.0.0.1:{port}"), timeout: Duration::from_secs(5) }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// Three nodes as threads: the sums are the master's order of additions on every node, the
    /// start files arrive whole, and a node that goes away ends the others' next sum with an
    /// error naming it, well within the timeout.
    #[test]
    fn three_nodes_sum_in_order_and_a_lost_node_is_named() {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("pf-nodes-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("start")).unwrap();
        std::fs::write(dir.join("start/model.mpk"), vec![7u8; 100_000]).unwrap();
        std::fs::write(dir.join("start/state.json"), b"{}").unwrap();
        let values = |rank: usize| -> Vec<f32> { (0..1000).map(|i| (i as f32 + 0.1) * 1e-3 * (rank as f32 + 1.0) + if i == 0 { 1e8 } else { 0.0 }).collect() };
        let nodes: Vec<_> = (0..3)
            .map(|rank| {
                let dir = dir.clone();
                std::thread::spawn(move || -> Result<Vec<Vec<f32>>> {
                    let mut group = NodeGroup::connect(spec(rank, port), &"run")?;
                    let into = dir.join(format!("node-{rank}"));
                    let got = group.start_files(Some(&dir.join("start")), &into)?;
                    assert_eq!(std::fs::read(got.join("model.mpk")).unwrap(), vec![7u8; 100_000]);
                    let mut sums = vec![group.sum(values(rank))?, group.sum(values(rank))?];
                    if rank == 2 {
                        return Ok(sums);
                    }
                    let started = Instant::now();
                    match group.sum(values(rank)) {
                        Err(Error::Node { node, reason }) => {
                            assert_eq!(node, if rank == 0 { 2 } else { 0 }, "{reason}");
                            assert!(rank == 0 || reason.contains("node 2"), "{reason}");
                            assert!(started.elapsed() < Duration::from_secs(4), "took {:?}", started.elapsed());
                        }
                        other => panic!("node {rank}: a sum without node 2 gave {other:?}"),
                    }
                    sums.push(Vec::new());
                    Ok(sums)
                })
            })
            .collect();
        let results: Vec<Vec<Vec<f32>>> = nodes.into_iter().map(|n| n.join().unwrap().unwrap()).collect();
        let expected: Vec<f32> = {
            let (a, b, c) = (values(0), values(1), values(2));
            a.iter().zip(&b).zip(&c).map(|((a, b), c)| a + b + c).collect()
        };
        for (rank, sums) in results.iter().enumerate() {
            for sum in &sums[..2] {
                assert!(sum.iter().zip(&expected).all(|(s, e)| s.to_bits() == e.to_bits()), "node {rank}");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_node_of_another_run_is_refused_by_name() {
        let port = free_port();
        let spec2 = move |rank| NodeSpec { nodes: 2, ..spec(rank, port) };
        let master = std::thread::spawn(move || NodeGroup::connect(spec2(0), &"recipe a").err());
        let node = NodeGroup::connect(spec2(1), &"recipe b");
        let master = master.join().unwrap();
        assert!(matches!(&master, Some(Error::Node { node: 1, reason }) if reason.contains("recipe b")), "{master:?}");
        // The node learns it at its first message from the master.
        let mut node = node.unwrap();
        let started = node.start_files(None, &std::env::temp_dir().join("pf-nodes-refused"));
        assert!(matches!(&started, Err(Error::Node { node: 0, reason }) if reason.contains("another recipe")), "{:?}", started.err());
    }

    /// A node that joins and then falls silent (a hung or unplugged machine: no heartbeat, no
    /// closed connection) is given up after the timeout, by name.
    #[test]
    fn a_silent_node_is_given_up_after_the_timeout() {
        let port = free_port();
        let spec = NodeSpec { nodes: 2, rank: 0, master: format!("127.0.0.1:{port}"), timeout: Duration::from_secs(1) };
        let master = std::thread::spawn(move || -> Result<(Error, Duration)> {
            let mut group = NodeGroup::connect(spec, &"run")?;
            let started = Instant::now();
            let e = group.sum(vec![1.0; 10]).expect_err("no sum from a silent node");
            Ok((e, started.elapsed()))
        });
        let mut silent = loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => break s,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let hello = serde_json::to_vec(&Hello { rank: 1, nodes: 2, run: "\"run\"".into() }).unwrap();
        send_on(&mut silent, Tag::Hello, &hello).unwrap();
        let (e, waited) = master.join().unwrap().unwrap();
        assert!(matches!(&e, Error::Node { node: 1, reason } if reason.contains("sent nothing for 1 s")), "{e:?}");
        assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(5), "{waited:?}");
    }

    /// A master busy for longer than the timeout (validating, writing a checkpoint) while a node
    /// already has its next bucket, larger than the sockets' buffers: the node waits for the
    /// master's go reading its heartbeats, and neither side gives the other up.
    #[test]
    fn a_busy_master_is_waited_for() {
        let port = free_port();
        let len = 8 << 20;
        let nodes: Vec<_> = (0..2)
            .map(|rank| {
                std::thread::spawn(move || -> Result<f32> {
                    let spec = NodeSpec { nodes: 2, rank, master: format!("127.0.0.1:{port}"), timeout: Duration::from_secs(1) };
                    let mut group = NodeGroup::connect(spec, &"run")?;
                    if rank == 0 {
                        std::thread::sleep(Duration::from_millis(2500));
                    }
                    Ok(group.sum(vec![1.0; len])?[len - 1])
                })
            })
            .collect();
        for (rank, node) in nodes.into_iter().enumerate() {
            assert_eq!(node.join().unwrap().unwrap(), 2.0, "node {rank}");
        }
    }

    /// A node's own failure reaches the master in words, and from it every other node.
    #[test]
    fn a_nodes_error_reaches_the_master_and_the_others() {
        let port = free_port();
        let nodes: Vec<_> = (0..3)
            .map(|rank| {
                std::thread::spawn(move || -> Result<Error> {
                    let mut group = NodeGroup::connect(spec(rank, port), &"run")?;
                    if rank == 1 {
                        group.aborter().tell(&Error::Dataset("the disk is full".into()));
                        return Ok(Error::ModelLost);
                    }
                    Ok(group.sum(vec![1.0; 10]).expect_err("a sum without node 1"))
                })
            })
            .collect();
        let errors: Vec<String> = nodes.into_iter().map(|n| n.join().unwrap().unwrap().to_string()).collect();
        assert!(errors[0].starts_with("node 1 stopped the run: the disk is full"), "{}", errors[0]);
        assert!(errors[2].contains("the master stopped the run: node 1 stopped the run: the disk is full"), "{}", errors[2]);
    }

    #[test]
    fn bad_flags_are_refused() {
        assert!(matches!(NodeSpec::new(0, 0, None, 60.0), Err(Error::Flag { flag: "--nodes", .. })));
        assert!(matches!(NodeSpec::new(2, 2, Some("127.0.0.1:1".into()), 60.0), Err(Error::Flag { flag: "--node-rank", .. })));
        assert!(matches!(NodeSpec::new(2, 1, None, 60.0), Err(Error::Flag { flag: "--master", .. })));
        assert!(matches!(NodeSpec::new(2, 1, Some("no port".into()), 60.0), Err(Error::Flag { flag: "--master", .. })));
        assert!(matches!(NodeSpec::new(2, 1, Some("127.0.0.1:1".into()), f64::NAN), Err(Error::Flag { flag: "--node-timeout", .. })));
        assert!(NodeSpec::new(1, 0, None, 60.0).unwrap().is_none());
        assert!(NodeSpec::new(2, 1, Some("localhost:29500".into()), 60.0).unwrap().is_some());
    }
}
