//! The body of an error response (a frame with `FLAG_ERROR`).
//!
//! ```text
//! +0  code     u32   an ErrorCode
//! +4  message  utf-8 (at most MAX_ERROR_MESSAGE bytes)
//! ```

/// What went wrong with a request, as the daemon tells the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorCode {
    /// No service has the id the request named.
    UnknownService,
    /// The service handler returned an error.
    Handler,
    /// The daemon is shutting down; the request was not executed.
    Shutdown,
    /// The handler's reply exceeds the negotiated maximum payload.
    ReplyTooLarge,
    /// The service handler panicked.
    HandlerPanicked,
    /// A code this build does not know.
    Other(u32),
}

/// The longest error message carried, in bytes.
pub const MAX_ERROR_MESSAGE: usize = 1024;

impl ErrorCode {
    /// The wire value.
    pub fn to_u32(self) -> u32 {
        match self {
            ErrorCode::UnknownService => 1,
            ErrorCode::Handler => 2,
            ErrorCode::Shutdown => 3,
            ErrorCode::ReplyTooLarge => 4,
            ErrorCode::HandlerPanicked => 5,
            ErrorCode::Other(n) => n,
        }
    }

    /// The code for a wire value.
    pub fn from_u32(n: u32) -> ErrorCode {
        match n {
            1 => ErrorCode::UnknownService,
            2 => ErrorCode::Handler,
            3 => ErrorCode::Shutdown,
            4 => ErrorCode::ReplyTooLarge,
            5 => ErrorCode::HandlerPanicked,
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
    out.extend_from_slice(&message.as_bytes()[..end]);
}

/// Reads an error body. Malformed bodies decode to `Other(0)` with what
/// could be read, since the client reports rather than trusts them.
pub fn decode_error(body: &[u8]) -> (ErrorCode, String) {
    if body.len() < 4 {
        return (ErrorCode::Other(0), String::from("malformed error reply"));
    }
    let code = ErrorCode::from_u32(u32::from_le_bytes([body[0], body[1], body[2], body[3]]));
    let rest = &body[4..body.len().min(4 + MAX_ERROR_MESSAGE)];
    (code, String::from_utf8_lossy(rest).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_round_trip() {
        let mut out = Vec::new();
        encode_error(ErrorCode::Handler, "no such key", &mut out);
        assert_eq!(decode_error(&out), (ErrorCode::Handler, "no such key".to_string()));
    }

    #[test]
    fn long_messages_are_cut_at_a_char_boundary() {
        let mut out = Vec::new();
        let long = "é".repeat(MAX_ERROR_MESSAGE);
        encode_error(ErrorCode::Handler, &long, &mut out);
        assert!(out.len() <= 4 + MAX_ERROR_MESSAGE);
        let (_, msg) = decode_error(&out);
        assert!(msg.chars().all(|c| c == 'é'));
    }

    #[test]
    fn malformed_bodies_do_not_panic() {
        assert_eq!(decode_error(&[1]).0, ErrorCode::Other(0));
        assert_eq!(decode_error(&[9, 0, 0, 0, 0xff]).0, ErrorCode::Other(9));
    }
}
