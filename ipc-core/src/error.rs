//! Errors of the layout and handshake layers (the ring's are in `ring`).

/// A segment whose layout cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// The ring capacity is not a power of two in the accepted range.
    #[error(
        "ring capacity {capacity} is not a power of two between {} and {}",
        crate::layout::MIN_RING_CAPACITY,
        crate::layout::MAX_RING_CAPACITY
    )]
    BadCapacity {
        /// The capacity given.
        capacity: u32,
    },
    /// The region is smaller than a header.
    #[error("segment of {len} bytes is smaller than {need}")]
    TooSmall {
        /// The region's length.
        len: usize,
        /// The length needed.
        need: usize,
    },
    /// The header's magic number is wrong.
    #[error("segment magic {found:#018x} is wrong")]
    BadMagic {
        /// The value found.
        found: u64,
    },
    /// The header's layout version is not ours.
    #[error("segment layout version {found} is not the expected {expected}")]
    BadVersion {
        /// The version found.
        found: u32,
        /// The version this build uses.
        expected: u32,
    },
    /// A header field disagrees with the handshake or the mapping.
    #[error("segment {field} is {found}, expected {expected}")]
    Mismatch {
        /// The field.
        field: &'static str,
        /// The value found.
        found: u64,
        /// The value expected.
        expected: u64,
    },
}

/// A control message that cannot be encoded or decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The message does not start with the hello magic.
    #[error("hello magic {found:#010x} is wrong")]
    BadMagic {
        /// The first four bytes, as a little-endian u32.
        found: u32,
    },
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: ours is {ours}, theirs is {theirs}")]
    VersionMismatch {
        /// Our version.
        ours: u32,
        /// Theirs.
        theirs: u32,
    },
    /// The message is longer than allowed.
    #[error("control message of {len} bytes exceeds the maximum {max}")]
    TooLong {
        /// Its length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// Bytes follow the decoded message.
    #[error("{extra} stray bytes follow the control message")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// The bytes do not decode.
    #[error("control message does not decode: {reason}")]
    Decode {
        /// The decoder's complaint.
        reason: String,
    },
    /// The message does not encode.
    #[error("control message does not encode: {reason}")]
    Encode {
        /// The encoder's complaint.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_messages_name_their_values() {
        let cases = [
            (
                LayoutError::BadCapacity { capacity: 5000 },
                "ring capacity 5000 is not a power of two between 4096 and 1073741824",
            ),
            (LayoutError::TooSmall { len: 64, need: 4096 }, "segment of 64 bytes is smaller than 4096"),
            (LayoutError::BadMagic { found: 0x1234 }, "segment magic 0x0000000000001234 is wrong"),
            (LayoutError::BadVersion { found: 1, expected: 2 }, "segment layout version 1 is not the expected 2"),
            (
                LayoutError::Mismatch { field: "capacity", found: 8192, expected: 4096 },
                "segment capacity is 8192, expected 4096",
            ),
        ];
        for (err, message) in cases {
            assert_eq!(err.to_string(), message);
        }
    }

    #[test]
    fn handshake_messages_name_their_values() {
        let cases = [
            (HandshakeError::BadMagic { found: 0x20544547 }, "hello magic 0x20544547 is wrong"),
            (
                HandshakeError::VersionMismatch { ours: 2, theirs: 3 },
                "protocol version mismatch: ours is 2, theirs is 3",
            ),
            (
                HandshakeError::TooLong { len: 5000, max: 4096 },
                "control message of 5000 bytes exceeds the maximum 4096",
            ),
            (HandshakeError::TrailingBytes { extra: 3 }, "3 stray bytes follow the control message"),
            (
                HandshakeError::Decode { reason: "unexpected end".into() },
                "control message does not decode: unexpected end",
            ),
            (HandshakeError::Encode { reason: "too big".into() }, "control message does not encode: too big"),
        ];
        for (err, message) in cases {
            assert_eq!(err.to_string(), message);
        }
    }
}
