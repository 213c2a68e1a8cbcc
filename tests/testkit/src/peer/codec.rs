//! Byte-level codec of the peer: protocol headers, cutting the byte stream into frames,
//! decoding a frame body, and encoding what the peer answers. Nothing here panics on what a
//! client sends: every failure is a `String` the caller records in the frame log.

use fe2o3_amqp::frames::sasl::Frame as SaslFrame;
use fe2o3_amqp::types::performatives::Performative;

/// `AMQP 0 1.0.0`: the plain AMQP protocol header.
pub(super) const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";
/// `AMQP 3 1.0.0`: the SASL protocol header.
pub(super) const SASL_HEADER: [u8; 8] = *b"AMQP\x03\x01\x00\x00";
/// Frame type byte of an AMQP frame.
pub(super) const FRAME_TYPE_AMQP: u8 = 0x00;
/// Frame type byte of a SASL frame.
pub(super) const FRAME_TYPE_SASL: u8 = 0x01;
/// Smallest frame: the 8-byte frame header alone (an empty frame, i.e. a heartbeat).
const FRAME_HEADER_LEN: usize = 8;

/// One frame cut from the front of the input.
pub(super) struct RawFrame<'a> {
    /// The frame type byte (0 AMQP, 1 SASL).
    pub kind: u8,
    pub channel: u16,
    /// The frame body: what follows the (possibly extended) frame header.
    pub body: &'a [u8],
}

/// What [`cut_frame`] found at the front of the input.
pub(super) enum Cut<'a> {
    /// Not a whole frame yet.
    Need,
    /// A whole frame of `len` bytes.
    Frame { len: usize, frame: RawFrame<'a> },
    /// A whole frame of `len` bytes whose header is unusable (bad data offset): skip it.
    Skip { len: usize, reason: String },
    /// The size field is out of range: the stream cannot be framed any further.
    Fatal(String),
}

/// Cuts the frame at the front of `input` (AMQP 1.0 §2.3.1: 4-byte size, doff, type,
/// 2 type-specific bytes, extended header of `doff * 4 - 8` bytes, body).
pub(super) fn cut_frame(input: &[u8], max_frame_size: u32) -> Cut<'_> {
    let Some(size_bytes) = input.first_chunk::<4>() else {
        return Cut::Need;
    };
    let size = u32::from_be_bytes(*size_bytes);
    if (size as usize) < FRAME_HEADER_LEN || size > max_frame_size {
        return Cut::Fatal(format!(
            "frame size {size} outside 8..={max_frame_size} (the peer's max-frame-size)"
        ));
    }
    let len = size as usize;
    let Some(frame) = input.get(..len) else {
        return Cut::Need;
    };
    let doff = usize::from(frame[4]) * 4;
    if doff < FRAME_HEADER_LEN || doff > len {
        return Cut::Skip {
            len,
            reason: format!(
                "data offset {} out of range for a {len}-byte frame",
                frame[4]
            ),
        };
    }
    Cut::Frame {
        len,
        frame: RawFrame {
            kind: frame[5],
            channel: u16::from_be_bytes([frame[6], frame[7]]),
            body: &frame[doff..],
        },
    }
}

/// Decodes an AMQP frame body: `Ok(None)` for an empty (heartbeat) frame, else the
/// performative and the bytes after it (a transfer's payload; empty for the others).
pub(super) fn decode_amqp(body: &[u8]) -> Result<Option<(Performative, &[u8])>, String> {
    if body.is_empty() {
        return Ok(None);
    }
    let mut rest = body;
    let performative: Performative = guarded(|| serde_amqp::from_reader(&mut rest))?
        .map_err(|e| format!("undecodable performative: {e}"))?;
    Ok(Some((performative, rest)))
}

/// Decodes a SASL frame body.
pub(super) fn decode_sasl(body: &[u8]) -> Result<SaslFrame, String> {
    guarded(|| serde_amqp::from_slice(body))?.map_err(|e| format!("undecodable SASL frame: {e}"))
}

/// Runs a decoder on client bytes; a panic inside it becomes an error, so no byte sequence
/// can take the peer down.
fn guarded<T>(decode: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode))
        .map_err(|_| "the decoder panicked on these bytes".to_string())
}

fn frame(kind: u8, channel: u16, parts: &[&[u8]]) -> Vec<u8> {
    let body_len: usize = parts.iter().map(|p| p.len()).sum();
    let size = FRAME_HEADER_LEN + body_len;
    let mut out = Vec::with_capacity(size);
    // A frame larger than 4 GiB cannot be built from anything the peer sends.
    out.extend_from_slice(&u32::try_from(size).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&[2, kind]);
    out.extend_from_slice(&channel.to_be_bytes());
    for part in parts {
        out.extend_from_slice(part);
    }
    out
}

/// Encodes the performative alone (to measure it, or to frame it with a payload).
pub(super) fn encode_performative(performative: &Performative) -> Result<Vec<u8>, String> {
    serde_amqp::to_vec(performative).map_err(|e| format!("cannot encode {performative:?}: {e}"))
}

/// An AMQP frame carrying `performative` and `payload` on `channel`.
pub(super) fn amqp_frame(
    channel: u16,
    performative: &Performative,
    payload: &[u8],
) -> Result<Vec<u8>, String> {
    let encoded = encode_performative(performative)?;
    Ok(frame(FRAME_TYPE_AMQP, channel, &[&encoded, payload]))
}

/// An AMQP frame from an already encoded performative.
pub(super) fn amqp_frame_encoded(channel: u16, encoded: &[u8], payload: &[u8]) -> Vec<u8> {
    frame(FRAME_TYPE_AMQP, channel, &[encoded, payload])
}

/// A SASL frame.
pub(super) fn sasl_frame(body: &SaslFrame) -> Result<Vec<u8>, String> {
    let encoded = serde_amqp::to_vec(body).map_err(|e| format!("cannot encode {body:?}: {e}"))?;
    Ok(frame(FRAME_TYPE_SASL, 0, &[&encoded]))
}

/// An empty AMQP frame: a heartbeat.
pub(super) fn empty_frame() -> Vec<u8> {
    frame(FRAME_TYPE_AMQP, 0, &[])
}

/// Frame header bytes a frame adds to its body.
pub(super) const fn frame_overhead() -> usize {
    FRAME_HEADER_LEN
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp::types::performatives::{Detach, Performative};

    #[test]
    fn cut_and_decode_round_trip() {
        let detach = Performative::Detach(Detach {
            handle: 3.into(),
            closed: true,
            error: None,
        });
        let bytes = amqp_frame(7, &detach, b"").expect("encodes");
        assert!(matches!(cut_frame(&bytes[..5], 1024), Cut::Need));
        let Cut::Frame { len, frame } = cut_frame(&bytes, 1024) else {
            panic!("a whole frame")
        };
        assert_eq!(len, bytes.len());
        assert_eq!((frame.kind, frame.channel), (FRAME_TYPE_AMQP, 7));
        let (decoded, rest) = decode_amqp(frame.body)
            .expect("decodes")
            .expect("not empty");
        assert_eq!(decoded, detach);
        assert!(rest.is_empty());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(
            cut_frame(&[0, 0, 0, 3, 2, 0, 0, 0], 1024),
            Cut::Fatal(_)
        ));
        assert!(matches!(
            cut_frame(&[0, 0, 0, 8, 9, 0, 0, 0], 1024),
            Cut::Skip { .. }
        ));
        for garbage in [
            &[0x00u8, 0x53][..],
            &[0xff; 16],
            &[0x00, 0x53, 0x10, 0xc0, 0x05],
        ] {
            assert!(decode_amqp(garbage).is_err());
            assert!(decode_sasl(garbage).is_err());
        }
        assert!(matches!(decode_amqp(&[]), Ok(None)));
    }
}
