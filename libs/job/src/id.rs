//! Job identifiers.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest job id accepted from a producer.
pub const MAX_JOB_ID_LEN: usize = 64;

/// Identifies one submitted job.
///
/// The gateway mints UUIDv7 ids: time-ordered (so logs and directories sort by submission) and
/// with 74 random bits, so ids from any number of gateways and restarts never collide without
/// coordination. Other producers may bring their own id; it only has to be 1 to 64 characters
/// of `[A-Za-z0-9_-]`, because it appears in file attributes and log lines.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(String);

/// Longest `Idempotency-Key` accepted.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// The UUIDv5 namespace of job ids derived from idempotency keys (a fixed random UUID).
const IDEMPOTENCY_NAMESPACE: uuid::Uuid = uuid::uuid!("6f1d2c8e-3b7a-4c55-9a0e-2d4b8f1e7c31");

/// A string that cannot be an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters (a UUID is a good key)"
)]
pub struct InvalidIdempotencyKey;

/// A string that cannot be a job id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("job id must be 1 to {MAX_JOB_ID_LEN} characters of A-Z, a-z, 0-9, '-' or '_'")]
pub struct InvalidJobId;

impl JobId {
    /// A fresh UUIDv7 id.
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }

    /// The id of the job submitted with `Idempotency-Key: key`: the same on every gateway
    /// and across restarts, so a retry with the key names the same job. A UUIDv5 in Luna
    /// Saver's own namespace, so it never equals a minted UUIDv7.
    ///
    /// # Errors
    /// [`InvalidIdempotencyKey`] unless `key` is 1 to [`MAX_IDEMPOTENCY_KEY_LEN`] visible
    /// ASCII characters.
    pub fn for_idempotency_key(key: &str) -> Result<Self, InvalidIdempotencyKey> {
        let valid = !key.is_empty()
            && key.len() <= MAX_IDEMPOTENCY_KEY_LEN
            && key.bytes().all(|b| b.is_ascii_graphic());
        if !valid {
            return Err(InvalidIdempotencyKey);
        }
        Ok(Self(
            uuid::Uuid::new_v5(&IDEMPOTENCY_NAMESPACE, key.as_bytes()).to_string(),
        ))
    }

    /// Accepts an id from a producer.
    ///
    /// # Errors
    /// [`InvalidJobId`] when `s` is empty, too long or has other characters.
    pub fn parse(s: &str) -> Result<Self, InvalidJobId> {
        let valid = !s.is_empty()
            && s.len() <= MAX_JOB_ID_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if valid {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidJobId)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({})", self.0)
    }
}

impl std::str::FromStr for JobId {
    type Err = InvalidJobId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

// Always a string, in MessagePack too: `uuid`'s own impl would send 16 raw bytes there, which
// every other producer would have to imitate.
impl Serialize for JobId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for JobId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_are_unique_uuid_v7() {
        let a = JobId::new();
        let b = JobId::new();
        assert_ne!(a, b);
        let parsed = uuid::Uuid::parse_str(a.as_str()).expect("a uuid");
        assert_eq!(parsed.get_version_num(), 7);
        assert!(a < b, "v7 ids sort by creation time");
    }

    #[test]
    fn parse_rejects_unsafe_ids() {
        assert!(JobId::parse("job-1_A").is_ok());
        let key = "0b6f9a52-5f0e-4a8e-9a51-2f1c3d4e5f60";
        let a = JobId::for_idempotency_key(key).expect("key");
        assert_eq!(a, JobId::for_idempotency_key(key).expect("key"));
        assert_ne!(a, JobId::for_idempotency_key("another").expect("key"));
        assert!(JobId::parse(a.as_str()).is_ok());
        for bad in ["", "has space", "tab\t", "é", &"k".repeat(256)] {
            assert!(JobId::for_idempotency_key(bad).is_err(), "{bad:?}");
        }
        for bad in ["", "../x", "a b", "a/b", &"x".repeat(65)] {
            assert!(JobId::parse(bad).is_err(), "{bad:?} must be rejected");
        }
    }
}
