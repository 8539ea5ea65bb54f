//! ETSI GS QKD 014 V1.1.1 data formats (clause 6) and the messages the standard fixes.
//!
//! Requests are parsed strictly: wrong types are refused with 400, and so are unknown fields,
//! except at the top level of a key request (see `KeyRequest`). The
//! values are then validated against the link's limits by the domain (`KeyCount`,
//! `KeySizeBits` in `kme_actors::types`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use uuid::Uuid;

/// Clause 6.4 / table 5: unknown or already retrieved keys.
pub const KEYS_NOT_FOUND: &str = "one or more keys specified are not found on KME";
/// Clause 6.2, `extension_mandatory`.
pub const EXTENSION_UNSUPPORTED: &str = "not all extension_mandatory parameters are supported";

/// Clause 6.2, `extension_mandatory`: supported but not satisfiable.
pub const EXTENSION_UNSATISFIED: &str = "not all extension_mandatory request options could be met";

/// Status (clause 6.1).
#[derive(Debug, Serialize, Deserialize)]
#[allow(non_snake_case)]
pub struct Status {
    pub source_KME_ID: String,
    pub target_KME_ID: String,
    pub master_SAE_ID: String,
    pub slave_SAE_ID: String,
    pub key_size: u32,
    pub stored_key_count: u64,
    pub max_key_count: u64,
    pub max_key_per_request: u32,
    pub max_key_size: u32,
    pub min_key_size: u32,
    pub max_SAE_ID_count: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_extension: Option<serde_json::Value>,
}

/// Key request (clause 6.2): every item optional. Deployed clients send fields the standard
/// does not name: `additional_target_sae_ids` is taken as `additional_slave_SAE_IDs`; other
/// unknown top-level fields are kept in `unknown` (logged, then ignored). Known fields are
/// typed strictly.
#[derive(Debug, Default, Deserialize)]
#[allow(non_snake_case)]
pub struct KeyRequest {
    pub number: Option<i64>,
    pub size: Option<i64>,
    pub additional_slave_SAE_IDs: Option<Vec<String>>,
    pub additional_target_sae_ids: Option<Vec<String>>,
    pub extension_mandatory: Option<Vec<HashMap<String, serde_json::Value>>>,
    pub extension_optional: Option<Vec<HashMap<String, serde_json::Value>>>,
    #[serde(flatten)]
    pub unknown: HashMap<String, serde_json::Value>,
}

impl KeyRequest {
    /// The additional slaves, under either name (both at once is a 400).
    pub fn additional_slaves(&mut self) -> Result<Vec<String>, &'static str> {
        match (
            self.additional_slave_SAE_IDs.take(),
            self.additional_target_sae_ids.take(),
        ) {
            (Some(_), Some(_)) => Err(
                "additional_slave_SAE_IDs and additional_target_sae_ids name the same list; send one",
            ),
            (Some(ids), None) | (None, Some(ids)) => Ok(ids),
            (None, None) => Ok(Vec::new()),
        }
    }
}

/// Query of GET enc_keys: only `number` and `size`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyQuery {
    pub number: Option<i64>,
    pub size: Option<i64>,
}

/// Key container (clause 6.3). Keys borrow from the JSON they are read from (clients such as
/// the load generator parse thousands per second); a server answer owns them.
#[derive(Debug, Serialize, Deserialize)]
pub struct KeyContainer<'a> {
    #[serde(borrow)]
    pub keys: Vec<KeyEntry<'a>>,
}

#[derive(Debug, Serialize, Deserialize)]
#[allow(non_snake_case)]
pub struct KeyEntry<'a> {
    pub key_ID: Uuid,
    /// Standard base64.
    #[serde(borrow)]
    pub key: Cow<'a, str>,
}

/// Key IDs (clause 6.4).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(non_snake_case)]
pub struct KeyIds {
    pub key_IDs: Vec<Object<KeyIdEntry>>,
    pub key_IDs_extension: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(non_snake_case)]
pub struct KeyIdEntry {
    pub key_ID: String,
    pub key_ID_extension: Option<serde_json::Value>,
}

/// A `T` from a JSON object only. serde's derive also builds a struct from an array of its
/// field values in order, which the objects of clause 6 do not allow.
#[derive(Debug, Default)]
pub struct Object<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }
        deserializer
            .deserialize_map(ObjectVisitor(PhantomData))
            .map(Object)
    }
}

/// Error (clause 6.5).
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub message: String,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub details: Vec<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_objects_never_arrays() {
        let parse = |json: &str| serde_json::from_str::<Object<KeyRequest>>(json);
        assert_eq!(parse(r#"{"number": 2}"#).unwrap().0.number, Some(2));
        assert!(parse("[1, 64, null, null, null]").is_err());
        let ids = |json: &str| serde_json::from_str::<Object<KeyIds>>(json);
        let id = "01a209a8-429e-720d-a9eb-01ac1ce776f9";
        let ok = ids(&format!(r#"{{"key_IDs": [{{"key_ID": "{id}"}}]}}"#)).unwrap();
        assert_eq!(ok.0.key_IDs[0].0.key_ID, id);
        assert!(ids(&format!(r#"{{"key_IDs": [["{id}", null]]}}"#)).is_err());
        assert!(ids(&format!(r#"[[{{"key_ID": "{id}"}}], null]"#)).is_err());
    }

    #[test]
    fn request_parsing_is_strict() {
        assert!(serde_json::from_str::<KeyRequest>(r#"{"number": "3"}"#).is_err());
        assert!(serde_json::from_str::<KeyRequest>(r#"{"number": 1.5}"#).is_err());
        assert!(serde_json::from_str::<KeyRequest>(r#"{"number": -1.0}"#).is_err());
        let ok: KeyRequest = serde_json::from_str(r#"{"number": 2, "size": 512}"#).unwrap();
        assert_eq!((ok.number, ok.size), (Some(2), Some(512)));
        // Unknown top-level fields are set aside; the alias of the additional slaves is taken.
        let mut other: KeyRequest = serde_json::from_str(
            r#"{"number": 1, "vendor_hint": {"x": 1}, "additional_target_sae_ids": ["sae-c"]}"#,
        )
        .unwrap();
        assert_eq!(other.unknown.keys().collect::<Vec<_>>(), ["vendor_hint"]);
        assert_eq!(other.additional_slaves().unwrap(), ["sae-c"]);
        let mut both: KeyRequest = serde_json::from_str(
            r#"{"additional_slave_SAE_IDs": ["a"], "additional_target_sae_ids": ["b"]}"#,
        )
        .unwrap();
        assert!(both.additional_slaves().is_err());
    }
}
