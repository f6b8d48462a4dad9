//! Record framing: encoding, header parsing and a chunked sequential reader.
//!
//! See the [crate documentation](crate) for the byte layout. Every field is
//! little-endian; the checksum is CRC-32 (IEEE 802.3 polynomial, as computed
//! by `crc32fast`) over every byte after the checksum field, so a torn write,
//! a zero-filled tail or a flipped bit anywhere in the header or payload is
//! detected.

use std::fs::File;
use std::io;

use crate::fsutil::read_at;

/// Size of the `len` field.
const LEN_FIELD_BYTES: usize = 4;
/// Size of the `crc` field.
const CRC_FIELD_BYTES: usize = 4;
/// Bytes of a frame before its payload: len, crc, offset, seq, timestamp_ms,
/// dedup_id.
pub const RECORD_HEADER_BYTES: usize = 40;
/// Largest accepted payload. Bounding it lets recovery reject a garbage
/// length without reading (or allocating) gigabytes.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024 * 1024;

/// Smallest valid value of the `len` field (a record with an empty payload).
const MIN_LEN: u32 = (RECORD_HEADER_BYTES - LEN_FIELD_BYTES) as u32;
/// Largest valid value of the `len` field.
const MAX_LEN: u32 = MIN_LEN + MAX_PAYLOAD_BYTES as u32;

/// Decoded fixed-size part of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FrameHeader {
    pub(crate) crc: u32,
    pub(crate) offset: u64,
    pub(crate) seq: u64,
    pub(crate) timestamp_ms: i64,
    pub(crate) dedup_id: u64,
    pub(crate) payload_len: usize,
}

impl FrameHeader {
    /// Total bytes of the frame, header included.
    pub(crate) fn frame_len(&self) -> usize {
        RECORD_HEADER_BYTES + self.payload_len
    }
}

/// Bytes a record with `payload_len` payload bytes occupies on disk.
pub(crate) fn frame_len(payload_len: usize) -> usize {
    RECORD_HEADER_BYTES + payload_len
}

/// Appends one encoded frame to `buf`. The caller guarantees
/// `payload.len() <= MAX_PAYLOAD_BYTES`.
pub(crate) fn encode(
    buf: &mut Vec<u8>,
    offset: u64,
    seq: u64,
    timestamp_ms: i64,
    dedup_id: u64,
    payload: &[u8],
) {
    debug_assert!(payload.len() <= MAX_PAYLOAD_BYTES);
    let start = buf.len();
    let len = MIN_LEN + payload.len() as u32;
    buf.reserve(frame_len(payload.len()));
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&[0; CRC_FIELD_BYTES]);
    buf.extend_from_slice(&offset.to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&timestamp_ms.to_le_bytes());
    buf.extend_from_slice(&dedup_id.to_le_bytes());
    buf.extend_from_slice(payload);
    let crc = crc32fast::hash(&buf[start + LEN_FIELD_BYTES + CRC_FIELD_BYTES..]);
    buf[start + LEN_FIELD_BYTES..start + LEN_FIELD_BYTES + CRC_FIELD_BYTES]
        .copy_from_slice(&crc.to_le_bytes());
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut raw = [0; 4];
    raw.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(raw)
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut raw = [0; 8];
    raw.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(raw)
}

/// Parses the header at the start of `bytes`, which must hold at least
/// [`RECORD_HEADER_BYTES`]. Fails if the length field is out of bounds.
pub(crate) fn parse_header(bytes: &[u8]) -> Result<FrameHeader, &'static str> {
    let len = le_u32(bytes, 0);
    if len < MIN_LEN {
        return Err("record length field too small");
    }
    if len > MAX_LEN {
        return Err("record length field too large");
    }
    Ok(FrameHeader {
        crc: le_u32(bytes, 4),
        offset: le_u64(bytes, 8),
        seq: le_u64(bytes, 16),
        timestamp_ms: le_u64(bytes, 24) as i64,
        dedup_id: le_u64(bytes, 32),
        payload_len: (len - MIN_LEN) as usize,
    })
}

/// Whether the checksum in `header` matches the complete `frame` bytes.
pub(crate) fn checksum_matches(header: &FrameHeader, frame: &[u8]) -> bool {
    crc32fast::hash(&frame[LEN_FIELD_BYTES + CRC_FIELD_BYTES..]) == header.crc
}

/// One frame returned by [`FrameReader`].
pub(crate) struct Frame<'b> {
    pub(crate) header: FrameHeader,
    /// Byte position of the frame in the file.
    pub(crate) position: u64,
    pub(crate) payload: &'b [u8],
}

/// Why [`FrameReader::next_frame`] failed.
#[derive(Debug)]
pub(crate) enum ReadError {
    Io(io::Error),
    /// The bytes at `position` are not a valid frame (bad length, checksum
    /// mismatch, or a frame cut short by the end of the file).
    Invalid {
        position: u64,
        reason: &'static str,
    },
}

/// Reads consecutive frames of a file with large positioned reads, so a scan
/// costs one syscall per `chunk` bytes rather than one or two per record.
pub(crate) struct FrameReader<'f> {
    file: &'f File,
    buf: Vec<u8>,
    /// File position of `buf[0]`.
    buf_position: u64,
    /// Unconsumed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    eof: bool,
    chunk: usize,
    verify: bool,
}

impl<'f> FrameReader<'f> {
    /// A reader starting at byte `position` of `file`, reading `chunk` bytes
    /// at a time. With `verify`, checksums are checked.
    pub(crate) fn new(file: &'f File, position: u64, chunk: usize, verify: bool) -> Self {
        FrameReader {
            file,
            buf: Vec::new(),
            buf_position: position,
            start: 0,
            end: 0,
            eof: false,
            chunk: chunk.max(RECORD_HEADER_BYTES),
            verify,
        }
    }

    /// File position of the next unread byte.
    pub(crate) fn position(&self) -> u64 {
        self.buf_position + self.start as u64
    }

    /// The next frame, `Ok(None)` at a clean end of file.
    pub(crate) fn next_frame(&mut self) -> Result<Option<Frame<'_>>, ReadError> {
        loop {
            let available = self.end - self.start;
            let needed = if available >= RECORD_HEADER_BYTES {
                let header = parse_header(&self.buf[self.start..self.end]).map_err(|reason| {
                    ReadError::Invalid {
                        position: self.position(),
                        reason,
                    }
                })?;
                let len = header.frame_len();
                if available >= len {
                    let position = self.position();
                    let frame = &self.buf[self.start..self.start + len];
                    if self.verify && !checksum_matches(&header, frame) {
                        return Err(ReadError::Invalid {
                            position,
                            reason: "checksum mismatch",
                        });
                    }
                    let payload_start = self.start + RECORD_HEADER_BYTES;
                    self.start += len;
                    return Ok(Some(Frame {
                        header,
                        position,
                        payload: &self.buf[payload_start..payload_start + header.payload_len],
                    }));
                }
                len
            } else {
                RECORD_HEADER_BYTES
            };
            if self.eof {
                if available == 0 {
                    return Ok(None);
                }
                return Err(ReadError::Invalid {
                    position: self.position(),
                    reason: "record cut short by end of file",
                });
            }
            self.fill(needed).map_err(ReadError::Io)?;
        }
    }

    /// Ensures at least `needed` unconsumed bytes are buffered, or sets `eof`.
    fn fill(&mut self, needed: usize) -> io::Result<()> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.buf_position += self.start as u64;
            self.end -= self.start;
            self.start = 0;
        }
        let capacity = needed.max(self.chunk);
        if self.buf.len() < capacity {
            self.buf.resize(capacity, 0);
        }
        while self.end < needed {
            let read = read_at(
                self.file,
                &mut self.buf[self.end..],
                self.buf_position + self.end as u64,
            )?;
            if read == 0 {
                self.eof = true;
                break;
            }
            self.end += read;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_then_parse_round_trips() {
        let mut buf = Vec::new();
        encode(&mut buf, 7, 42, -5, 99, b"hello");
        encode(&mut buf, 8, 43, 1_700_000_000_000, 0, b"");
        assert_eq!(buf.len(), frame_len(5) + frame_len(0));
        let first = parse_header(&buf).expect("valid header");
        assert_eq!(
            (first.offset, first.seq, first.timestamp_ms, first.dedup_id),
            (7, 42, -5, 99)
        );
        assert_eq!(first.payload_len, 5);
        assert!(checksum_matches(&first, &buf[..first.frame_len()]));
        assert_eq!(&buf[RECORD_HEADER_BYTES..first.frame_len()], b"hello");
        let second = parse_header(&buf[first.frame_len()..]).expect("valid header");
        assert_eq!((second.offset, second.payload_len), (8, 0));
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let mut buf = Vec::new();
        encode(&mut buf, 1, 2, 3, 4, b"payload");
        for byte in 0..buf.len() {
            for bit in 0..8 {
                let mut damaged = buf.clone();
                damaged[byte] ^= 1 << bit;
                let valid = match parse_header(&damaged) {
                    Ok(h) if h.frame_len() == damaged.len() => checksum_matches(&h, &damaged),
                    _ => false,
                };
                assert!(!valid, "flip of bit {bit} in byte {byte} went unnoticed");
            }
        }
    }

    #[test]
    fn length_bounds_are_enforced() {
        let mut bytes = [0u8; RECORD_HEADER_BYTES];
        assert!(parse_header(&bytes).is_err());
        bytes[..4].copy_from_slice(&(MAX_LEN + 1).to_le_bytes());
        assert!(parse_header(&bytes).is_err());
        bytes[..4].copy_from_slice(&MIN_LEN.to_le_bytes());
        assert!(parse_header(&bytes).is_ok());
    }
}
