//! The file operations of an sftp channel (scp in its default SFTP mode, `sftp`), sans-IO, for
//! the channel's recording: which files were read or written, with paths and byte counts, and
//! which were removed, renamed or made.
//!
//! The channel's data is SFTP (draft-ietf-secsh-filexfer-02, what OpenSSH speaks): packets of a
//! `u32` length, a type byte and a request id, split across SSH messages anywhere. [`Sftp`]
//! follows both directions with a small reassembler per direction that keeps a packet's head
//! only: a `WRITE` request and a `DATA` answer are counted from their headers and their payload
//! skipped, any other packet is kept whole up to [`MAX_HEAD`] bytes (a path list of a long
//! `OPEN`, say) and skipped beyond it. Requests and handles are tracked in bounded tables, so a
//! hostile peer costs at most a few hundred KiB and never an error: what cannot be decoded is
//! just not reported.
//!
//! Reported, as `sftp` notes of the recording: a handle's close (`read` or `write` with the path
//! and the bytes moved through it, `open` if none), and `remove`, `rename` (also OpenSSH's
//! `posix-rename@openssh.com`), `mkdir`, `rmdir`, `setstat` requests with their paths (as requested: sshd's answer is not waited for).

use std::collections::HashMap;

/// Largest packet head kept to be decoded; longer packets of other types are skipped.
pub(crate) const MAX_HEAD: usize = 64 << 10;
/// Most open handles and pending requests tracked.
const MAX_TRACKED: usize = 1024;

const FXP_OPEN: u8 = 3;
const FXP_CLOSE: u8 = 4;
const FXP_READ: u8 = 5;
const FXP_WRITE: u8 = 6;
const FXP_SETSTAT: u8 = 9;
const FXP_REMOVE: u8 = 13;
const FXP_MKDIR: u8 = 14;
const FXP_RMDIR: u8 = 15;
const FXP_RENAME: u8 = 18;
const FXP_EXTENDED: u8 = 200;
const FXP_HANDLE: u8 = 102;
const FXP_DATA: u8 = 103;

/// One packet as the reassembler gives it.
#[derive(Debug, PartialEq, Eq)]
enum Packet {
    /// A whole packet (type byte first), at most [`MAX_HEAD`] bytes.
    Whole(Vec<u8>),
    /// A `WRITE`: request id, handle, and how many bytes it writes.
    Write { handle: Vec<u8>, len: u64 },
    /// A `DATA` answer: request id and how many bytes it carries.
    Data { id: u32, len: u64 },
}

/// One direction's reassembler.
#[derive(Default)]
struct Reader {
    head: Vec<u8>,
    /// Bytes of the current packet still to skip.
    skip: u64,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

impl Reader {
    /// Feeds `data`; calls `out` for each packet head decoded.
    fn feed(&mut self, mut data: &[u8], out: &mut dyn FnMut(Packet)) {
        loop {
            if self.skip > 0 {
                if data.is_empty() {
                    return;
                }
                let n = usize::try_from(self.skip)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                self.skip -= n as u64;
                data = &data[n..];
                continue;
            }
            // How much of the head is needed now (it grows as the head tells more).
            let need = self.need();
            if self.head.len() >= need {
                self.decide(out);
                continue;
            }
            if data.is_empty() {
                return;
            }
            let take = (need - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
    }

    /// The head length needed to decide about the current packet.
    fn need(&self) -> usize {
        if self.head.len() < 9 {
            return 9;
        }
        let total = 4 + be32(&self.head) as usize;
        match self.head[4] {
            FXP_WRITE => {
                if self.head.len() < 13 {
                    return 13;
                }
                let handle = be32(&self.head[9..]) as usize;
                (13 + handle + 12).min(total).min(MAX_HEAD)
            }
            FXP_DATA => 13.min(total),
            _ => total.min(MAX_HEAD),
        }
    }

    /// The head is as long as [`Reader::need`] says: report the packet, skip the rest of it.
    fn decide(&mut self, out: &mut dyn FnMut(Packet)) {
        let total = 4 + u64::from(be32(&self.head));
        let have = self.head.len() as u64;
        if have < 9 || total < 9 {
            // a length below a packet's minimum: skip what it claims
            self.skip = total.saturating_sub(have);
            self.head.clear();
            return;
        }
        let ty = self.head[4];
        let id = be32(&self.head[5..]);
        match ty {
            FXP_WRITE if have >= 13 => {
                let hlen = be32(&self.head[9..]) as usize;
                if self.head.len() >= 13 + hlen + 12 {
                    let handle = self.head[13..13 + hlen].to_vec();
                    let len = u64::from(be32(&self.head[13 + hlen + 8..]));
                    out(Packet::Write {
                        handle,
                        len: len.min(total.saturating_sub(have)),
                    });
                }
            }
            FXP_DATA if have >= 13 => {
                let len = u64::from(be32(&self.head[9..]));
                out(Packet::Data {
                    id,
                    len: len.min(total.saturating_sub(have)),
                });
            }
            _ if have == total => out(Packet::Whole(self.head[4..].to_vec())),
            _ => {}
        }
        self.skip = total.saturating_sub(have);
        self.head.clear();
    }
}

struct Handle {
    path: String,
    read: u64,
    written: u64,
}

/// See the module doc.
#[derive(Default)]
pub(crate) struct Sftp {
    up: Reader,
    down: Reader,
    /// OPEN requests waiting for their HANDLE: id → path.
    opening: HashMap<u32, String>,
    /// READ requests waiting for their DATA: id → handle.
    reading: HashMap<u32, Vec<u8>>,
    handles: HashMap<Vec<u8>, Handle>,
}

/// Reads SSH strings out of a packet body.
struct Body<'a>(&'a [u8]);

impl<'a> Body<'a> {
    fn u32(&mut self) -> Option<u32> {
        let v = be32(self.0.get(..4)?);
        self.0 = &self.0[4..];
        Some(v)
    }
    fn string(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        let s = self.0.get(..n)?;
        self.0 = &self.0[n..];
        Some(s)
    }
    fn path(&mut self) -> Option<String> {
        self.string()
            .map(|s| String::from_utf8_lossy(s).into_owned())
    }
}

fn bounded_insert<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>, k: K, v: V) {
    if map.len() >= MAX_TRACKED {
        map.clear();
    }
    map.insert(k, v);
}

impl Sftp {
    /// Data the user's client sent; returns the notes to record.
    pub(crate) fn on_user(&mut self, data: &[u8]) -> Vec<serde_json::Value> {
        let mut packets = Vec::new();
        self.up.feed(data, &mut |p| packets.push(p));
        let mut notes = Vec::new();
        for p in packets {
            match p {
                Packet::Write { handle, len } => {
                    if let Some(h) = self.handles.get_mut(&handle) {
                        h.written += len;
                    }
                }
                Packet::Whole(body) => self.request(&body, &mut notes),
                Packet::Data { .. } => {}
            }
        }
        notes
    }

    fn request(&mut self, body: &[u8], notes: &mut Vec<serde_json::Value>) {
        let ty = body[0];
        let mut b = Body(&body[1..]);
        let Some(id) = b.u32() else {
            return;
        };
        let op = |name: &str, path: Option<String>| {
            path.map(|p| serde_json::json!({ "op": name, "path": p }))
        };
        match ty {
            FXP_OPEN => {
                if let Some(path) = b.path() {
                    bounded_insert(&mut self.opening, id, path);
                }
            }
            FXP_READ => {
                if let Some(handle) = b.string() {
                    bounded_insert(&mut self.reading, id, handle.to_vec());
                }
            }
            FXP_CLOSE => {
                if let Some(h) = b.string().and_then(|h| self.handles.remove(h)) {
                    notes.push(Self::closed(h));
                }
            }
            FXP_REMOVE => notes.extend(op("remove", b.path())),
            FXP_MKDIR => notes.extend(op("mkdir", b.path())),
            FXP_RMDIR => notes.extend(op("rmdir", b.path())),
            FXP_SETSTAT => notes.extend(op("setstat", b.path())),
            FXP_RENAME => {
                if let (Some(from), Some(to)) = (b.path(), b.path()) {
                    notes.push(serde_json::json!({ "op": "rename", "path": from, "to": to }));
                }
            }
            // OpenSSH's sftp renames with this extension when sshd offers it.
            FXP_EXTENDED if b.string() == Some(b"posix-rename@openssh.com") => {
                if let (Some(from), Some(to)) = (b.path(), b.path()) {
                    notes.push(serde_json::json!({ "op": "rename", "path": from, "to": to }));
                }
            }
            _ => {}
        }
    }

    fn closed(h: Handle) -> serde_json::Value {
        let (op, bytes) = if h.written > 0 {
            ("write", h.written)
        } else if h.read > 0 {
            ("read", h.read)
        } else {
            ("open", 0)
        };
        serde_json::json!({ "op": op, "path": h.path, "bytes": bytes })
    }

    /// Data sshd's sftp-server sent.
    pub(crate) fn on_node(&mut self, data: &[u8]) {
        let mut packets = Vec::new();
        self.down.feed(data, &mut |p| packets.push(p));
        for p in packets {
            match p {
                Packet::Data { id, len } => {
                    if let Some(h) = self
                        .reading
                        .remove(&id)
                        .and_then(|handle| self.handles.get_mut(&handle))
                    {
                        h.read += len;
                    }
                }
                Packet::Whole(body) if body[0] == FXP_HANDLE => {
                    let mut b = Body(&body[1..]);
                    let (Some(id), Some(handle)) = (b.u32(), b.string()) else {
                        continue;
                    };
                    if let Some(path) = self.opening.remove(&id) {
                        let h = Handle {
                            path,
                            read: 0,
                            written: 0,
                        };
                        bounded_insert(&mut self.handles, handle.to_vec(), h);
                    }
                }
                Packet::Whole(_) | Packet::Write { .. } => {}
            }
        }
    }

    /// The channel ended: the handles still open, as notes.
    pub(crate) fn finish(&mut self) -> Vec<serde_json::Value> {
        let mut open: Vec<Handle> = self.handles.drain().map(|(_, h)| h).collect();
        open.sort_by(|a, b| a.path.cmp(&b.path));
        open.into_iter().map(Self::closed).collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn s(b: &[u8]) -> Vec<u8> {
        let mut v = (b.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(b);
        v
    }
    fn pkt(ty: u8, id: u32, rest: &[Vec<u8>]) -> Vec<u8> {
        let mut body = vec![ty];
        body.extend_from_slice(&id.to_be_bytes());
        for r in rest {
            body.extend_from_slice(r);
        }
        let mut v = (body.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(&body);
        v
    }

    /// Feeds `bytes` in pieces of `step`.
    fn feed_user(sftp: &mut Sftp, bytes: &[u8], step: usize) -> Vec<serde_json::Value> {
        bytes.chunks(step).flat_map(|c| sftp.on_user(c)).collect()
    }

    fn feed_node(sftp: &mut Sftp, bytes: &[u8], step: usize) {
        for c in bytes.chunks(step) {
            sftp.on_node(c);
        }
    }

    #[test]
    fn uploads_downloads_and_path_operations_are_reported_whatever_the_split() {
        for step in [1, 3, 7, 1000, 1 << 20] {
            let mut sftp = Sftp::default();
            let mut up = Vec::new();
            up.extend(pkt(
                FXP_OPEN,
                1,
                &[
                    s(b"/tmp/up.bin"),
                    0x1au32.to_be_bytes().to_vec(),
                    vec![0; 4],
                ],
            ));
            let mut notes = feed_user(&mut sftp, &up, step);
            feed_node(&mut sftp, &pkt(FXP_HANDLE, 1, &[s(b"h1")]), step);
            let data = vec![7u8; 70_000];
            let mut w = Vec::new();
            for (i, chunk) in data.chunks(32768).enumerate() {
                w.extend(pkt(
                    FXP_WRITE,
                    2 + i as u32,
                    &[
                        s(b"h1"),
                        (i as u64 * 32768).to_be_bytes().to_vec(),
                        s(chunk),
                    ],
                ));
            }
            w.extend(pkt(FXP_CLOSE, 9, &[s(b"h1")]));
            // a download of 5 bytes, then path operations
            w.extend(pkt(
                FXP_OPEN,
                10,
                &[s(b"/etc/hostname"), 1u32.to_be_bytes().to_vec(), vec![0; 4]],
            ));
            notes.extend(feed_user(&mut sftp, &w, step));
            feed_node(&mut sftp, &pkt(FXP_HANDLE, 10, &[s(b"h2")]), step);
            notes.extend(feed_user(
                &mut sftp,
                &pkt(
                    FXP_READ,
                    11,
                    &[
                        s(b"h2"),
                        0u64.to_be_bytes().to_vec(),
                        32768u32.to_be_bytes().to_vec(),
                    ],
                ),
                step,
            ));
            feed_node(&mut sftp, &pkt(FXP_DATA, 11, &[s(b"node1")]), step);
            let mut rest = pkt(FXP_CLOSE, 12, &[s(b"h2")]);
            rest.extend(pkt(FXP_RENAME, 13, &[s(b"/tmp/a"), s(b"/tmp/b")]));
            rest.extend(pkt(FXP_REMOVE, 14, &[s(b"/tmp/b")]));
            notes.extend(feed_user(&mut sftp, &rest, step));
            assert_eq!(
                notes,
                vec![
                    serde_json::json!({"op": "write", "path": "/tmp/up.bin", "bytes": 70_000}),
                    serde_json::json!({"op": "read", "path": "/etc/hostname", "bytes": 5}),
                    serde_json::json!({"op": "rename", "path": "/tmp/a", "to": "/tmp/b"}),
                    serde_json::json!({"op": "remove", "path": "/tmp/b"}),
                ],
                "split every {step} bytes"
            );
            assert!(sftp.finish().is_empty());
        }
    }

    #[test]
    fn junk_and_huge_packets_cost_little_and_never_panic() {
        let mut sftp = Sftp::default();
        sftp.on_user(&[0xff; 10_000]);
        sftp.on_node(&[0xff; 10_000]);
        let mut huge = (u32::MAX).to_be_bytes().to_vec();
        huge.extend([FXP_OPEN, 0, 0, 0, 1]);
        huge.extend(vec![0u8; 200_000]);
        sftp.on_user(&huge);
        assert!(sftp.up.head.capacity() <= MAX_HEAD * 2);
        for n in 0..20u8 {
            let v: Vec<u8> = (0..300u32).map(|i| (i as u8).wrapping_mul(n)).collect();
            sftp.on_user(&v);
            sftp.on_node(&v);
        }
        // an open handle at the end is reported by finish
        let mut sftp = Sftp::default();
        sftp.on_user(&pkt(FXP_OPEN, 1, &[s(b"/x"), vec![0; 8]]));
        sftp.on_node(&pkt(FXP_HANDLE, 1, &[s(b"h")]));
        assert_eq!(
            sftp.finish(),
            vec![serde_json::json!({"op": "open", "path": "/x", "bytes": 0})]
        );
    }
}
