//! SOCKS5 (RFC 1928), `CONNECT` only, no authentication: the client names the destination
//! (a name is resolved by the proxy, never by the client) and the proxy decides as for HTTP.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The protocol version byte, the first byte a SOCKS5 client sends.
pub(crate) const VERSION: u8 = 5;

/// Why a handshake ended without a destination; `code` is the reply to send, if one is due.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) code: Option<u8>,
    pub(crate) reason: String,
}

fn refusal(code: Option<u8>, reason: &str) -> Refusal {
    Refusal {
        code,
        reason: reason.to_owned(),
    }
}

/// A reply with status `code` (0 = succeeded); the bound address is not meaningful here.
pub(crate) fn reply(code: u8) -> Vec<u8> {
    vec![VERSION, code, 0, 1, 0, 0, 0, 0, 0, 0]
}

/// Reads the rest of a handshake whose version byte was read already; answers the method
/// negotiation, and returns the requested destination.
pub(crate) async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut S,
) -> Result<(String, u16), Refusal> {
    let io = |_| refusal(None, "the client went away");
    let n = conn.read_u8().await.map_err(io)?;
    let mut methods = vec![0u8; usize::from(n)];
    conn.read_exact(&mut methods).await.map_err(io)?;
    if !methods.contains(&0) {
        // No acceptable method: the client only offers authentication we do not ask for.
        let _ = conn.write_all(&[VERSION, 0xff]).await;
        return Err(refusal(None, "no acceptable authentication method"));
    }
    conn.write_all(&[VERSION, 0]).await.map_err(io)?;
    let mut head = [0u8; 4];
    conn.read_exact(&mut head).await.map_err(io)?;
    let [ver, cmd, _, atyp] = head;
    if ver != VERSION {
        return Err(refusal(Some(1), "bad version in the request"));
    }
    let host = match atyp {
        1 => {
            let mut a = [0u8; 4];
            conn.read_exact(&mut a).await.map_err(io)?;
            std::net::Ipv4Addr::from(a).to_string()
        }
        3 => {
            let len = conn.read_u8().await.map_err(io)?;
            let mut name = vec![0u8; usize::from(len)];
            conn.read_exact(&mut name).await.map_err(io)?;
            String::from_utf8(name).map_err(|_| refusal(Some(1), "a name that is not UTF-8"))?
        }
        4 => {
            let mut a = [0u8; 16];
            conn.read_exact(&mut a).await.map_err(io)?;
            std::net::Ipv6Addr::from(a).to_string()
        }
        _ => return Err(refusal(Some(8), "unknown address type")),
    };
    let port = conn.read_u16().await.map_err(io)?;
    if cmd != 1 {
        // BIND and UDP ASSOCIATE: no inbound connections, no UDP out.
        return Err(refusal(Some(7), "only CONNECT is supported"));
    }
    if port == 0 || host.is_empty() {
        return Err(refusal(Some(1), "no destination"));
    }
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(input: &[u8]) -> (Result<(String, u16), String>, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(input).await.unwrap();
        drop(client.shutdown().await);
        let r = handshake(&mut server).await.map_err(|r| r.reason);
        drop(server);
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        (r, out)
    }

    #[tokio::test]
    async fn parses_names_and_addresses() {
        let mut req = vec![1, 0, 5, 1, 0, 3, 8];
        req.extend_from_slice(b"pypi.org");
        req.extend_from_slice(&443u16.to_be_bytes());
        let (r, out) = run(&req).await;
        assert_eq!(r, Ok(("pypi.org".into(), 443)));
        assert_eq!(out, [5, 0]);
        let (r, _) = run(&[1, 0, 5, 1, 0, 1, 10, 0, 0, 1, 0, 80]).await;
        assert_eq!(r, Ok(("10.0.0.1".into(), 80)));
        let mut v6 = vec![1, 0, 5, 1, 0, 4];
        v6.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&[0, 22]);
        assert_eq!(run(&v6).await.0, Ok(("::1".into(), 22)));
    }

    #[tokio::test]
    async fn refuses_what_it_does_not_do() {
        // Username/password only.
        let (r, out) = run(&[1, 2]).await;
        assert!(r.is_err());
        assert_eq!(out, [5, 0xff]);
        // UDP ASSOCIATE.
        let (r, _) = run(&[1, 0, 5, 3, 0, 1, 0, 0, 0, 0, 0, 0]).await;
        assert_eq!(r, Err("only CONNECT is supported".into()));
        // Truncated.
        assert!(run(&[1, 0, 5, 1, 0, 3, 8, b'p']).await.0.is_err());
        // Unknown address type.
        assert!(run(&[1, 0, 5, 1, 0, 9]).await.0.is_err());
    }
}
