//! Control characters in text that came from a peer (names, reasons, destination hosts, error
//! messages): one escaping rule for every log line and every terminal table.
//!
//! A peer-supplied string must never reach an operator's terminal or a log file raw: an ESC
//! sequence can clear the screen or set the window title, a newline forges a log line, a NUL
//! truncates it in some tools, and a bidi override makes text read backwards. [`escaped`] writes
//! such characters as Rust-style escapes (`\n`, `\u{1b}`, `\u{202e}`) and passes everything
//! else through, so ordinary names and messages read unchanged.
//!
//! The gateway's and the agent's log formatter ([`log_fields`]) apply it to every field of
//! every event, so a call site cannot forget it; `sallyport status` and `check` apply it to
//! everything they print from the admin API or the gateway. This module never validates
//! (protocol edges do: `config::check_name`, the outbound host check): it only makes text safe
//! to show.

use std::fmt::{self, Write};

/// Whether `c` must not be shown raw: C0 and C1 controls, DEL, and the Unicode format
/// characters that reorder or hide text (bidi embeddings, overrides and isolates, zero-width
/// marks, the BOM).
pub fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

/// Writes through to `inner`, escaping every [`is_unsafe`] character.
pub struct EscapingWriter<W>(pub W);

impl<W: Write> Write for EscapingWriter<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(at) = rest.find(is_unsafe) {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().expect("found a char here");
            write_escape(&mut self.0, c)?;
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

fn write_escape<W: Write>(out: &mut W, c: char) -> fmt::Result {
    match c {
        '\n' => out.write_str("\\n"),
        '\r' => out.write_str("\\r"),
        '\t' => out.write_str("\\t"),
        '\0' => out.write_str("\\0"),
        c => write!(out, "\\u{{{:x}}}", c as u32),
    }
}

/// Shows `value` (any `Display`) with its unsafe characters escaped.
pub fn escaped<T: fmt::Display>(value: T) -> Escaped<T> {
    Escaped(value)
}

/// See [`escaped`].
pub struct Escaped<T>(T);

impl<T: fmt::Display> fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(EscapingWriter(f), "{}", self.0)
    }
}

/// `escaped(s).to_string()`.
pub fn escape(s: &str) -> String {
    escaped(s).to_string()
}

/// The log formatter's field writer: like tracing-subscriber's default (the message bare, other
/// fields as `name=value`, space separated), with every value escaped. A log line therefore
/// ends only where the daemon ends it, whatever a peer put in a name, a reason or a host.
pub fn log_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + Send + Sync + 'static
{
    use tracing_subscriber::field::MakeExt;
    tracing_subscriber::fmt::format::debug_fn(|writer, field, value| {
        let mut out = EscapingWriter(writer);
        if field.name() == "message" {
            write!(out, "{value:?}")
        } else {
            write!(out, "{}={value:?}", field.name())
        }
    })
    .delimited(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped_and_the_rest_passes() {
        assert_eq!(escape("acme-mft_1.x"), "acme-mft_1.x");
        assert_eq!(escape("grüße, 東京"), "grüße, 東京");
        assert_eq!(
            escape("a\x1b]0;pwned\x07\nFORGED\r\t\0"),
            "a\\u{1b}]0;pwned\\u{7}\\nFORGED\\r\\t\\0"
        );
        assert_eq!(escape("\u{202e}txt.exe\u{85}"), "\\u{202e}txt.exe\\u{85}");
        assert_eq!(escape("\x7f"), "\\u{7f}");
        assert_eq!(
            format!("[{}]", escaped(format_args!("x{}y", '\n'))),
            "[x\\ny]"
        );
    }

    proptest::proptest! {
        /// Whatever a peer sends, the escaped text has no unsafe character left, and text
        /// without one passes unchanged.
        #[test]
        fn escaped_text_is_always_safe(s in ".*") {
            let out = escape(&s);
            proptest::prop_assert!(!out.chars().any(is_unsafe), "{:?}", out);
            if !s.chars().any(is_unsafe) {
                proptest::prop_assert_eq!(out, s);
            }
        }

        /// A destination host the edge accepts never carries an unsafe character, a space or
        /// anything a URL or a log could misread.
        #[test]
        fn accepted_destinations_are_plain(s in "\\PC{0,40}|[a-z0-9.:_-]{0,20}|[\\x00-\\x7f]{0,20}") {
            if crate::egress::check_destination(&s).is_ok() {
                proptest::prop_assert!(
                    s.chars().all(|c| c.is_ascii_alphanumeric() || ".-_:".contains(c)),
                    "{:?}", s
                );
            }
        }
    }
}
