//! Raw pixel bytes that travel as `bin` in MessagePack and as base64 in JSON.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Row-major 8-bit pixel data.
///
/// Serialises as a byte string in binary formats (MessagePack `bin`, no per-byte overhead) and
/// as a base64 string in human-readable ones (JSON). On input it also takes what other
/// producers commonly send: a MessagePack `str` holding raw bytes (old `msgpack` clients without
/// `use_bin_type`), or an array of integers 0..=255.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Pixels(pub Vec<u8>);

impl Pixels {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for Pixels {
    fn from(v: Vec<u8>) -> Self {
        Self(v)
    }
}

impl fmt::Debug for Pixels {
    // A frame is megabytes; a log line with it in is useless.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pixels({} bytes)", self.0.len())
    }
}

impl Serialize for Pixels {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&BASE64.encode(&self.0))
        } else {
            serializer.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Pixels {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text_is_base64 = deserializer.is_human_readable();
        deserializer.deserialize_any(PixelsVisitor { text_is_base64 })
    }
}

struct PixelsVisitor {
    text_is_base64: bool,
}

impl<'de> Visitor<'de> for PixelsVisitor {
    type Value = Pixels;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.text_is_base64 {
            f.write_str("pixel bytes as a base64 string")
        } else {
            f.write_str("pixel bytes as MessagePack bin")
        }
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Pixels, E> {
        Ok(Pixels(v.to_vec()))
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Pixels, E> {
        Ok(Pixels(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Pixels, E> {
        if self.text_is_base64 {
            BASE64
                .decode(v)
                .map(Pixels)
                .map_err(|e| E::custom(format_args!("pixels are not valid base64: {e}")))
        } else {
            Ok(Pixels(v.as_bytes().to_vec()))
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Pixels, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
        while let Some(b) = seq.next_element::<u8>()? {
            out.push(b);
        }
        Ok(Pixels(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_base64_and_msgpack_is_bin() {
        let p = Pixels(vec![0, 1, 2, 255]);
        assert_eq!(serde_json::to_string(&p).expect("json"), "\"AAEC/w==\"");
        let mp = rmp_serde::to_vec(&p).expect("msgpack");
        assert_eq!(mp, [0xc4, 4, 0, 1, 2, 255], "bin 8 marker, length, bytes");
        assert_eq!(rmp_serde::from_slice::<Pixels>(&mp).expect("decode"), p);
        assert_eq!(
            serde_json::from_str::<Pixels>("\"AAEC/w==\"").expect("decode"),
            p
        );
    }

    #[test]
    fn accepts_integer_arrays_and_rejects_bad_base64() {
        let p: Pixels = serde_json::from_str("[1,2,3]").expect("array");
        assert_eq!(p.0, [1, 2, 3]);
        let err = serde_json::from_str::<Pixels>("\"not base64!\"").expect_err("bad base64");
        assert!(err.to_string().contains("base64"), "{err}");
        assert!(serde_json::from_str::<Pixels>("[256]").is_err());
    }
}
