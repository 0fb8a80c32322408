//! Names shown on a terminal. A file name is the agent's to choose: one holding escape
//! sequences (`\e[2K\r`) could erase or forge lines of a change list a person reviews before
//! `--apply`. Every name printed for people goes through [`escape`]; `--json` output stays
//! exact (JSON escapes control characters itself).

use std::borrow::Cow;
use std::fmt::Write;

/// `name` with every control character (C0, DEL, C1) written as an escape (`\e`, `\n`,
/// `\x7f`, `\u{9b}`) and backslashes doubled, so what is printed is what is there; other
/// text, Unicode included, is left as it is.
pub fn escape(name: &str) -> Cow<'_, str> {
    if !name.chars().any(|c| c.is_control() || c == '\\') {
        return Cow::Borrowed(name);
    }
    let mut out = String::with_capacity(name.len() + 8);
    for c in name.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\x1b' => out.push_str("\\e"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x80 && c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_cannot_reach_the_terminal() {
        assert_eq!(escape("src/main.py"), "src/main.py");
        assert_eq!(escape("été/日本"), "été/日本");
        assert_eq!(
            escape("output/a\x1b[2K\rFAKE line\x1b[31m"),
            "output/a\\e[2K\\rFAKE line\\e[31m"
        );
        assert_eq!(escape("a\u{9b}31m\x7f\\"), "a\\u{9b}31m\\x7f\\\\");
        assert!(!escape("x\x07\x08\x0b\x0c").chars().any(char::is_control));
    }
}
