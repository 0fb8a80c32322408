//! Connections on the API's unix socket, made acceptable to the HTTP/2 stack.
//!
//! gRPC C-core clients (the Python SDK among them) send a unix socket's path, percent-encoded,
//! as `:authority` (`var%2Flib%2Fagentfense%2Fagentfense.sock`, grpc/grpc#38142). That is not
//! a valid authority, and `h2` resets every such stream with PROTOCOL_ERROR
//! (hyperium/h2#487), so `endpoint="unix:///path"` would not work. The server knows its own
//! socket's path, hence the exact header value such a client sends: [`UdsConn`] rewrites that
//! value, where it appears as a plain HPACK string literal in the client's HEADERS and
//! CONTINUATION frames, to a same-length valid name (each `%` becomes `-`). Same length keeps
//! the HPACK dynamic tables of both ends in step; Huffman-coded or otherwise different values
//! pass untouched (and get the reset, as before). Nothing else of the stream is changed.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::server::{Connected, UdsConnectInfo};

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
/// Largest frame we buffer to inspect (h2's default SETTINGS_MAX_FRAME_SIZE, which tonic
/// keeps); larger frames pass through unexamined.
const MAX_INSPECT: usize = 16 * 1024;

/// The `:authority` values gRPC clients derive from `path` (percent-encoded, leading `/`
/// dropped), each as an HPACK plain string literal (length prefix + bytes), with its fix.
#[derive(Debug, Clone, Default)]
pub struct AuthorityFix {
    patterns: Vec<(Vec<u8>, Vec<u8>)>,
}

fn hpack_string(s: &[u8]) -> Vec<u8> {
    // H = 0, then the length as an HPACK integer with a 7-bit prefix (RFC 7541 5.1).
    let mut out = Vec::with_capacity(s.len() + 4);
    let mut n = s.len();
    if n < 127 {
        out.push(n as u8);
    } else {
        out.push(127);
        n -= 127;
        while n >= 128 {
            out.push((n % 128) as u8 | 0x80);
            n /= 128;
        }
        out.push(n as u8);
    }
    out.extend_from_slice(s);
    out
}

fn percent_encode(s: &str, keep: impl Fn(u8) -> bool) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for b in s.bytes() {
        if keep(b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

impl AuthorityFix {
    /// The fix for a socket at `path`.
    pub fn for_socket(path: &std::path::Path) -> AuthorityFix {
        let Some(p) = path.to_str() else {
            return AuthorityFix::default();
        };
        let p = p.trim_start_matches('/');
        let unreserved = |b: u8| b.is_ascii_alphanumeric() || b"-._~".contains(&b);
        let sub_delims = |b: u8| unreserved(b) || b"!$&'()*+,;=:@".contains(&b);
        let mut patterns = Vec::new();
        for encoded in [percent_encode(p, unreserved), percent_encode(p, sub_delims)] {
            if !encoded.contains('%') {
                continue; // already a valid name: nothing to fix
            }
            let fixed: String = encoded
                .chars()
                .map(|c| if unreserved(c as u8) { c } else { '-' })
                .collect();
            let pat = (
                hpack_string(encoded.as_bytes()),
                hpack_string(fixed.as_bytes()),
            );
            if !patterns.contains(&pat) {
                patterns.push(pat);
            }
        }
        AuthorityFix { patterns }
    }

    /// Rewrites the authority literals in one header-block fragment.
    fn apply(&self, block: &mut [u8]) {
        for (from, to) in &self.patterns {
            let mut i = 0;
            while i + from.len() <= block.len() {
                if block[i..i + from.len()] == from[..] {
                    block[i..i + from.len()].copy_from_slice(to);
                    i += from.len();
                } else {
                    i += 1;
                }
            }
        }
    }
}

/// A unix-socket connection whose client frames pass through [`AuthorityFix`].
#[derive(Debug)]
pub struct UdsConn {
    io: UnixStream,
    fix: Arc<AuthorityFix>,
    info: UdsConnectInfo,
    /// Bytes of the preface still to pass.
    preface_left: usize,
    /// Read from the socket, not yet handed on.
    inbuf: Vec<u8>,
    /// Ready to hand on.
    out: Vec<u8>,
    out_pos: usize,
    /// Payload bytes of an oversized frame still to pass through unexamined.
    passthrough: usize,
    eof: bool,
}

impl UdsConn {
    /// Wraps an accepted connection.
    pub fn new(io: UnixStream, fix: Arc<AuthorityFix>) -> UdsConn {
        let info = io.connect_info();
        UdsConn {
            io,
            fix,
            info,
            preface_left: PREFACE.len(),
            inbuf: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            passthrough: 0,
            eof: false,
        }
    }

    /// Moves what can be handed on from `inbuf` to `out`.
    fn process(&mut self) {
        loop {
            if self.inbuf.is_empty() {
                return;
            }
            if self.preface_left > 0 || self.passthrough > 0 {
                let n = if self.preface_left > 0 {
                    self.preface_left
                } else {
                    self.passthrough
                }
                .min(self.inbuf.len());
                self.out.extend(self.inbuf.drain(..n));
                if self.preface_left > 0 {
                    self.preface_left -= n;
                } else {
                    self.passthrough -= n;
                }
                continue;
            }
            if self.inbuf.len() < 9 {
                return;
            }
            let len = usize::from(self.inbuf[0]) << 16
                | usize::from(self.inbuf[1]) << 8
                | usize::from(self.inbuf[2]);
            let kind = self.inbuf[3];
            let inspect = (kind == HEADERS || kind == CONTINUATION) && len <= MAX_INSPECT;
            if !inspect {
                self.out.extend(self.inbuf.drain(..9));
                self.passthrough = len;
                continue;
            }
            if self.inbuf.len() < 9 + len {
                return;
            }
            let mut frame: Vec<u8> = self.inbuf.drain(..9 + len).collect();
            // Padding and priority fields hold no string literal that could match a whole
            // pattern wrongly: the pattern starts with its own length prefix.
            self.fix.apply(&mut frame[9..]);
            self.out.extend_from_slice(&frame);
        }
    }
}

impl AsyncRead for UdsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let n = (this.out.len() - this.out_pos).min(buf.remaining());
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // A partial frame at EOF is handed on as it is: the peer is gone anyway.
                if !this.inbuf.is_empty() {
                    this.out.append(&mut this.inbuf);
                    continue;
                }
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.io).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let got = rb.filled();
                    if got.is_empty() {
                        this.eof = true;
                    } else {
                        this.inbuf.extend_from_slice(got);
                        this.process();
                    }
                }
            }
        }
    }
}

impl AsyncWrite for UdsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl Connected for UdsConn {
    type ConnectInfo = UdsConnectInfo;
    fn connect_info(&self) -> UdsConnectInfo {
        self.info.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let n = payload.len();
        let mut f = vec![
            (n >> 16) as u8,
            (n >> 8) as u8,
            n as u8,
            kind,
            0x4,
            0,
            0,
            0,
            1,
        ];
        f.extend_from_slice(payload);
        f
    }

    /// Feeds `input` in chunks of `step` bytes through the rewriter.
    fn run(fix: &AuthorityFix, input: &[u8], step: usize) -> Vec<u8> {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut c = UdsConn::new(UnixStream::from_std(a).unwrap(), Arc::new(fix.clone()));
            let mut out = Vec::new();
            for chunk in input.chunks(step) {
                c.inbuf.extend_from_slice(chunk);
                c.process();
                out.append(&mut c.out);
            }
            out
        })
    }

    #[test]
    fn the_socket_path_authority_is_rewritten_in_place_and_nothing_else() {
        let fix =
            AuthorityFix::for_socket(std::path::Path::new("/var/lib/agentfense/agentfense.sock"));
        let authority = b"var%2Flib%2Fagentfense%2Fagentfense.sock";
        // Literal with incremental indexing, indexed name :authority (index 1).
        let mut block = vec![0x41];
        block.extend(hpack_string(authority));
        block.extend_from_slice(b"\x83\x86other%2Fstuff");
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, b"\x00\x00")); // SETTINGS, untouched
        input.extend(frame(HEADERS, &block));
        input.extend(frame(0x0, &hpack_string(authority))); // DATA: never rewritten
        for step in [1, 3, 7, 64, 4096] {
            let out = run(&fix, &input, step);
            assert_eq!(out.len(), input.len());
            let text = String::from_utf8_lossy(&out);
            assert!(
                text.contains("var-2Flib-2Fagentfense-2Fagentfense.sock"),
                "{step}"
            );
            assert!(text.contains("other%2Fstuff"), "unrelated bytes changed");
            assert_eq!(text.matches("var%2Flib").count(), 1, "DATA changed");
        }
    }

    #[test]
    fn paths_without_escapes_and_long_names() {
        assert!(
            AuthorityFix::for_socket(std::path::Path::new("/sock"))
                .patterns
                .is_empty()
        );
        let long = format!("/{}/s.sock", "d".repeat(150));
        let fix = AuthorityFix::for_socket(std::path::Path::new(&long));
        assert_eq!(fix.patterns.len(), 1);
        let (from, to) = &fix.patterns[0];
        assert_eq!(from.len(), to.len());
        assert_eq!(from[0], 127, "multi-byte length prefix");
    }
}
