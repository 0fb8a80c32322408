//! Output handling: lossy UTF-8 chunking that never splits a character, and capped capture with
//! an explicit truncation marker.

/// Turns a byte stream into valid UTF-8 chunks. Invalid sequences become U+FFFD; an incomplete
/// multi-byte sequence at the end of a chunk is held back until the next one.
#[derive(Debug, Default)]
pub struct Utf8Chunker {
    pending: Vec<u8>,
}

impl Utf8Chunker {
    /// Feeds bytes; returns the text that is complete so far (possibly empty).
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let keep = incomplete_tail(&self.pending);
        let split = self.pending.len() - keep;
        let text = String::from_utf8_lossy(&self.pending[..split]).into_owned();
        self.pending.drain(..split);
        text
    }

    /// End of stream: whatever is held back, converted lossily.
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

/// Length of a trailing, possibly valid but incomplete UTF-8 sequence (0..=3 bytes).
fn incomplete_tail(b: &[u8]) -> usize {
    for back in 1..=3.min(b.len()) {
        let c = b[b.len() - back];
        if c & 0b1100_0000 == 0b1000_0000 {
            continue; // continuation byte: look further back
        }
        let need = if c & 0b1110_0000 == 0b1100_0000 {
            2
        } else if c & 0b1111_0000 == 0b1110_0000 {
            3
        } else if c & 0b1111_1000 == 0b1111_0000 {
            4
        } else {
            return 0;
        };
        return if need > back { back } else { 0 };
    }
    0
}

/// Collects text up to `cap` bytes, then counts what it drops.
#[derive(Debug)]
pub struct CappedText {
    cap: usize,
    text: String,
    dropped: usize,
}

impl CappedText {
    /// A collector keeping at most `cap` bytes.
    pub fn new(cap: usize) -> Self {
        CappedText {
            cap,
            text: String::new(),
            dropped: 0,
        }
    }

    /// Appends, cutting at a character boundary once the cap is reached.
    pub fn push(&mut self, s: &str) {
        if self.dropped > 0 {
            self.dropped += s.len();
            return;
        }
        let room = self.cap - self.text.len();
        if s.len() <= room {
            self.text.push_str(s);
            return;
        }
        let mut cut = room;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        self.text.push_str(&s[..cut]);
        self.dropped += s.len() - cut;
    }

    /// Whether anything was dropped.
    pub fn truncated(&self) -> bool {
        self.dropped > 0
    }

    /// The text, with a truncation marker appended when the cap was hit.
    pub fn finish(self) -> (String, bool) {
        if self.dropped == 0 {
            return (self.text, false);
        }
        let mut t = self.text;
        t.push_str(&truncation_marker(self.cap, self.dropped));
        (t, true)
    }
}

/// The marker appended to capped output.
pub fn truncation_marker(cap: usize, dropped: usize) -> String {
    format!("\n[agentfense: output truncated: {dropped} more bytes beyond the {cap}-byte limit]\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn chunker_never_splits_characters() {
        let s = "aé€😀z".as_bytes();
        for split in 0..s.len() {
            let mut c = Utf8Chunker::default();
            let mut out = c.push(&s[..split]);
            out += &c.push(&s[split..]);
            out += &c.finish();
            assert_eq!(out, "aé€😀z", "split at {split}");
        }
    }

    #[test]
    fn chunker_replaces_invalid_bytes() {
        let mut c = Utf8Chunker::default();
        let mut out = c.push(b"a\xffb\xe2\x82");
        out += &c.finish();
        assert_eq!(out, "a\u{fffd}b\u{fffd}");
    }

    #[test]
    fn capped_text_marks_truncation() {
        let mut c = CappedText::new(4);
        c.push("ab");
        c.push("cé");
        c.push("xyz");
        assert!(c.truncated());
        let (t, tr) = c.finish();
        assert!(tr);
        assert_eq!(t, format!("abc{}", truncation_marker(4, 5)));
        let mut c = CappedText::new(10);
        c.push("hello");
        assert_eq!(c.finish(), ("hello".to_owned(), false));
    }
}
