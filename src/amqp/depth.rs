//! Is a transfer's payload safe to decode? The AMQP decoder (serde_amqp, under fe2o3-amqp)
//! recurses once per list, map, array and described value, on the worker's stack: a message
//! nested a few thousand levels deep overflows it and aborts the whole process, and the broker
//! redelivers it into the same crash. So the payload, as received, is walked here first without
//! recursion, and a payload that nests deeper than [`MAX_DEPTH`] is never decoded.
//!
//! The walk reads the encoding as the decoder does (AMQP 1.0 part 1, §1.6): element counts, not
//! byte sizes, decide where a list or map ends. It also refuses what the decoder would read
//! differently from the bytes' own structure, since only a walk that agrees with the decoder
//! bounds its recursion:
//! - an array of arrays or described values (arrays of lists and maps are walked: each
//!   element is a list or map without its own constructor, as the patched decoder reads it,
//!   see `vendor/serde_amqp/PATCHES.md`; RabbitMQ 4's `x-opt-deaths` is an array of maps);
//! - a map with an odd count, or a list, map or array whose size cannot hold its own count
//!   field: the decoder's arithmetic on them overflows (a panic in a debug build);
//! - a descriptor that is not a ulong or a symbol, an unknown constructor, a truncated value.
//!
//! The walk is linear in the payload's bytes, allocates nothing below [`INLINE_LEVELS`]
//! levels, and reads the frames of a multi-frame delivery in place.

use std::fmt;

/// Lists, maps, arrays and described values nested deeper than this in a message are refused.
/// The message sections count as one level (each is a described value), so an `amqp-value`
/// body may nest 127 levels: serde_json's own default limit is 128. Measured on the decoder,
/// maps being the costliest: about 10.5 KB of stack per level in a debug build (128 levels use
/// 1.35 MB; a bare 2 MiB thread overflows past 196, a debug daemon's worker between 176 and
/// 190), about 1.2 KB per level in a release build (128 levels: 160 KB; a bare 2 MiB thread
/// overflows past about 1,730).
pub const MAX_DEPTH: usize = 128;

/// Open levels kept on the stack; deeper ones spill to the heap.
const INLINE_LEVELS: usize = 16;

/// Why a payload is not decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Nested deeper than the limit.
    TooDeep { limit: usize },
    /// Not an encoding the decoder reads safely; says what was found.
    Malformed(&'static str),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooDeep { limit } => write!(f, "message nested deeper than {limit} levels"),
            Self::Malformed(what) => write!(f, "malformed AMQP encoding: {what}"),
        }
    }
}

/// The check the receiver runs on every payload before decoding it (see
/// `vendor/fe2o3-amqp/PATCHES.md`): [`check`] with [`MAX_DEPTH`], the refusal as text.
pub fn check_payload(chunks: &[&[u8]]) -> Result<(), String> {
    check(chunks, MAX_DEPTH).map_err(|refusal| refusal.to_string())
}

/// Walks the encoded values in `chunks` (one payload, split anywhere) and refuses them when
/// they nest deeper than `limit` or are not safe to decode. An empty payload passes.
pub fn check(chunks: &[&[u8]], limit: usize) -> Result<(), Refusal> {
    let mut bytes = Cursor::new(chunks);
    // The items still to read in each open list, map, described value or array of lists or
    // maps, innermost last.
    let mut open = Levels::default();
    loop {
        // The next value is the next item of the innermost level that still has one; an
        // array's elements come without a constructor of their own.
        let implied = loop {
            match open.last_mut() {
                Some(Level { items: 0, .. }) => open.pop(),
                Some(level) => {
                    level.items -= 1;
                    break level.element;
                }
                None if bytes.at_end() => return Ok(()),
                None => break None,
            }
        };
        let code = match implied {
            Some(code) => code,
            None => bytes.u8()?,
        };
        let level = match code {
            0x00 => {
                descriptor(&mut bytes)?;
                Level::items(1)
            }
            0x45 => Level::items(0),
            0xc0 | 0xc1 | 0xd0 | 0xd1 => {
                let (_size, count) = header(&mut bytes, code)?;
                if code & 0x0f == 1 && count % 2 == 1 {
                    return Err(Refusal::Malformed("a map with an odd count"));
                }
                Level::items(count)
            }
            0xe0 | 0xf0 => {
                if open.len() >= limit {
                    return Err(Refusal::TooDeep { limit });
                }
                match array(&mut bytes, code)? {
                    Some(elements) => elements,
                    None => continue,
                }
            }
            _ => {
                skip_payload(&mut bytes, code)?;
                continue;
            }
        };
        if open.len() >= limit {
            return Err(Refusal::TooDeep { limit });
        }
        open.push(level);
    }
}

/// One open level: the items still to read, and the constructor they share when the level is
/// an array of lists or maps.
#[derive(Clone, Copy, Default)]
struct Level {
    items: u32,
    element: Option<u8>,
}

impl Level {
    fn items(items: u32) -> Self {
        Self {
            items,
            element: None,
        }
    }
}

/// A descriptor after `0x00`: a ulong or a symbol, as the decoder takes nothing else.
fn descriptor(bytes: &mut Cursor<'_>) -> Result<(), Refusal> {
    let code = bytes.u8()?;
    if !matches!(code, 0x44 | 0x53 | 0x80 | 0xa3 | 0xb3) {
        return Err(Refusal::Malformed(
            "a descriptor that is neither a ulong nor a symbol",
        ));
    }
    skip_payload(bytes, code)
}

/// The size and count of a list, map or array; the size must hold the count field.
fn header(bytes: &mut Cursor<'_>, code: u8) -> Result<(u32, u32), Refusal> {
    let (size, count, count_width) = if code & 0x10 == 0 {
        // list8, map8, array8: a one-byte size and count (0xc0, 0xc1, 0xe0)
        (u32::from(bytes.u8()?), u32::from(bytes.u8()?), 1)
    } else {
        (bytes.u32()?, bytes.u32()?, 4)
    };
    if size < count_width {
        return Err(Refusal::Malformed("a size smaller than its count field"));
    }
    Ok((size, count))
}

/// An array: one constructor, then `count` payloads of it. Primitive elements are skipped
/// here; an array of lists or maps is a level whose items are read without constructors.
fn array(bytes: &mut Cursor<'_>, code: u8) -> Result<Option<Level>, Refusal> {
    let (size, count) = header(bytes, code)?;
    if count == 0 {
        return Ok(None);
    }
    // The decoder refuses a count over the size; the size must hold count and constructor.
    let overhead = if code == 0xe0 { 2 } else { 5 };
    if count > size || size < overhead {
        return Err(Refusal::Malformed(
            "an array whose count does not fit its size",
        ));
    }
    let element = bytes.u8()?;
    if matches!(element, 0xc0 | 0xc1 | 0xd0 | 0xd1) {
        return Ok(Some(Level {
            items: count,
            element: Some(element),
        }));
    }
    if matches!(element, 0x00 | 0xc0..=0xff) {
        return Err(Refusal::Malformed("an array of arrays or described values"));
    }
    match fixed_width(element) {
        Some(width) => bytes.skip(u64::from(count) * u64::from(width))?,
        None => {
            for _ in 0..count {
                skip_payload(bytes, element)?;
            }
        }
    }
    Ok(None)
}

/// Skips the payload of a primitive `code`: a fixed width, or a size and that many bytes.
fn skip_payload(bytes: &mut Cursor<'_>, code: u8) -> Result<(), Refusal> {
    if let Some(width) = fixed_width(code) {
        return bytes.skip(u64::from(width));
    }
    let size = match code {
        0xa0 | 0xa1 | 0xa3 => u32::from(bytes.u8()?),
        0xb0 | 0xb1 | 0xb3 => bytes.u32()?,
        _ => return Err(Refusal::Malformed("an unknown constructor")),
    };
    bytes.skip(u64::from(size))
}

/// The width of a fixed-width primitive, `None` for any other code.
fn fixed_width(code: u8) -> Option<u32> {
    Some(match code {
        // 0x45, the empty list, is a level where it stands alone (see `check`), not in an array.
        0x40..=0x45 => 0,
        0x50..=0x56 => 1,
        0x60 | 0x61 => 2,
        0x70..=0x74 => 4,
        0x80..=0x84 => 8,
        0x94 | 0x98 => 16,
        _ => return None,
    })
}

/// The payload as one run of bytes over its chunks.
struct Cursor<'a> {
    chunks: &'a [&'a [u8]],
    /// The unread part of the current chunk.
    current: &'a [u8],
}

const TRUNCATED: Refusal = Refusal::Malformed("a truncated value");

impl<'a> Cursor<'a> {
    fn new(chunks: &'a [&'a [u8]]) -> Self {
        Self {
            chunks,
            current: &[],
        }
    }

    /// Moves to the next chunk with something in it; false when there is none.
    fn refill(&mut self) -> bool {
        while self.current.is_empty() {
            match self.chunks.split_first() {
                Some((first, rest)) => {
                    self.current = first;
                    self.chunks = rest;
                }
                None => return false,
            }
        }
        true
    }

    fn at_end(&mut self) -> bool {
        !self.refill()
    }

    fn u8(&mut self) -> Result<u8, Refusal> {
        if !self.refill() {
            return Err(TRUNCATED);
        }
        let (&byte, rest) = self.current.split_first().ok_or(TRUNCATED)?;
        self.current = rest;
        Ok(byte)
    }

    fn u32(&mut self) -> Result<u32, Refusal> {
        if let Some((four, rest)) = self.current.split_first_chunk::<4>() {
            self.current = rest;
            return Ok(u32::from_be_bytes(*four));
        }
        let mut four = [0; 4];
        for byte in &mut four {
            *byte = self.u8()?;
        }
        Ok(u32::from_be_bytes(four))
    }

    fn skip(&mut self, mut n: u64) -> Result<(), Refusal> {
        loop {
            let here = self.current.len() as u64;
            if n <= here {
                // n fits in this chunk, so in usize.
                self.current = &self.current[n as usize..];
                return Ok(());
            }
            n -= here;
            self.current = &[];
            if !self.refill() {
                return Err(TRUNCATED);
            }
        }
    }
}

/// The open levels: a small stack kept inline, spilling to the heap past [`INLINE_LEVELS`].
#[derive(Default)]
struct Levels {
    inline: [Level; INLINE_LEVELS],
    len: usize,
    spilled: Vec<Level>,
}

impl Levels {
    fn len(&self) -> usize {
        self.len + self.spilled.len()
    }

    fn push(&mut self, level: Level) {
        if self.len < INLINE_LEVELS {
            self.inline[self.len] = level;
            self.len += 1;
        } else {
            self.spilled.push(level);
        }
    }

    fn pop(&mut self) {
        if self.spilled.pop().is_none() {
            self.len = self.len.saturating_sub(1);
        }
    }

    fn last_mut(&mut self) -> Option<&mut Level> {
        match self.spilled.last_mut() {
            Some(top) => Some(top),
            None if self.len > 0 => Some(&mut self.inline[self.len - 1]),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use fe2o3_amqp::types::messaging::message::__private::Serializable;
    use fe2o3_amqp::types::messaging::{
        ApplicationProperties, Header, Message, MessageAnnotations, Properties,
    };
    use fe2o3_amqp::types::primitives::{Array, Symbol, Value};

    use super::*;

    /// `levels` list32s around the smallint 1, built front to back without recursion.
    fn nested_lists(levels: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 * levels + 2);
        for k in 0..levels {
            let size = 4 + 9 * (levels - k - 1) + 2;
            out.push(0xd0);
            out.extend_from_slice(&(size as u32).to_be_bytes());
            out.extend_from_slice(&1u32.to_be_bytes());
        }
        out.extend_from_slice(&[0x54, 0x01]);
        out
    }

    /// `levels` map32s, each `{1: <the next>}`.
    fn nested_maps(levels: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(11 * levels + 2);
        for k in 0..levels {
            let size = 4 + 2 + 11 * (levels - k - 1) + 2;
            out.push(0xd1);
            out.extend_from_slice(&(size as u32).to_be_bytes());
            out.extend_from_slice(&2u32.to_be_bytes());
            out.extend_from_slice(&[0x54, 0x01]);
        }
        out.extend_from_slice(&[0x54, 0x01]);
        out
    }

    /// `pairs` array32s of one map32 each, `{1: <the next array>}`: two levels a pair, built
    /// from the inside out.
    fn nested_arrays_of_maps(pairs: usize) -> Vec<u8> {
        let mut inner = vec![0x54, 0x01];
        for _ in 0..pairs {
            let map_body = [&2u32.to_be_bytes()[..], &[0x54, 0x01], &inner].concat();
            let element = [&(map_body.len() as u32).to_be_bytes()[..], &map_body].concat();
            let array_body = [&1u32.to_be_bytes()[..], &[0xd1], &element].concat();
            inner = [
                &[0xf0][..],
                &(array_body.len() as u32).to_be_bytes(),
                &array_body,
            ]
            .concat();
        }
        inner
    }

    /// `levels` described values, each describing the next.
    fn nested_described(levels: usize) -> Vec<u8> {
        let mut out = [0x00, 0x53, 0x01].repeat(levels);
        out.extend_from_slice(&[0x54, 0x01]);
        out
    }

    /// An amqp-value section around `value`'s bytes.
    fn amqp_value(value: &[u8]) -> Vec<u8> {
        [&[0x00, 0x53, 0x77][..], value].concat()
    }

    fn whole(bytes: &[u8], limit: usize) -> Result<(), Refusal> {
        check(&[bytes], limit)
    }

    /// A message with every section that can nest, as the publisher encodes it.
    fn full_message() -> Vec<u8> {
        let mut annotations = MessageAnnotations::default();
        annotations.insert(
            Symbol::from("x-opt-nested").into(),
            Value::List(vec![Value::Map(
                [(Value::from("k"), Value::Array(Array(vec![Value::Int(1)])))]
                    .into_iter()
                    .collect(),
            )]),
        );
        let message = Message::builder()
            .header(Header::default())
            .message_annotations(annotations)
            .properties(Properties::builder().message_id("m-1".to_string()).build())
            .application_properties(
                ApplicationProperties::builder()
                    .insert("tenant", "acme")
                    .build(),
            )
            .value(Value::List(vec![Value::Int(1), Value::from("two")]))
            .build();
        serde_amqp::to_vec(&Serializable(message)).expect("encodes")
    }

    #[test]
    fn nothing_and_primitives_pass() {
        assert_eq!(whole(&[], 1), Ok(()));
        // null, true, smallint, ulong, str8 "hi", vbin32 of 2 bytes, uuid
        let mut bytes = vec![0x40, 0x41, 0x54, 0x07, 0x80, 0, 0, 0, 0, 0, 0, 0, 1];
        bytes.extend_from_slice(&[0xa1, 2, b'h', b'i', 0xb0, 0, 0, 0, 2, 1, 2, 0x98]);
        bytes.extend_from_slice(&[0; 16]);
        assert_eq!(whole(&bytes, 1), Ok(()));
    }

    #[test]
    fn a_real_message_passes_and_counts_its_levels() {
        let bytes = full_message();
        assert_eq!(whole(&bytes, MAX_DEPTH), Ok(()));
        // The annotation nests deepest: section, map, list, map, array.
        assert_eq!(whole(&bytes, 5), Ok(()));
        assert_eq!(whole(&bytes, 4), Err(Refusal::TooDeep { limit: 4 }));
    }

    #[test]
    fn lists_maps_and_described_values_are_levels() {
        for (kind, build) in [
            ("lists", nested_lists as fn(usize) -> Vec<u8>),
            ("maps", nested_maps),
            ("described", nested_described),
        ] {
            for levels in [1, 2, 16, 17, 100] {
                let bytes = build(levels);
                assert_eq!(whole(&bytes, levels), Ok(()), "{kind} {levels}");
                assert_eq!(
                    whole(&bytes, levels - 1),
                    Err(Refusal::TooDeep { limit: levels - 1 }),
                    "{kind} {levels}"
                );
            }
        }
    }

    #[test]
    fn arrays_and_empty_lists_are_levels_and_siblings_are_not() {
        // list8 [array8 of 3 ints, list0, str8 "x"]
        let bytes = [
            0xc0, 12, 3, 0xe0, 5, 3, 0x54, 1, 2, 3, 0x45, 0xa1, 1, b'x', 0x40,
        ];
        assert_eq!(whole(&bytes, 2), Ok(()));
        assert_eq!(whole(&bytes, 1), Err(Refusal::TooDeep { limit: 1 }));
        // Three sections side by side are each one level.
        let sections = [
            amqp_value(&[0x40]),
            amqp_value(&[0x40]),
            amqp_value(&[0x40]),
        ]
        .concat();
        assert_eq!(whole(&sections, 1), Ok(()));
        // An array of strings: each element skipped by its own size.
        let strings = [0xe0, 9, 2, 0xa1, 2, b'a', b'b', 3, b'c', b'd', b'e'];
        assert_eq!(whole(&strings, 1), Ok(()));
        // An empty array has no constructor.
        assert_eq!(whole(&[0xe0, 1, 0], 1), Ok(()));
    }

    #[test]
    fn ten_thousand_levels_are_refused_without_recursion() {
        for (kind, bytes) in [
            ("lists", nested_lists(10_000)),
            ("maps", nested_maps(10_000)),
            ("described", nested_described(10_000)),
        ] {
            let bytes = amqp_value(&bytes);
            assert_eq!(
                whole(&bytes, MAX_DEPTH),
                Err(Refusal::TooDeep { limit: MAX_DEPTH }),
                "{kind}"
            );
            // Walked to the bottom, it still needs no stack per level.
            assert_eq!(whole(&bytes, 10_001), Ok(()), "{kind}");
            assert_eq!(
                whole(&bytes, 10_000),
                Err(Refusal::TooDeep { limit: 10_000 })
            );
        }
    }

    #[test]
    fn the_reason_names_the_limit() {
        let refused = check_payload(&[&amqp_value(&nested_lists(MAX_DEPTH))]);
        assert_eq!(
            refused,
            Err(format!("message nested deeper than {MAX_DEPTH} levels"))
        );
        assert_eq!(
            check_payload(&[&amqp_value(&nested_lists(MAX_DEPTH - 1))]),
            Ok(())
        );
    }

    #[test]
    fn a_payload_split_anywhere_reads_the_same() {
        let samples = [
            full_message(),
            amqp_value(&nested_lists(40)),
            amqp_value(&nested_maps(40)),
            [0xe0, 9, 2, 0xa1, 2, b'a', b'b', 3, b'c', b'd', b'e'].to_vec(),
        ];
        for bytes in &samples {
            for limit in [3, 41, MAX_DEPTH] {
                let expected = whole(bytes, limit);
                for at in 0..=bytes.len() {
                    let (a, b) = bytes.split_at(at);
                    assert_eq!(check(&[a, &[], b], limit), expected, "split at {at}");
                }
                let singles: Vec<&[u8]> = bytes.chunks(1).collect();
                assert_eq!(check(&singles, limit), expected);
            }
        }
    }

    #[test]
    fn what_the_decoder_would_misread_is_malformed() {
        let malformed = |bytes: &[u8]| match whole(bytes, MAX_DEPTH) {
            Err(Refusal::Malformed(what)) => what,
            other => panic!("{bytes:x?}: {other:?}"),
        };
        assert!(malformed(&[0xc1, 3, 1, 0x40]).contains("odd count"));
        assert!(malformed(&[0xc0, 0, 0]).contains("size smaller"));
        assert!(malformed(&[0xd1, 0, 0, 0, 3, 0, 0, 0, 0]).contains("size smaller"));
        assert!(malformed(&[0xe0, 1, 1, 0x54, 1]).contains("count does not fit"));
        assert!(malformed(&[0xe0, 2, 3, 0x40]).contains("count does not fit"));
        for element in [0x00, 0xe0, 0xf0] {
            assert!(malformed(&[0xe0, 4, 1, element, 1, 0]).contains("array of arrays"));
        }
        assert!(malformed(&[0xe0, 4, 1, 0xc1, 1, 1]).contains("odd count"));
        assert!(malformed(&[0x00, 0xc0, 1, 0, 0x40]).contains("descriptor"));
        assert!(malformed(&[0x1f]).contains("unknown constructor"));
        assert!(malformed(&[0xa1, 5, b'a']).contains("truncated"));
        assert!(malformed(&[0xd0, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]).contains("truncated"));
    }

    #[test]
    fn every_prefix_ends_or_is_truncated() {
        for bytes in [full_message(), amqp_value(&nested_maps(30))] {
            for end in 0..bytes.len() {
                match whole(&bytes[..end], MAX_DEPTH) {
                    Ok(()) | Err(Refusal::Malformed("a truncated value")) => {}
                    other => panic!("prefix of {end}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn garbage_never_panics_and_ends() {
        let mut rng = fastrand::Rng::with_seed(7);
        let base = full_message();
        for round in 0..20_000 {
            let bytes: Vec<u8> = if round % 2 == 0 {
                let len = rng.usize(0..300);
                (0..len).map(|_| rng.u8(..)).collect()
            } else {
                // A real message with a few bytes changed: mostly valid structure.
                let mut bytes = base.clone();
                for _ in 0..rng.usize(1..4) {
                    let at = rng.usize(0..bytes.len());
                    bytes[at] = rng.u8(..);
                }
                bytes
            };
            let _ = whole(&bytes, rng.usize(0..64));
        }
    }

    #[test]
    fn what_passes_the_walk_never_panics_the_decoder() {
        // Mutated dead letters: the walk's arrays of maps and the patched decoder must agree
        // closely enough that nothing the walk lets through makes the decoder panic.
        let mut rng = fastrand::Rng::with_seed(11);
        let base = [
            deaths_annotations(&[("delivery_limit", 3), ("rejected", 1)]),
            amqp_value(&nested_arrays_of_maps(3)),
        ]
        .concat();
        let mut passed = 0;
        for _ in 0..20_000 {
            let mut bytes = base.clone();
            for _ in 0..rng.usize(1..4) {
                let at = rng.usize(0..bytes.len());
                bytes[at] = rng.u8(..);
            }
            if whole(&bytes, MAX_DEPTH).is_ok() {
                passed += 1;
                let _ = decode(&bytes);
            }
        }
        assert!(
            passed > 1000,
            "too few mutants pass the walk to mean anything: {passed}"
        );
    }

    /// A symbol of up to 255 bytes.
    fn sym8(s: &str) -> Vec<u8> {
        let mut out = vec![0xa3, u8::try_from(s.len()).expect("short symbol")];
        out.extend_from_slice(s.as_bytes());
        out
    }

    /// Message annotations `{x-opt-deaths: [{reason: R, count: N}, ...]}` the way RabbitMQ 4
    /// encodes them: an array8 of map8 elements, which carry no constructor of their own.
    fn deaths_annotations(deaths: &[(&str, u8)]) -> Vec<u8> {
        let mut elements = Vec::new();
        for (reason, count) in deaths {
            let items = [
                sym8("reason"),
                sym8(reason),
                sym8("count"),
                vec![0x53, *count],
            ]
            .concat();
            elements.push(u8::try_from(items.len() + 1).expect("small map"));
            elements.push(4);
            elements.extend_from_slice(&items);
        }
        let array = [
            &[
                0xe0,
                u8::try_from(elements.len() + 2).expect("small array"),
                u8::try_from(deaths.len()).expect("few deaths"),
                0xc1,
            ][..],
            &elements,
        ]
        .concat();
        let items = [sym8("x-opt-deaths"), array].concat();
        let map = [
            &[0xc1, u8::try_from(items.len() + 1).expect("small map"), 2][..],
            &items,
        ]
        .concat();
        [&[0x00, 0x53, 0x72][..], &map].concat()
    }

    #[test]
    fn an_array_of_maps_is_walked_and_decodes_as_the_walk_reads_it() {
        use fe2o3_amqp::types::messaging::Body;
        use fe2o3_amqp::types::messaging::annotations::OwnedKey;
        use fe2o3_amqp::types::messaging::message::DecodeIntoMessage;
        use fe2o3_amqp::types::primitives::OrderedMap;

        let payload = [
            deaths_annotations(&[("delivery_limit", 3), ("rejected", 1)]),
            amqp_value(&[0x54, 0x07]),
        ]
        .concat();
        assert_eq!(whole(&payload, MAX_DEPTH), Ok(()));
        // The array is one level and each map another, below the annotations' map.
        assert_eq!(
            whole(&payload, 3),
            Err(Refusal::TooDeep { limit: 3 }),
            "section, map, array, element map"
        );
        assert_eq!(whole(&payload, 4), Ok(()));
        // Nested arrays of maps take two levels a pair, and the bound holds for them too.
        let deep = amqp_value(&nested_arrays_of_maps(MAX_DEPTH / 2));
        assert_eq!(
            whole(&deep, MAX_DEPTH),
            Err(Refusal::TooDeep { limit: MAX_DEPTH })
        );

        let message = <Body<Value> as DecodeIntoMessage>::decode_message_from_reader(
            serde_amqp::read::SliceReader::new(&payload),
        )
        .expect("an array of maps decodes (vendor/serde_amqp patch)");
        let annotations = message.message_annotations.expect("annotations");
        let deaths = annotations
            .get(&OwnedKey::from(Symbol::from("x-opt-deaths")))
            .expect("x-opt-deaths");
        let death = |reason: &str, count: u64| {
            let mut map = OrderedMap::new();
            map.insert(
                Value::Symbol(Symbol::from("reason")),
                Value::Symbol(Symbol::from(reason)),
            );
            map.insert(Value::Symbol(Symbol::from("count")), Value::Ulong(count));
            Value::Map(map)
        };
        assert_eq!(
            deaths,
            &Value::Array(Array(vec![
                death("delivery_limit", 3),
                death("rejected", 1)
            ]))
        );
    }

    /// Decodes `payload` as the receiver does, then takes the value apart level by level
    /// (dropping it whole recurses too).
    fn decode(payload: &[u8]) -> bool {
        use fe2o3_amqp::types::messaging::Body;
        use fe2o3_amqp::types::messaging::message::DecodeIntoMessage;
        let decoded = <Body<Value> as DecodeIntoMessage>::decode_message_from_reader(
            serde_amqp::read::SliceReader::new(payload),
        );
        let Ok(message) = decoded else { return false };
        let mut values = Vec::new();
        if let Body::Value(v) = message.body {
            values.push(v.0);
        }
        while let Some(v) = values.pop() {
            match v {
                Value::List(items) => values.extend(items),
                Value::Map(map) => values.extend(map.into_iter().flat_map(|(k, v)| [k, v])),
                Value::Described(d) => values.push(d.value),
                Value::Array(items) => values.extend(items.0),
                _ => {}
            }
        }
        true
    }

    #[test]
    fn what_passes_at_the_bound_decodes_within_a_worker_stack() {
        // A tokio worker has 2 MiB; the receive path above the decoder was measured at under
        // 320 KB in a debug build, so the decoder gets what is left after 512 KiB.
        let stack = (2 << 20) - (512 << 10);
        for (kind, bytes) in [
            ("lists", nested_lists(MAX_DEPTH - 1)),
            ("maps", nested_maps(MAX_DEPTH - 1)),
            ("described", nested_described(MAX_DEPTH - 1)),
            ("arrays of maps", nested_arrays_of_maps((MAX_DEPTH - 1) / 2)),
        ] {
            let payload = amqp_value(&bytes);
            assert_eq!(whole(&payload, MAX_DEPTH), Ok(()), "{kind}");
            let decoded = std::thread::Builder::new()
                .stack_size(stack)
                .spawn(move || decode(&payload))
                .expect("a thread")
                .join()
                .expect("decoded without a panic");
            assert!(decoded, "{kind}");
        }
    }

    #[test]
    fn huge_counts_cost_only_the_bytes_present() {
        // A list32 claiming 4 billion items, a map32 likewise, an array32 of 4 billion nulls.
        let list = [0xd0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x40];
        let map = [0xd1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe, 0x40];
        let nulls = [0xf0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe, 0x40];
        let started = std::time::Instant::now();
        assert_eq!(whole(&list, 8), Err(TRUNCATED));
        assert_eq!(whole(&map, 8), Err(TRUNCATED));
        // The decoder reads them as they come (width 0), and so does the walk.
        assert_eq!(whole(&nulls, 8), Ok(()));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }
}
