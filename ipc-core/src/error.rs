//! Errors of the layout and handshake layers (the ring's are in `ring`).

use std::fmt;

/// A segment whose layout cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LayoutError {
    /// The ring capacity is not a power of two in the accepted range.
    BadCapacity {
        /// The capacity given.
        capacity: u32,
    },
    /// The region is smaller than a header.
    TooSmall {
        /// The region's length.
        len: usize,
        /// The length needed.
        need: usize,
    },
    /// The header's magic number is wrong.
    BadMagic {
        /// The value found.
        found: u64,
    },
    /// The header's layout version is not ours.
    BadVersion {
        /// The version found.
        found: u32,
        /// The version this build uses.
        expected: u32,
    },
    /// A header field disagrees with the handshake or the mapping.
    Mismatch {
        /// The field.
        field: &'static str,
        /// The value found.
        found: u64,
        /// The value expected.
        expected: u64,
    },
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayoutError::BadCapacity { capacity } => write!(
                f,
                "ring capacity {capacity} is not a power of two between {} and {}",
                crate::layout::MIN_RING_CAPACITY,
                crate::layout::MAX_RING_CAPACITY
            ),
            LayoutError::TooSmall { len, need } => {
                write!(f, "segment of {len} bytes is smaller than {need}")
            }
            LayoutError::BadMagic { found } => write!(f, "segment magic {found:#018x} is wrong"),
            LayoutError::BadVersion { found, expected } => {
                write!(f, "segment layout version {found} is not the expected {expected}")
            }
            LayoutError::Mismatch { field, found, expected } => {
                write!(f, "segment {field} is {found}, expected {expected}")
            }
        }
    }
}

impl std::error::Error for LayoutError {}

/// A control message that cannot be encoded or decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The message does not start with the hello magic.
    BadMagic {
        /// The first four bytes, as a little-endian u32.
        found: u32,
    },
    /// The peer speaks another protocol version.
    VersionMismatch {
        /// Our version.
        ours: u32,
        /// Theirs.
        theirs: u32,
    },
    /// The message is longer than allowed.
    TooLong {
        /// Its length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// Bytes follow the decoded message.
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// The bytes do not decode.
    Decode {
        /// The decoder's complaint.
        reason: String,
    },
    /// The message does not encode.
    Encode {
        /// The encoder's complaint.
        reason: String,
    },
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::BadMagic { found } => write!(f, "hello magic {found:#010x} is wrong"),
            HandshakeError::VersionMismatch { ours, theirs } => {
                write!(f, "protocol version mismatch: ours is {ours}, theirs is {theirs}")
            }
            HandshakeError::TooLong { len, max } => {
                write!(f, "control message of {len} bytes exceeds the maximum {max}")
            }
            HandshakeError::TrailingBytes { extra } => {
                write!(f, "{extra} stray bytes follow the control message")
            }
            HandshakeError::Decode { reason } => {
                write!(f, "control message does not decode: {reason}")
            }
            HandshakeError::Encode { reason } => {
                write!(f, "control message does not encode: {reason}")
            }
        }
    }
}

impl std::error::Error for HandshakeError {}
