//! MessagePack and JSON codecs for every contract type.
//!
//! MessagePack is written with named fields (maps, not arrays), so producers in any language can
//! build messages by name and fields can be added without breaking old readers. Decoding reports
//! the path of the offending field and never panics, whatever bytes arrive: both decoders bound
//! their recursion depth, and the property tests in `tests/codec.rs` feed them random and
//! truncated input.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Deepest nesting accepted in a message.
pub const MAX_DEPTH: usize = 128;

/// Input that is not a valid message of the expected type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid MessagePack at `{path}`: {message}")]
    MessagePack { path: String, message: String },
    #[error("invalid JSON at `{path}`: {message}")]
    Json { path: String, message: String },
}

/// A value that cannot be written as MessagePack (in practice: a map key that is not a string).
#[derive(Debug, thiserror::Error)]
#[error("failed to encode as MessagePack")]
pub struct EncodeError(#[from] rmp_serde::encode::Error);

/// Encodes `value` as MessagePack with named fields.
///
/// # Errors
/// [`EncodeError`] if the value cannot be represented.
pub fn to_msgpack<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, EncodeError> {
    Ok(rmp_serde::to_vec_named(value)?)
}

/// [`to_msgpack`] into any writer.
///
/// # Errors
/// [`EncodeError`] if the value cannot be represented, or the writer fails.
pub fn write_msgpack<W: std::io::Write, T: Serialize + ?Sized>(
    out: &mut W,
    value: &T,
) -> Result<(), EncodeError> {
    Ok(rmp_serde::encode::write_named(out, value)?)
}

/// [`to_msgpack`] into a buffer of `capacity` bytes: sized for a message that carries a
/// frame, it is written without the buffer doubling (and copying) its way up to the frame's
/// size.
///
/// # Errors
/// [`EncodeError`] if the value cannot be represented.
pub fn to_msgpack_with_capacity<T: Serialize + ?Sized>(
    value: &T,
    capacity: usize,
) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(capacity);
    write_msgpack(&mut out, value)?;
    Ok(out)
}

/// Decodes MessagePack into `T`.
///
/// # Errors
/// [`DecodeError::MessagePack`] naming the field that did not fit.
pub fn from_msgpack<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    // rmp-serde's default of 1024 nested levels overflows a 2 MiB thread stack when the
    // levels land in `serde_json::Value`; 128 matches serde_json's own limit and no workflow
    // comes near it.
    de.set_max_depth(MAX_DEPTH);
    serde_path_to_error::deserialize(&mut de).map_err(|e| DecodeError::MessagePack {
        path: e.path().to_string(),
        message: e.into_inner().to_string(),
    })
}

/// Encodes `value` as compact JSON (pixels as base64).
///
/// # Errors
/// Only for values with non-string map keys, which no contract type has.
pub fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<String, serde_json::Error> {
    serde_json::to_string(value)
}

/// Decodes JSON into `T`.
///
/// # Errors
/// [`DecodeError::Json`] naming the field that did not fit.
pub fn from_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| DecodeError::Json {
        path: e.path().to_string(),
        message: e.into_inner().to_string(),
    })?;
    de.end().map_err(|e| DecodeError::Json {
        path: ".".into(),
        message: e.to_string(),
    })?;
    Ok(value)
}
