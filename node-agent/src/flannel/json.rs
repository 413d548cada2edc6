//! JSON object lookup with Go `encoding/json` semantics, shared by the config and lease parsers.

use serde_json::{Map, Value};
use thiserror::Error;

use super::echo::Echo;

/// Spellings an [`FieldError::AmbiguousKey`] lists before counting the rest.
const MAX_SPELLINGS: usize = 4;

/// A field that is present but unusable. `field` is the documented, dotted name (e.g.
/// `Backend.VNI`), so the message points at the right place whatever spelling the JSON used.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum FieldError {
    #[error("{field}: key given more than once with different case ({spellings})")]
    AmbiguousKey {
        field: &'static str,
        spellings: String,
    },
    #[error("{field}: expected {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
}

/// Looks `name` up in `obj` ignoring ASCII case, because flannel decodes its JSON with Go's
/// `encoding/json`, which matches keys to struct fields case-insensitively (so `network` and
/// `Network` are the same field). A JSON `null` leaves a Go field at its zero value, so it is
/// reported as absent.
///
/// Fails with [`FieldError::AmbiguousKey`], listing the conflicting spellings (e.g.
/// `"Network", "network"`), when several keys match: Go lets the last one in document order
/// win, but `serde_json`'s map does not keep document order, so refusing is the only way not to
/// silently pick a different value.
pub(crate) fn field<'a>(
    obj: &'a Map<String, Value>,
    name: &str,
    field: &'static str,
) -> Result<Option<&'a Value>, FieldError> {
    let mut matches = obj.iter().filter(|(key, _)| key.eq_ignore_ascii_case(name));
    let Some((first_key, value)) = matches.next() else {
        return Ok(None);
    };
    let others: Vec<&String> = matches.map(|(key, _)| key).collect();
    if !others.is_empty() {
        let all = std::iter::once(first_key).chain(others.iter().copied());
        // A name of n letters has 2^n spellings: list a few, count the rest, so the message
        // stays bounded (each spelling is as short as `name`, which is one of ours).
        let mut spellings: Vec<String> = all
            .take(MAX_SPELLINGS)
            .map(|key| Echo::new(key).to_string())
            .collect();
        let more = others.len() + 1 - spellings.len();
        if more > 0 {
            spellings.push(format!("and {more} more"));
        }
        return Err(FieldError::AmbiguousKey {
            field,
            spellings: spellings.join(", "),
        });
    }
    Ok((!value.is_null()).then_some(value))
}

/// [`field`] followed by `convert`; a value `convert` rejects is reported as
/// [`FieldError::WrongType`] with `expected`.
fn typed_field<'a, T>(
    obj: &'a Map<String, Value>,
    name: &str,
    field_name: &'static str,
    expected: &'static str,
    convert: impl FnOnce(&'a Value) -> Option<T>,
) -> Result<Option<T>, FieldError> {
    field(obj, name, field_name)?
        .map(|value| {
            convert(value).ok_or(FieldError::WrongType {
                field: field_name,
                expected,
            })
        })
        .transpose()
}

/// A string field.
pub(crate) fn field_str<'a>(
    obj: &'a Map<String, Value>,
    name: &str,
    field: &'static str,
) -> Result<Option<&'a str>, FieldError> {
    typed_field(obj, name, field, "a string", Value::as_str)
}

/// A boolean field.
pub(crate) fn field_bool(
    obj: &Map<String, Value>,
    name: &str,
    field: &'static str,
) -> Result<Option<bool>, FieldError> {
    typed_field(obj, name, field, "true or false", Value::as_bool)
}

/// An integer field of any sign, so that the caller can report out-of-range values (e.g. a
/// negative VNI) with its own, more specific error.
pub(crate) fn field_int(
    obj: &Map<String, Value>,
    name: &str,
    field: &'static str,
) -> Result<Option<i128>, FieldError> {
    typed_field(obj, name, field, "an integer", as_integer)
}

/// A non-negative integer field, for Go `uint` fields, which refuse negative numbers at decode
/// time.
pub(crate) fn field_u64(
    obj: &Map<String, Value>,
    name: &str,
    field: &'static str,
) -> Result<Option<u64>, FieldError> {
    typed_field(obj, name, field, "a non-negative integer", Value::as_u64)
}

/// Integer value of a JSON number, wide enough for any `i64` or `u64`; `None` for fractions
/// and non-numbers (Go refuses to decode `24.0` into an `int` field too).
fn as_integer(value: &Value) -> Option<i128> {
    value
        .as_i64()
        .map(i128::from)
        .or_else(|| value.as_u64().map(i128::from))
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a test should fail loudly on any unexpected error"
)]
mod tests {
    use super::*;
    use crate::flannel::echo::assert_bounded;

    fn object(json: &str) -> Map<String, Value> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn lookup_ignores_case_and_treats_null_as_absent() {
        let obj = object(r#"{"network":"10.0.0.0/8","Other":null}"#);
        assert_eq!(
            field(&obj, "Network", "Network").unwrap(),
            Some(&Value::from("10.0.0.0/8"))
        );
        assert_eq!(field(&obj, "Other", "Other").unwrap(), None);
        assert_eq!(field(&obj, "Missing", "Missing").unwrap(), None);
    }

    #[test]
    fn ambiguous_key_lists_every_spelling() {
        let obj = object(r#"{"Network":"a","network":"b"}"#);
        let e = field(&obj, "Network", "Network").unwrap_err();
        let FieldError::AmbiguousKey { field, spellings } = &e else {
            panic!("{e:?}");
        };
        assert_eq!(*field, "Network");
        // serde_json's map order is not document order, so only check that both are named.
        assert!(spellings.contains(r#""Network""#), "{spellings}");
        assert!(spellings.contains(r#""network""#), "{spellings}");
        assert!(
            e.to_string()
                .starts_with("Network: key given more than once with different case ("),
            "{e}"
        );
    }

    #[test]
    fn ambiguous_key_lists_a_bounded_number_of_spellings() {
        // Every spelling of "Network" with a different case: 2^7 keys.
        let keys: Vec<String> = (0..128u32)
            .map(|bits| {
                "network"
                    .chars()
                    .enumerate()
                    .map(|(i, c)| {
                        if bits & (1 << i) != 0 {
                            c.to_ascii_uppercase()
                        } else {
                            c
                        }
                    })
                    .collect()
            })
            .collect();
        let json = format!(
            "{{{}}}",
            keys.iter()
                .map(|k| format!("{k:?}:1"))
                .collect::<Vec<_>>()
                .join(",")
        );
        let e = field(&object(&json), "Network", "Network").unwrap_err();
        let text = assert_bounded(&e);
        assert!(text.ends_with(", and 124 more)"), "{text}");
    }

    #[test]
    fn typed_fields() {
        let obj = object(r#"{"S":"x","B":true,"I":-3,"U":7,"Big":18446744073709551615,"F":1.5}"#);
        assert_eq!(field_str(&obj, "s", "S").unwrap(), Some("x"));
        assert_eq!(field_bool(&obj, "b", "B").unwrap(), Some(true));
        assert_eq!(field_int(&obj, "i", "I").unwrap(), Some(-3));
        assert_eq!(
            field_int(&obj, "Big", "Big").unwrap(),
            Some(i128::from(u64::MAX))
        );
        assert_eq!(field_u64(&obj, "u", "U").unwrap(), Some(7));

        let wrong = |result: Result<(), FieldError>| result.unwrap_err().to_string();
        assert_eq!(
            wrong(field_str(&obj, "B", "X.B").map(drop)),
            "X.B: expected a string"
        );
        assert_eq!(
            wrong(field_bool(&obj, "S", "S").map(drop)),
            "S: expected true or false"
        );
        assert_eq!(
            wrong(field_int(&obj, "F", "F").map(drop)),
            "F: expected an integer"
        );
        assert_eq!(
            wrong(field_u64(&obj, "I", "I").map(drop)),
            "I: expected a non-negative integer"
        );
    }
}
