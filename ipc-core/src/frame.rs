//! The frame header that precedes every message in a ring.
//!
//! ```text
//! +0   len         u32  payload bytes that follow the header
//! +4   service     u16  service id (requests) or the id echoed (responses)
//! +6   flags       u16  FLAG_* bits; unknown bits are a protocol violation
//! +8   request_id  u64  chosen by the client, echoed in the response
//! ```
//!
//! A frame occupies `align8(HEADER_LEN + len)` bytes, so every header starts
//! 8-byte aligned. Headers are copied out of shared memory and decoded from
//! the private copy; nothing here ever looks at shared memory directly.

/// Bytes of a frame header.
pub const HEADER_LEN: usize = 16;
/// Frame alignment in the ring.
pub const FRAME_ALIGN: usize = 8;

/// Padding up to the end of the ring; the next frame starts at offset 0.
pub const FLAG_PAD: u16 = 1 << 0;
/// A response that carries an error (see [`crate::ErrorCode`]) instead of a
/// reply.
pub const FLAG_ERROR: u16 = 1 << 1;
/// Stream transports only: the daemon's last frame when it closes a session
/// on purpose (it is shutting down). It has no payload and no service;
/// `request_id` is the last request the daemon took, so any later one was
/// never executed. Rings never carry it (the segment header says the same
/// there), so it is not among the flags a ring accepts.
pub const FLAG_CLOSED: u16 = 1 << 2;
const KNOWN_FLAGS: u16 = FLAG_PAD
    | FLAG_ERROR
    | crate::message::FLAG_MORE
    | crate::message::FLAG_STREAM
    | crate::message::FLAG_END
    | crate::message::FLAG_CREDIT
    | crate::message::FLAG_CANCEL;
const _: () = assert!(FLAG_CLOSED & KNOWN_FLAGS == 0, "a ring never accepts a closing frame");

/// The decoded fields of a frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FrameHeader {
    /// Payload length in bytes.
    pub len: u32,
    /// Service id.
    pub service: u16,
    /// `FLAG_*` bits.
    pub flags: u16,
    /// Request id, echoed by the response.
    pub request_id: u64,
}

impl FrameHeader {
    /// Encodes the header into its 16 wire bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&self.len.to_le_bytes());
        out[4..6].copy_from_slice(&self.service.to_le_bytes());
        out[6..8].copy_from_slice(&self.flags.to_le_bytes());
        out[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        out
    }

    /// Decodes 16 wire bytes. Any bit pattern decodes; [`FrameHeader::unknown_flags`]
    /// tells whether the flags make sense.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> FrameHeader {
        FrameHeader {
            len: u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            service: u16::from_le_bytes([bytes[4], bytes[5]]),
            flags: u16::from_le_bytes([bytes[6], bytes[7]]),
            request_id: u64::from_le_bytes([
                bytes[8], bytes[9], bytes[10], bytes[11], bytes[12], bytes[13], bytes[14], bytes[15],
            ]),
        }
    }

    /// Flag bits this version does not know.
    pub fn unknown_flags(&self) -> u16 {
        self.flags & !KNOWN_FLAGS
    }

    /// Whether this is ring padding.
    pub fn is_pad(&self) -> bool {
        self.flags & FLAG_PAD != 0
    }

    /// Whether this response carries an error.
    pub fn is_error(&self) -> bool {
        self.flags & FLAG_ERROR != 0
    }

    /// A stream's closing frame (see [`FLAG_CLOSED`]): no payload, the last
    /// request taken in `request_id`.
    pub fn closing(last_taken: u64) -> FrameHeader {
        FrameHeader { len: 0, service: 0, flags: FLAG_CLOSED, request_id: last_taken }
    }

    /// Whether this is a stream's closing frame.
    pub fn is_closing(&self) -> bool {
        self.flags == FLAG_CLOSED && self.len == 0
    }
}

/// The frame at the start of a byte stream's buffered bytes, as both stream
/// transports split one (frames follow each other unpadded, `HEADER_LEN +
/// len` bytes each): its header once all of it has arrived, and whether its
/// payload has arrived too. The caller judges the header (flags, length).
pub fn stream_frame(buf: &[u8]) -> Option<(FrameHeader, bool)> {
    let (raw, payload) = buf.split_first_chunk::<HEADER_LEN>()?;
    let header = FrameHeader::decode(raw);
    Some((header, payload.len() >= header.len as usize))
}

/// Bytes a frame with a payload of `len` bytes occupies in the ring.
pub fn frame_size(len: usize) -> usize {
    (HEADER_LEN + len + FRAME_ALIGN - 1) & !(FRAME_ALIGN - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = FrameHeader { len: 70_000, service: 513, flags: FLAG_ERROR, request_id: u64::MAX - 3 };
        assert_eq!(FrameHeader::decode(&h.encode()), h);
        assert_eq!(h.unknown_flags(), 0);
        assert!(h.is_error() && !h.is_pad());
    }

    #[test]
    fn unknown_flags_are_reported() {
        let h = FrameHeader { flags: 0x8001, ..FrameHeader::default() };
        assert_eq!(h.unknown_flags(), 0x8000);
    }

    #[test]
    fn frame_sizes_are_aligned() {
        assert_eq!(frame_size(0), 16);
        assert_eq!(frame_size(1), 24);
        assert_eq!(frame_size(8), 24);
        assert_eq!(frame_size(64), 80);
    }
}
