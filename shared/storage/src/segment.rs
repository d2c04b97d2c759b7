//! Segment objects: the cold tier's format. A segment packs a run of one
//! subject's messages (sequence, commit time, headers, size, SHA-256, and the
//! inline payload or the object key of an offloaded one) into one object:
//!
//! ```text
//! segment := MAGIC block+
//! block   := body_len:u32 crc32(body):u32 body
//! body    := count:u32 record{count}
//! record  := seq:u64 ts_ns:u64 size:u64 flags:u8
//!            [sha256:str] headers:u32 (key:str value:str)* [object_key:str] [data:bytes]
//! str, bytes := len:u32 octets
//! ```
//!
//! All integers little-endian. Tarantool's segment row lists each block's
//! first sequence, first commit time, offset and length, so a reader fetches
//! exactly the block it needs with one ranged GET, or several consecutive
//! blocks at once (each block is self-delimiting).

use std::collections::HashMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::store::StoredMessage;

/// The first bytes of every segment object.
pub const MAGIC: &[u8; 8] = b"MTSSEG01";
/// Bytes before a block's body: its length and checksum.
const BLOCK_HEADER: usize = 8;

const HAS_SHA256: u8 = 1;
const HAS_OBJECT_KEY: u8 = 2;
const HAS_DATA: u8 = 4;

/// Where a block of a segment is, as Tarantool's segment row lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockIndex {
    /// Sequence of its first message.
    pub first_seq: u64,
    /// Commit time of its first message.
    pub first_ts_ns: u64,
    /// Offset of the block in the object.
    pub offset: u64,
    /// Length of the block, header included.
    pub length: u64,
}

/// One message as a segment holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its sequence.
    pub seq: u64,
    /// Commit time, nanoseconds since the Unix epoch.
    pub ts_ns: u64,
    /// Payload size.
    pub size: u64,
    /// Hex SHA-256 of the payload, when recorded.
    pub sha256: Option<String>,
    /// Publisher's headers.
    pub headers: HashMap<String, String>,
    /// Object key of an offloaded payload.
    pub object_key: Option<String>,
    /// Inline payload.
    pub data: Option<Bytes>,
}

impl Record {
    /// The stored message this record holds, on `subject`.
    pub fn into_message(self, subject: String) -> StoredMessage {
        StoredMessage {
            subject,
            seq: self.seq,
            ts_ns: self.ts_ns,
            headers: self.headers,
            data: self.data,
            object_key: self.object_key,
            size: self.size,
            sha256: self.sha256,
            segment: None,
        }
    }
}

/// A segment ready to upload, with what its Tarantool row says of it.
#[derive(Debug, Clone)]
pub struct Sealed {
    /// The object's bytes.
    pub body: Bytes,
    /// Its blocks.
    pub blocks: Vec<BlockIndex>,
    /// First and last sequence.
    pub first_seq: u64,
    /// Last sequence.
    pub last_seq: u64,
    /// First message's commit time.
    pub first_ts_ns: u64,
    /// Last message's commit time.
    pub last_ts_ns: u64,
    /// Messages in it.
    pub count: u64,
    /// Their payload bytes.
    pub bytes: u64,
}

/// Packs messages, in sequence order, into blocks of about `block_bytes`.
#[derive(Debug)]
pub struct Writer {
    block_bytes: usize,
    out: BytesMut,
    block: BytesMut,
    block_count: u32,
    block_first: Option<(u64, u64)>,
    sealed: Sealed,
}

impl Writer {
    /// An empty segment with blocks of about `block_bytes`.
    pub fn new(block_bytes: usize) -> Self {
        let mut out = BytesMut::with_capacity(block_bytes * 2);
        out.put_slice(MAGIC);
        Self {
            block_bytes,
            out,
            block: BytesMut::new(),
            block_count: 0,
            block_first: None,
            sealed: Sealed {
                body: Bytes::new(),
                blocks: Vec::new(),
                first_seq: 0,
                last_seq: 0,
                first_ts_ns: 0,
                last_ts_ns: 0,
                count: 0,
                bytes: 0,
            },
        }
    }

    /// Messages added so far.
    pub fn count(&self) -> u64 {
        self.sealed.count
    }

    /// Bytes of the object so far.
    pub fn len(&self) -> usize {
        self.out.len() + self.block.len()
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.sealed.count == 0
    }

    /// Adds the next message; its sequence must follow the last one's.
    pub fn push(&mut self, m: &StoredMessage) {
        let s = &mut self.sealed;
        if s.count == 0 {
            s.first_seq = m.seq;
            s.first_ts_ns = m.ts_ns;
        }
        debug_assert!(s.count == 0 || m.seq == s.last_seq + 1, "gap in a segment");
        s.last_seq = m.seq;
        s.last_ts_ns = m.ts_ns;
        s.count += 1;
        s.bytes += m.size;
        if self.block_first.is_none() {
            self.block_first = Some((m.seq, m.ts_ns));
        }
        let b = &mut self.block;
        b.put_u64_le(m.seq);
        b.put_u64_le(m.ts_ns);
        b.put_u64_le(m.size);
        let mut flags = 0;
        if m.sha256.is_some() {
            flags |= HAS_SHA256;
        }
        if m.object_key.is_some() {
            flags |= HAS_OBJECT_KEY;
        }
        if m.data.is_some() {
            flags |= HAS_DATA;
        }
        b.put_u8(flags);
        if let Some(sha) = &m.sha256 {
            put_str(b, sha.as_bytes());
        }
        b.put_u32_le(m.headers.len() as u32);
        for (k, v) in &m.headers {
            put_str(b, k.as_bytes());
            put_str(b, v.as_bytes());
        }
        if let Some(key) = &m.object_key {
            put_str(b, key.as_bytes());
        }
        if let Some(data) = &m.data {
            put_str(b, data);
        }
        self.block_count += 1;
        if self.block.len() >= self.block_bytes {
            self.close_block();
        }
    }

    fn close_block(&mut self) {
        let Some((first_seq, first_ts_ns)) = self.block_first.take() else {
            return;
        };
        let mut body = BytesMut::with_capacity(4 + self.block.len());
        body.put_u32_le(self.block_count);
        body.put_slice(&self.block);
        let offset = self.out.len() as u64;
        self.out.put_u32_le(body.len() as u32);
        self.out.put_u32_le(crc32fast::hash(&body));
        self.out.put_slice(&body);
        self.sealed.blocks.push(BlockIndex {
            first_seq,
            first_ts_ns,
            offset,
            length: (BLOCK_HEADER + body.len()) as u64,
        });
        self.block.clear();
        self.block_count = 0;
    }

    /// The finished segment.
    pub fn finish(mut self) -> Sealed {
        self.close_block();
        self.sealed.body = self.out.freeze();
        self.sealed
    }
}

fn put_str(b: &mut BytesMut, s: &[u8]) {
    b.put_u32_le(s.len() as u32);
    b.put_slice(s);
}

/// A segment that does not read as one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("segment block at offset {offset} is corrupt: {what}")]
pub struct Corrupt {
    /// Offset of the block in the object.
    pub offset: u64,
    /// What is wrong.
    pub what: String,
}

/// One decoded block: its records in sequence order.
#[derive(Debug, Clone)]
pub struct Block {
    /// Offset of the block in its object.
    pub offset: u64,
    /// Length of the block, header included.
    pub length: u64,
    /// Its messages.
    pub records: Vec<Record>,
}

impl Block {
    /// The record of `seq`, if this block holds it.
    pub fn get(&self, seq: u64) -> Option<&Record> {
        let first = self.records.first()?.seq;
        let record = self
            .records
            .get(usize::try_from(seq.checked_sub(first)?).ok()?)?;
        (record.seq == seq).then_some(record)
    }

    /// Bytes this block takes in memory, roughly.
    pub fn weight(&self) -> usize {
        self.length as usize + self.records.len() * 128
    }
}

/// Decodes the whole blocks in `buf`, which starts at `offset` in its object
/// (at a block's start); a block cut off at the end is left out.
pub fn decode_blocks(buf: Bytes, offset: u64) -> Result<Vec<Block>, Corrupt> {
    let mut blocks = Vec::new();
    let mut at = 0usize;
    while buf.len() - at >= BLOCK_HEADER {
        let block_offset = offset + at as u64;
        let corrupt = |what: &str| Corrupt {
            offset: block_offset,
            what: what.to_owned(),
        };
        let mut header = &buf[at..at + BLOCK_HEADER];
        let body_len = header.get_u32_le() as usize;
        let crc = header.get_u32_le();
        let end = at + BLOCK_HEADER + body_len;
        if end > buf.len() {
            break;
        }
        let body = buf.slice(at + BLOCK_HEADER..end);
        if crc32fast::hash(&body) != crc {
            return Err(corrupt("checksum mismatch"));
        }
        let records = decode_body(body).map_err(corrupt)?;
        blocks.push(Block {
            offset: block_offset,
            length: (end - at) as u64,
            records,
        });
        at = end;
    }
    Ok(blocks)
}

fn decode_body(mut body: Bytes) -> Result<Vec<Record>, &'static str> {
    let count = take_u32(&mut body)? as usize;
    let mut records = Vec::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        if body.remaining() < 25 {
            return Err("record cut short");
        }
        let seq = body.get_u64_le();
        let ts_ns = body.get_u64_le();
        let size = body.get_u64_le();
        let flags = body.get_u8();
        let sha256 = if flags & HAS_SHA256 != 0 {
            Some(take_string(&mut body)?)
        } else {
            None
        };
        let n = take_u32(&mut body)? as usize;
        let mut headers = HashMap::with_capacity(n.min(64));
        for _ in 0..n {
            let k = take_string(&mut body)?;
            let v = take_string(&mut body)?;
            headers.insert(k, v);
        }
        let object_key = if flags & HAS_OBJECT_KEY != 0 {
            Some(take_string(&mut body)?)
        } else {
            None
        };
        let data = if flags & HAS_DATA != 0 {
            Some(take_bytes(&mut body)?)
        } else {
            None
        };
        records.push(Record {
            seq,
            ts_ns,
            size,
            sha256,
            headers,
            object_key,
            data,
        });
    }
    Ok(records)
}

fn take_u32(body: &mut Bytes) -> Result<u32, &'static str> {
    if body.remaining() < 4 {
        return Err("length cut short");
    }
    Ok(body.get_u32_le())
}

fn take_bytes(body: &mut Bytes) -> Result<Bytes, &'static str> {
    let len = take_u32(body)? as usize;
    if body.remaining() < len {
        return Err("field cut short");
    }
    Ok(body.split_to(len))
}

fn take_string(body: &mut Bytes) -> Result<String, &'static str> {
    String::from_utf8(take_bytes(body)?.to_vec()).map_err(|_| "text field is not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(seq: u64, size: usize, offloaded: bool) -> StoredMessage {
        StoredMessage {
            subject: "s".into(),
            seq,
            ts_ns: 1_000 + seq,
            headers: HashMap::from([("k".to_owned(), format!("v{seq}"))]),
            data: (!offloaded).then(|| Bytes::from(vec![seq as u8; size])),
            object_key: offloaded.then(|| format!("p/s/{seq}")),
            size: size as u64,
            sha256: seq.is_multiple_of(2).then(|| "ab".repeat(32)),
            segment: None,
        }
    }

    #[test]
    fn every_message_reads_back_from_its_block() {
        let mut w = Writer::new(1000);
        let messages: Vec<_> = (10..110)
            .map(|seq| message(seq, (seq as usize * 7) % 300, seq.is_multiple_of(10)))
            .collect();
        for m in &messages {
            w.push(m);
        }
        let sealed = w.finish();
        assert_eq!(
            (sealed.first_seq, sealed.last_seq, sealed.count),
            (10, 109, 100)
        );
        assert!(
            sealed.blocks.len() > 5,
            "small blocks: {}",
            sealed.blocks.len()
        );
        assert_eq!(&sealed.body[..8], MAGIC);
        for m in &messages {
            let index = sealed
                .blocks
                .iter()
                .rev()
                .find(|b| b.first_seq <= m.seq)
                .unwrap();
            let range = index.offset as usize..(index.offset + index.length) as usize;
            let blocks = decode_blocks(sealed.body.slice(range), index.offset).unwrap();
            assert_eq!(blocks.len(), 1);
            let got = blocks[0]
                .get(m.seq)
                .unwrap()
                .clone()
                .into_message("s".into());
            assert_eq!(got.seq, m.seq);
            assert_eq!(got.ts_ns, m.ts_ns);
            assert_eq!(got.headers, m.headers);
            assert_eq!(got.data, m.data);
            assert_eq!(got.object_key, m.object_key);
            assert_eq!(got.size, m.size);
            assert_eq!(got.sha256, m.sha256);
        }
    }

    #[test]
    fn a_range_of_several_blocks_decodes_its_whole_blocks_only() {
        let mut w = Writer::new(100);
        for seq in 1..=50 {
            w.push(&message(seq, 50, false));
        }
        let sealed = w.finish();
        let start = sealed.blocks[2].offset as usize;
        let cut = sealed.blocks[6].offset as usize + 10;
        let blocks = decode_blocks(sealed.body.slice(start..cut), start as u64).unwrap();
        assert_eq!(blocks.len(), 4);
        assert_eq!(blocks[0].offset, sealed.blocks[2].offset);
        assert_eq!(blocks[3].records[0].seq, sealed.blocks[5].first_seq);
    }

    #[test]
    fn a_damaged_block_is_refused() {
        let mut w = Writer::new(1 << 20);
        w.push(&message(1, 100, false));
        let sealed = w.finish();
        let mut body = sealed.body.to_vec();
        let last = body.len() - 1;
        body[last] ^= 1;
        let err = decode_blocks(Bytes::from(body).slice(8..), 8).unwrap_err();
        assert!(err.what.contains("checksum"), "{err}");
    }
}
