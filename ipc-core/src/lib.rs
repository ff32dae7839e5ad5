//! The system-independent heart of ipcd: the shared segment's layout, the
//! single-producer single-consumer ring of frames, the doorbell handshake
//! and the control-socket messages.
//!
//! Nothing here makes a system call. Rings work over a [`Region`], which any
//! [`SharedMemory`] can back: an `mmap`ed memfd in the daemon and client, or
//! [`HeapMemory`] in tests, so the whole protocol runs in one process.
//!
//! Every word the peer can write is treated as hostile: read once into a
//! local, validated, and never trusted past a [`RingError`].
//!
//! ```
//! use ipc_core::{HeapMemory, Region, Segment, SegmentLayout};
//!
//! let layout = SegmentLayout::new(4096).unwrap();
//! let region = Region::new(HeapMemory::new(layout.segment_size()));
//! // Each ring end exists once: the client keeps the request producer and
//! // the response consumer, the daemon the other two.
//! let Segment { request_producer: mut tx, request_consumer: mut rx, .. } = Segment::new(region, &layout);
//!
//! tx.try_push(1, 0, 42, b"ping").unwrap();
//! let must_wake = tx.publish(); // true only if the consumer announced sleep
//! assert!(!must_wake);
//!
//! let mut payload = Vec::new();
//! let header = rx.try_pop(&mut payload).unwrap().unwrap();
//! assert_eq!((header.request_id, &payload[..]), (42, &b"ping"[..]));
//! rx.release();
//! ```

pub mod control;
mod error;
pub mod frame;
#[cfg(not(loom))]
#[doc(hidden)]
pub mod fuzzing;
pub mod handshake;
pub mod layout;
pub mod message;
mod region;
mod reply;
mod ring;
mod segment;
mod spin;
pub mod sync;

pub use control::{Credentials, Role};
pub use error::{HandshakeError, LayoutError};
pub use frame::{stream_frame, FrameHeader, FLAG_CLOSED, FLAG_ERROR, FLAG_PAD, HEADER_LEN};
pub use handshake::{DoorbellKind, Hello, Reject, ServerMessage, ServiceEntry, Welcome, PROTOCOL_VERSION};
pub use layout::{SegmentLayout, DEFAULT_RING_CAPACITY};
#[cfg(not(loom))]
#[doc(hidden)]
pub use region::bench;
#[cfg(not(all(test, loom)))]
pub use region::Retained;
pub use region::{HeapMemory, Region, SharedMemory, REGION_ALIGN, WORD};
pub use reply::{decode_error, encode_error, ErrorCode, MAX_ERROR_MESSAGE};
pub use ring::{Consumer, Direction, Frame, Index, PayloadWriter, Producer, PushError, RingError};
pub use segment::{Segment, SharedWords, Waiter};
pub use spin::Spinner;
