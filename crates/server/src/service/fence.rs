//! Whether this server may still write as the one server of its metadata database.
//!
//! A server that was paused (SIGSTOP, a frozen VM) or cut off from its database may have
//! been replaced meanwhile: its claim expired, another server runs the database's sandboxes,
//! and its own node may have been declared lost. Its renewal task finds out at its next
//! attempt, but a request already in flight could publish first. Publishing checks the fence
//! just before writing to a codebase: first locally (the claim or the node was lost, or the
//! last renewal is older than half the claim's lifetime, where the server stops anyway), then
//! in the database (the claim is still this server's by the database's clock, its node not
//! lost), since a frozen VM's clocks need not count the time it was frozen. What remains is
//! the window between that check and the end of the write.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::error::{ServiceError, chain};
use crate::store::{SERVER_LEASE, Store};

/// The fence of one server's claim; shared by its renewal task and its service.
#[derive(Debug)]
pub struct Fence {
    /// When the last renewal that succeeded was sent.
    renewed: Mutex<Instant>,
    /// The claim, or this node, was lost.
    lost: AtomicBool,
    /// How old the last renewal may be; `None`: age alone never closes it (a local SQLite
    /// file nobody else can write).
    max_age: Option<Duration>,
    /// The claim's holder as recorded in the lease row.
    holder: String,
}

impl Fence {
    /// A fence renewed now, for the claim held as `holder`; `max_age` as on [`Fence`].
    pub fn new(max_age: Option<Duration>, holder: String) -> Fence {
        Fence {
            renewed: Mutex::new(Instant::now()),
            lost: AtomicBool::new(false),
            max_age,
            holder,
        }
    }

    /// The claim's holder as recorded in the lease row.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// A renewal sent at `sent` succeeded.
    pub fn renewed(&self, sent: Instant) {
        let mut r = self.renewed.lock().unwrap_or_else(|p| p.into_inner());
        *r = (*r).max(sent);
    }

    /// The claim or the node was lost: closed for good.
    pub fn close(&self) {
        self.lost.store(true, Ordering::SeqCst);
    }

    /// [`Fence::check`], then asks `store` whether this server (`holder`, node `node`) still
    /// holds the claim and its node is not lost; blocking. A "no" does not close the fence:
    /// the claim may merely have expired while the machine slept, and then the next renewal
    /// takes it back (or finds it taken, and stops the server).
    pub fn check_held(&self, store: &dyn Store, node: &str) -> Result<(), ServiceError> {
        self.check()?;
        match store.holds_claim(SERVER_LEASE, &self.holder, node) {
            Ok(true) => self.check(),
            Ok(false) => Err(ServiceError::Unavailable(
                "this server does not hold its claim on the metadata database right now (it \
                 expired, or another server took it, or its node was declared lost): nothing \
                 is published until it is renewed"
                    .into(),
            )),
            Err(e) => Err(ServiceError::Unavailable(format!(
                "cannot confirm this server's claim on the metadata database, so nothing is \
                 published: {}",
                chain(&e)
            ))),
        }
    }

    /// Refuses (UNAVAILABLE) once the claim may have passed to another server, by what this
    /// process knows (no database).
    pub fn check(&self) -> Result<(), ServiceError> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(ServiceError::Unavailable(
                "this server lost its claim on the metadata database (or its node was declared \
                 lost) and is stopping: nothing more is published from it"
                    .into(),
            ));
        }
        let age = self
            .renewed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed();
        match self.max_age {
            Some(max) if age >= max => Err(ServiceError::Unavailable(format!(
                "this server has not renewed its claim on the metadata database for {}s (the \
                 database is unreachable, or the server was paused): another server may run \
                 its sandboxes now, so nothing is published until the claim is renewed",
                age.as_secs()
            ))),
            _ => Ok(()),
        }
    }
}
