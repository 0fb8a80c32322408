//! The sandbox's DNS server, listening inside its network namespace (`nameserver 127.0.0.1`).
//!
//! It answers A and AAAA queries for names the policy allows (on any port), with the addresses
//! the proxy would connect to, resolved through the proxy's own resolver. Every other query
//! (another name, a random subdomain, TXT, MX, ...) is answered here (NXDOMAIN, or an empty
//! answer for other types of an allowed name) and never leaves the host: a sandbox cannot
//! carry data out in query names.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA};
use hickory_resolver::proto::rr::{DNSClass, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{ConnEvent, Proxy};

/// Queries one sandbox may have in progress at once; more are dropped (clients retry).
const IN_FLIGHT: usize = 64;
/// TCP connections to the DNS server at once.
const TCP_CONNECTIONS: usize = 16;
/// How long a TCP connection may stay without a query.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Most addresses in one answer (keeps it within 512 bytes).
const MAX_ANSWERS: usize = 8;
/// TTL of the answers: short, so that a policy change is seen soon by caching clients.
const TTL: u32 = 30;

impl Proxy {
    /// Serves DNS over UDP on `sock` until the sandbox goes away.
    pub async fn serve_dns_udp(self: Arc<Self>, sock: tokio::net::UdpSocket) {
        let sock = Arc::new(sock);
        let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                continue;
            };
            let (this, sock, query) = (self.clone(), sock.clone(), buf[..n].to_vec());
            tokio::spawn(async move {
                if let Some(reply) = this.answer(&query, true).await {
                    let _ = sock.send_to(&reply, from).await;
                }
                drop(slot);
            });
        }
    }

    /// Serves DNS over TCP on `listener` until the sandbox goes away.
    pub async fn serve_dns_tcp(self: Arc<Self>, listener: tokio::net::TcpListener) {
        let slots = Arc::new(tokio::sync::Semaphore::new(TCP_CONNECTIONS));
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                loop {
                    let mut len = [0u8; 2];
                    if tokio::time::timeout(TCP_IDLE, conn.read_exact(&mut len))
                        .await
                        .map_or(true, |r| r.is_err())
                    {
                        break;
                    }
                    let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if tokio::time::timeout(TCP_IDLE, conn.read_exact(&mut query))
                        .await
                        .map_or(true, |r| r.is_err())
                    {
                        break;
                    }
                    let Some(reply) = this.answer(&query, false).await else {
                        break;
                    };
                    let Ok(n) = u16::try_from(reply.len()) else {
                        break;
                    };
                    let mut out = n.to_be_bytes().to_vec();
                    out.extend_from_slice(&reply);
                    if conn.write_all(&out).await.is_err() {
                        break;
                    }
                }
                drop(slot);
            });
        }
    }

    /// The reply to one query message (`None`: not a message worth answering).
    pub(crate) async fn answer(&self, query: &[u8], udp: bool) -> Option<Vec<u8>> {
        let started = Instant::now();
        let req = match Message::from_vec(query) {
            Ok(m) => m,
            Err(_) => {
                // A header at least: say the message was malformed.
                let id = u16::from_be_bytes([*query.first()?, *query.get(1)?]);
                return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
                    .to_vec()
                    .ok();
            }
        };
        if req.message_type() != MessageType::Query {
            return None;
        }
        let mut reply = Message::new();
        reply
            .set_id(req.id())
            .set_message_type(MessageType::Response)
            .set_op_code(req.op_code())
            .set_recursion_desired(req.recursion_desired())
            .set_recursion_available(true);
        let [q] = req.queries() else {
            reply.set_response_code(ResponseCode::FormErr);
            return reply.to_vec().ok();
        };
        reply.add_query(q.clone());
        if req.op_code() != OpCode::Query || q.query_class() != DNSClass::IN {
            reply.set_response_code(ResponseCode::NotImp);
            return reply.to_vec().ok();
        }
        let name = q.name().to_ascii();
        let name = name.strip_suffix('.').unwrap_or(&name);
        let qtype = q.query_type();
        let policy = self.policy();
        let refuse = |reason: String| ConnEvent {
            protocol: "dns",
            host: name.to_owned(),
            port: 53,
            allowed: false,
            detail: reason,
            bytes_up: 0,
            bytes_down: 0,
            duration: started.elapsed(),
        };
        let Some(normal) = agentfense_core::egress::normalize_name(name)
            .filter(|n| n.parse::<IpAddr>().is_err())
            .filter(|n| policy.allows_name_on_any_port(n).is_some())
        else {
            self.report(refuse(format!(
                "DNS {qtype} query: {name} is not in the allow-list (answered NXDOMAIN here, \
                 never sent upstream)"
            )));
            reply.set_response_code(ResponseCode::NXDomain);
            return reply.to_vec().ok();
        };
        if !matches!(qtype, RecordType::A | RecordType::AAAA) {
            // An allowed name, another type: an empty answer, never asked upstream.
            return reply.to_vec().ok();
        }
        match self.resolve(&normal).await {
            Ok(ips) => {
                let answers: Vec<Record> = ips
                    .into_iter()
                    .map(|ip| ip.to_canonical())
                    .filter(|ip| self.non_public(*ip).is_none())
                    .filter_map(|ip| match (ip, qtype) {
                        (IpAddr::V4(v4), RecordType::A) => Some(RData::A(A(v4))),
                        (IpAddr::V6(v6), RecordType::AAAA) => Some(RData::AAAA(AAAA(v6))),
                        _ => None,
                    })
                    .take(MAX_ANSWERS)
                    .map(|rdata| Record::from_rdata(q.name().clone(), TTL, rdata))
                    .collect();
                reply.add_answers(answers);
            }
            Err(reason) => {
                self.report(refuse(format!("DNS {qtype} query: {reason}")));
                reply.set_response_code(ResponseCode::ServFail);
            }
        }
        let out = reply.to_vec().ok()?;
        if udp && out.len() > 512 {
            reply.take_answers();
            reply.set_truncated(true);
            return reply.to_vec().ok();
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EgressConfig, EgressPolicy};
    use hickory_resolver::proto::op::Query;
    use hickory_resolver::proto::rr::Name;

    fn proxy(events: Arc<std::sync::Mutex<Vec<ConnEvent>>>) -> Arc<Proxy> {
        let policy =
            EgressPolicy::parse("mirror.test:8000, *.pkg.test", &Default::default()).unwrap();
        let cfg = EgressConfig {
            hosts: [
                (
                    "mirror.test".to_owned(),
                    vec!["203.0.113.7".parse().unwrap()],
                ),
                (
                    "a.pkg.test".to_owned(),
                    vec!["10.0.0.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
                ),
            ]
            .into(),
            private_allow: vec![crate::Cidr::new("203.0.113.0".parse().unwrap(), 24).unwrap()],
            ..Default::default()
        };
        Proxy::new(policy, cfg, move |e| events.lock().unwrap().push(e))
    }

    async fn ask(p: &Proxy, name: &str, t: RecordType) -> Message {
        let mut m = Message::new();
        m.set_id(7).set_recursion_desired(true);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        Message::from_vec(&p.answer(&m.to_vec().unwrap(), true).await.unwrap()).unwrap()
    }

    #[tokio::test]
    async fn answers_allowed_names_only_and_locally() {
        let events = Arc::default();
        let p = proxy(Arc::clone(&events));
        let r = ask(&p, "Mirror.Test.", RecordType::A).await;
        assert_eq!((r.id(), r.response_code()), (7, ResponseCode::NoError));
        assert_eq!(r.answers().len(), 1);
        assert_eq!(r.answers()[0].data(), &RData::A(A([203, 0, 113, 7].into())));
        // Another type of an allowed name: empty, and never resolved.
        let r = ask(&p, "mirror.test.", RecordType::TXT).await;
        assert_eq!(
            (r.response_code(), r.answers().len()),
            (ResponseCode::NoError, 0)
        );
        // A subdomain entry allows the subdomain; its non-public addresses are left out.
        let r = ask(&p, "a.pkg.test.", RecordType::A).await;
        assert_eq!(
            (r.response_code(), r.answers().len()),
            (ResponseCode::NoError, 0)
        );
        // Not in the policy: NXDOMAIN here, reported.
        for n in ["leak.mirror.test.", "pkg.test.", "evil.example."] {
            let r = ask(&p, n, RecordType::A).await;
            assert_eq!(r.response_code(), ResponseCode::NXDomain, "{n}");
        }
        let ev = events.lock().unwrap();
        assert_eq!(ev.len(), 3);
        assert!(ev.iter().all(|e| !e.allowed && e.protocol == "dns"));
        assert_eq!(ev[0].host, "leak.mirror.test");
    }

    proptest::proptest! {
        /// Any bytes, and any single-byte corruption of a real query, get an answer or
        /// nothing: never a panic, never an upstream lookup (the policy allows no name
        /// that needs one here: both are static).
        #[test]
        fn any_message_is_answered_without_panicking(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
            at in 0usize..64,
            byte in proptest::num::u8::ANY,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let p = proxy(Arc::default());
                let _ = p.answer(&bytes, true).await;
                let mut m = Message::new();
                m.add_query(Query::query(Name::from_ascii("mirror.test.").unwrap(), RecordType::A));
                let mut q = m.to_vec().unwrap();
                let i = at % q.len();
                q[i] = byte;
                if let Some(r) = p.answer(&q, false).await {
                    proptest::prop_assert!(Message::from_vec(&r).is_ok());
                }
                Ok(())
            })?;
        }
    }

    #[tokio::test]
    async fn malformed_queries_get_formerr_or_nothing() {
        let p = proxy(Arc::default());
        let r = p.answer(&[0x12, 0x34, 0xff], true).await.unwrap();
        let m = Message::from_vec(&r).unwrap();
        assert_eq!((m.id(), m.response_code()), (0x1234, ResponseCode::FormErr));
        assert!(p.answer(&[1], true).await.is_none());
        // Two questions in one message.
        let mut m = Message::new();
        m.add_query(Query::query(
            Name::from_ascii("mirror.test.").unwrap(),
            RecordType::A,
        ));
        m.add_query(Query::query(
            Name::from_ascii("x.test.").unwrap(),
            RecordType::A,
        ));
        let r = Message::from_vec(&p.answer(&m.to_vec().unwrap(), true).await.unwrap()).unwrap();
        assert_eq!(r.response_code(), ResponseCode::FormErr);
    }
}
