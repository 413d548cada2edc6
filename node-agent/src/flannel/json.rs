//! JSON object lookup with Go `encoding/json` semantics, shared by the config and lease parsers.

use serde_json::{Map, Value};

/// Looks `name` up in `obj` ignoring ASCII case, because flannel decodes its JSON with Go's
/// `encoding/json`, which matches keys to struct fields case-insensitively (so `network` and
/// `Network` are the same field). A JSON `null` leaves a Go field at its zero value, so it is
/// reported as absent.
///
/// Returns `Err` with the conflicting spellings (e.g. `"Network", "network"`) when several keys
/// match: Go lets the last one in document order win, but `serde_json`'s map does not keep
/// document order, so refusing is the only way not to silently pick a different value.
pub(crate) fn get_ci<'a>(
    obj: &'a Map<String, Value>,
    name: &str,
) -> Result<Option<&'a Value>, String> {
    let mut matches = obj.iter().filter(|(key, _)| key.eq_ignore_ascii_case(name));
    let Some((first_key, value)) = matches.next() else {
        return Ok(None);
    };
    let others: Vec<&String> = matches.map(|(key, _)| key).collect();
    if !others.is_empty() {
        let spellings: Vec<String> = std::iter::once(first_key)
            .chain(others)
            .map(|key| format!("{key:?}"))
            .collect();
        return Err(spellings.join(", "));
    }
    Ok((!value.is_null()).then_some(value))
}

/// Integer value of a JSON number, wide enough for any `i64` or `u64`; `None` for fractions
/// and non-numbers (Go refuses to decode `24.0` into an `int` field too).
pub(crate) fn as_integer(value: &Value) -> Option<i128> {
    value
        .as_i64()
        .map(i128::from)
        .or_else(|| value.as_u64().map(i128::from))
}
