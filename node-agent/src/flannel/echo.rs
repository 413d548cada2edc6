//! Bounded quoting of untrusted text in error messages.
//!
//! Everything these parsers read comes from etcd or a file any other node or tool may have
//! written, so an error that quoted its input whole could be as long as the input (an etcd
//! value may be 1.5 MiB) and would end up, whole, in a log line each time it is read. Errors
//! therefore quote what they were given through [`Echo`], which keeps the start of the text
//! (enough to recognise it) and says how long the whole was.

use std::fmt;

/// Most bytes of escaped text an [`Echo`] keeps between its quotes.
pub const MAX_ECHO: usize = 100;

/// Upper bound, in bytes, on the `Display` text of any error these parsers return, including
/// the `Display` of every error in its `source()` chain. The fuzz targets check it on every
/// input; each error quotes at most two [`Echo`]s (at most ~140 bytes each) next to fixed text.
pub const MAX_ERROR_TEXT: usize = 512;

/// Untrusted text as an error shows it: quoted and escaped like `{:?}` does, and cut to
/// [`MAX_ECHO`] bytes of escaped text with the original length appended when longer, e.g.
/// `"10.244.5.0-24"` or `"aaaa…" (1048576 bytes)`.
#[derive(Clone, PartialEq, Eq)]
pub struct Echo(String);

impl Echo {
    pub fn new(text: &str) -> Self {
        let mut shown = String::with_capacity(MAX_ECHO.min(text.len()) + 2);
        shown.push('"');
        let mut cut = false;
        for c in text.chars() {
            let before = shown.len();
            // `{:?}` on a str leaves single quotes alone; `char::escape_debug` would not.
            if c == '\'' {
                shown.push(c);
            } else {
                shown.extend(c.escape_debug());
            }
            if shown.len() - 1 > MAX_ECHO {
                shown.truncate(before);
                cut = true;
                break;
            }
        }
        shown.push('"');
        if cut {
            // After the closing quote, so the "…" cannot be mistaken for part of the text.
            shown.push_str(&format!("… ({} bytes)", text.len()));
        }
        Self(shown)
    }

    /// The text as shown, quotes included.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Echo {
    fn from(text: &str) -> Self {
        Self::new(text)
    }
}

impl fmt::Display for Echo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The same as `Display`, so `{:?}` on an error shows the bounded text too.
impl fmt::Debug for Echo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An error's `Display` followed by that of each error in its `source()` chain, joined by
/// ": ", as a log line built from the error would show it.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// For the unit tests and the fuzz targets: `error`'s whole text ([`error_chain`]), after
/// panicking if it is longer than [`MAX_ERROR_TEXT`] (the panic shows its first 600 characters).
pub fn assert_bounded(error: &dyn std::error::Error) -> String {
    let text = error_chain(error);
    assert!(
        text.len() <= MAX_ERROR_TEXT,
        "{} bytes: {}",
        text.len(),
        text.chars().take(600).collect::<String>()
    );
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_quoted_like_debug() {
        for text in ["", "10.244.5.0-24", "a\"b\\c\n\u{7f}", "it's", "ü"] {
            assert_eq!(Echo::new(text).as_str(), format!("{text:?}"), "{text}");
        }
    }

    #[test]
    fn long_text_is_cut_and_its_length_given() {
        let text = "x".repeat(1 << 20);
        let echo = Echo::new(&text).to_string();
        assert_eq!(
            echo,
            format!("\"{}\"… (1048576 bytes)", "x".repeat(MAX_ECHO))
        );
        // Exactly the limit is not cut.
        let text = "y".repeat(MAX_ECHO);
        assert_eq!(Echo::new(&text).to_string(), format!("{text:?}"));
    }

    #[test]
    fn escapes_count_towards_the_limit_and_are_never_split() {
        // Each NUL escapes to `\0` (2 bytes): 50 fit, the 51st would not.
        let text = "\0".repeat(1000);
        let echo = Echo::new(&text).to_string();
        assert_eq!(echo, format!("\"{}\"… (1000 bytes)", "\\0".repeat(50)));
        // A 10-byte escape (`\u{10ffff}`) that does not fit is dropped whole.
        let text = format!("{}\u{10ffff}", "z".repeat(95));
        let echo = Echo::new(&text).to_string();
        assert_eq!(echo, format!("\"{}\"… (99 bytes)", "z".repeat(95)));
        // Worst case in bytes: quotes, MAX_ECHO, the ellipsis and a 20-digit length.
        assert!(echo.len() <= MAX_ECHO + 2 + "… ( bytes)".len() + 20);
    }

    #[test]
    fn chain_joins_sources() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&e), "outer: inner");
    }
}
