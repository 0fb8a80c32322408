//! The control channel to a sandbox's init: requests out, replies (with fds) routed by id.

use super::*;

pub(super) type Incoming = (Reply, Vec<OwnedFd>);

/// The host end of the control socket, with reply routing by id.
#[derive(Debug)]
pub(super) struct Channel {
    pub(super) sandbox_id: String,
    pub(super) sock: AsyncFd<OwnedFd>,
    pub(super) pending: StdMutex<HashMap<u64, mpsc::UnboundedSender<Incoming>>>,
    pub(super) closed: AtomicBool,
}

impl Channel {
    pub(super) fn register(&self, id: u64) -> mpsc::UnboundedReceiver<Incoming> {
        let (tx, rx) = mpsc::unbounded_channel();
        if let Ok(mut p) = self.pending.lock()
            && !self.closed.load(Ordering::SeqCst)
        {
            p.insert(id, tx);
        }
        rx
    }

    pub(super) fn unregister(&self, id: u64) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&id);
        }
    }

    pub(super) async fn send(&self, req: &Request, fds: &[RawFd]) -> Result<()> {
        let err = |source| RuntimeError::Channel {
            sandbox_id: self.sandbox_id.clone(),
            op: "send",
            source,
        };
        loop {
            let mut guard = self.sock.writable().await.map_err(err)?;
            match guard.try_io(|s| send_packet(s.get_ref().as_fd(), req, fds)) {
                Ok(r) => return r.map_err(err),
                Err(_would_block) => continue,
            }
        }
    }

    /// Routes replies until the init closes the socket.
    pub(super) async fn read_loop(self: Arc<Self>) {
        loop {
            let r = match self.sock.readable().await {
                Ok(mut guard) => {
                    match guard.try_io(|s| {
                        recv_packet::<Reply>(s.get_ref().as_fd(), MsgFlags::MSG_DONTWAIT)
                    }) {
                        Ok(r) => r,
                        Err(_would_block) => continue,
                    }
                }
                Err(e) => Err(e),
            };
            let (reply, fds) = match r {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(sandbox_id = %self.sandbox_id, error = %e, "control channel read failed");
                    break;
                }
            };
            let id = match &reply {
                Reply::Ready { .. } => 0,
                Reply::Started { id }
                | Reply::SpawnFailed { id, .. }
                | Reply::Exited { id, .. }
                | Reply::SessionFifos { id, .. }
                | Reply::Failed { id, .. } => *id,
            };
            let tx = self.pending.lock().ok().and_then(|p| p.get(&id).cloned());
            match tx {
                Some(tx) => {
                    let _ = tx.send((reply, fds));
                }
                None => tracing::debug!(sandbox_id = %self.sandbox_id, ?reply, "unrouted reply"),
            }
        }
        self.closed.store(true, Ordering::SeqCst);
        if let Ok(mut p) = self.pending.lock() {
            p.clear();
        }
    }
}
