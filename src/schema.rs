//! The version of the JSON the commands print or write: every output carries `"schema": 1`,
//! and docs/schemas/ holds one JSON Schema (draft 2020-12) per output (README, "JSON outputs").
//! Removing a field or changing its meaning raises the version; a new field is added to the
//! schema file within the same version.
use serde::Serialize;

/// The value of the `"schema"` field of every JSON output.
pub const SCHEMA_VERSION: u32 = 1;

/// `value`'s fields after `"schema": SCHEMA_VERSION`; `value` must serialise as a map (a
/// struct or a map, not a list).
#[derive(Serialize)]
pub struct Versioned<'a, T: Serialize + ?Sized> {
    schema: u32,
    #[serde(flatten)]
    value: &'a T,
}

/// [`Versioned`] around `value`.
pub fn versioned<T: Serialize + ?Sized>(value: &T) -> Versioned<'_, T> {
    Versioned { schema: SCHEMA_VERSION, value }
}
