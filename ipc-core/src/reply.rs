//! The body of an error response (a frame with `FLAG_ERROR`).
//!
//! ```text
//! +0  code         u32   an ErrorCode's wire value
//! +4  application  u32   only for ErrorCode::Application (wire value 6):
//!                        the handler's own code
//! +4  message      utf-8 (at most MAX_ERROR_MESSAGE bytes; at +8 after an
//!                        application code)
//! ```
//!
//! The application code came with the providers: bodies of the codes
//! before it (1 to 5) are laid out as they always were, and a decoder that
//! predates it reads an application error as `Other(6)` with four bytes of
//! code before the message.

/// What went wrong with a request, as the daemon tells the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorCode {
    /// No service has the id the request named.
    UnknownService,
    /// The service handler returned an error (with a message only).
    Handler,
    /// The daemon is shutting down; the request was not executed.
    Shutdown,
    /// The handler's reply exceeds the server's largest message (or the
    /// memory it may hold): the handler ran, its reply is lost.
    ReplyTooLarge,
    /// The service handler panicked.
    HandlerPanicked,
    /// The service handler returned an error with a code of its own, which
    /// the body carries before the message.
    Application(u32),
    /// The session may not call this service (a brokered session calls
    /// only the services it was granted).
    NotPermitted,
    /// The handler ended without replying: it dropped the call's responder.
    NoReply,
    /// The daemon stopped before the handler finished; whether the request
    /// took effect is unknown.
    Unfinished,
    /// A stream's deadline passed before it ended.
    Timeout,
    /// The caller cancelled the stream.
    Cancelled,
    /// The session has its maximum of streams open, or of messages being
    /// assembled; the request was not executed.
    TooMany,
    /// A request longer than the server's largest message (or the memory
    /// it may hold): refused, not executed.
    MessageTooLarge,
    /// A code this build does not know.
    Other(u32),
}

/// The longest error message carried, in bytes.
pub const MAX_ERROR_MESSAGE: usize = 1024;

/// The wire value of [`ErrorCode::Application`], whose code follows it.
const APPLICATION: u32 = 6;

impl ErrorCode {
    /// The wire value: the body's first word. For
    /// [`ErrorCode::Application`] it is 6, and the application's code is
    /// the next word.
    pub fn to_u32(self) -> u32 {
        match self {
            ErrorCode::UnknownService => 1,
            ErrorCode::Handler => 2,
            ErrorCode::Shutdown => 3,
            ErrorCode::ReplyTooLarge => 4,
            ErrorCode::HandlerPanicked => 5,
            ErrorCode::Application(_) => APPLICATION,
            ErrorCode::NotPermitted => 7,
            ErrorCode::NoReply => 8,
            ErrorCode::Unfinished => 9,
            ErrorCode::Timeout => 10,
            ErrorCode::Cancelled => 11,
            ErrorCode::TooMany => 12,
            ErrorCode::MessageTooLarge => 13,
            ErrorCode::Other(n) => n,
        }
    }

    /// The code for a wire value that carries nothing more (every one but
    /// [`ErrorCode::Application`]'s).
    fn from_plain(n: u32) -> ErrorCode {
        match n {
            1 => ErrorCode::UnknownService,
            2 => ErrorCode::Handler,
            3 => ErrorCode::Shutdown,
            4 => ErrorCode::ReplyTooLarge,
            5 => ErrorCode::HandlerPanicked,
            7 => ErrorCode::NotPermitted,
            8 => ErrorCode::NoReply,
            9 => ErrorCode::Unfinished,
            10 => ErrorCode::Timeout,
            11 => ErrorCode::Cancelled,
            12 => ErrorCode::TooMany,
            13 => ErrorCode::MessageTooLarge,
            n => ErrorCode::Other(n),
        }
    }
}

/// Writes an error body into `out` (replacing its contents). The message is
/// cut, at a character boundary, to [`MAX_ERROR_MESSAGE`] bytes.
pub fn encode_error(code: ErrorCode, message: &str, out: &mut Vec<u8>) {
    let mut end = message.len().min(MAX_ERROR_MESSAGE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    out.clear();
    out.extend_from_slice(&code.to_u32().to_le_bytes());
    if let ErrorCode::Application(application) = code {
        out.extend_from_slice(&application.to_le_bytes());
    }
    out.extend_from_slice(&message.as_bytes()[..end]);
}

/// Reads an error body. Malformed bodies decode to `Other(0)` with what
/// could be read, since the client reports rather than trusts them.
pub fn decode_error(body: &[u8]) -> (ErrorCode, String) {
    let malformed = || (ErrorCode::Other(0), String::from("malformed error reply"));
    let Some((&code, rest)) = body.split_first_chunk::<4>() else { return malformed() };
    let (code, rest) = match u32::from_le_bytes(code) {
        APPLICATION => match rest.split_first_chunk::<4>() {
            Some((&application, rest)) => (ErrorCode::Application(u32::from_le_bytes(application)), rest),
            None => return malformed(),
        },
        n => (ErrorCode::from_plain(n), rest),
    };
    let message = &rest[..rest.len().min(MAX_ERROR_MESSAGE)];
    (code, String::from_utf8_lossy(message).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_round_trip() {
        let mut out = Vec::new();
        for code in [
            ErrorCode::UnknownService,
            ErrorCode::Handler,
            ErrorCode::Shutdown,
            ErrorCode::ReplyTooLarge,
            ErrorCode::HandlerPanicked,
            ErrorCode::Application(0),
            ErrorCode::Application(u32::MAX),
            ErrorCode::NotPermitted,
            ErrorCode::NoReply,
            ErrorCode::Unfinished,
            ErrorCode::Timeout,
            ErrorCode::Cancelled,
            ErrorCode::TooMany,
            ErrorCode::MessageTooLarge,
            ErrorCode::Other(77),
        ] {
            encode_error(code, "no such key", &mut out);
            assert_eq!(decode_error(&out), (code, "no such key".to_string()));
        }
    }

    #[test]
    fn bodies_without_an_application_code_keep_their_layout() {
        // A handler error as every earlier daemon wrote it.
        let old = [&2u32.to_le_bytes()[..], b"no such key"].concat();
        assert_eq!(decode_error(&old), (ErrorCode::Handler, "no such key".to_string()));
        let mut out = Vec::new();
        encode_error(ErrorCode::Handler, "no such key", &mut out);
        assert_eq!(out, old);
        // The application code sits between the wire value and the message.
        encode_error(ErrorCode::Application(0x0102_0304), "x", &mut out);
        assert_eq!(out, [6, 0, 0, 0, 4, 3, 2, 1, b'x']);
    }

    #[test]
    fn long_messages_are_cut_at_a_char_boundary() {
        let mut out = Vec::new();
        let long = "é".repeat(MAX_ERROR_MESSAGE);
        encode_error(ErrorCode::Handler, &long, &mut out);
        assert!(out.len() <= 4 + MAX_ERROR_MESSAGE);
        let (_, msg) = decode_error(&out);
        assert!(msg.chars().all(|c| c == 'é'));
        encode_error(ErrorCode::Application(9), &long, &mut out);
        assert!(out.len() <= 8 + MAX_ERROR_MESSAGE);
        let (code, msg) = decode_error(&out);
        assert_eq!(code, ErrorCode::Application(9));
        assert!(msg.chars().all(|c| c == 'é'));
    }

    #[test]
    fn malformed_bodies_do_not_panic() {
        assert_eq!(decode_error(&[1]).0, ErrorCode::Other(0));
        assert_eq!(decode_error(&[9, 0, 0, 0, 0xff]).0, ErrorCode::Unfinished);
        assert_eq!(decode_error(&[99, 0, 0, 0, 0xff]).0, ErrorCode::Other(99));
        // An application error too short to hold its code.
        assert_eq!(decode_error(&[6, 0, 0, 0, 1, 2]).0, ErrorCode::Other(0));
        assert_eq!(decode_error(&[6, 0, 0, 0, 1, 0, 0, 0]), (ErrorCode::Application(1), String::new()));
    }
}
