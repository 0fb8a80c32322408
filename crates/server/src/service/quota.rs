//! Per-tenant quotas (`quotas.*`): what is checked where, and the in-memory counters of what
//! the store does not hold (commands running, sandboxes being started).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::config::TenantQuota;
use crate::error::ServiceError;
use crate::store::TenantUsage;

/// Commands running and starts in progress, per tenant.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    execs: Arc<Mutex<HashMap<String, u32>>>,
    starting: Arc<Mutex<HashMap<String, u32>>>,
    uploading: Arc<Mutex<HashMap<String, u64>>>,
}

/// Bytes announced by uploads in progress; released on drop (after the upload is counted in
/// the store, or abandoned).
#[derive(Debug)]
pub(crate) struct Bytes {
    map: Arc<Mutex<HashMap<String, u64>>>,
    tenant: String,
    n: u64,
}

impl Drop for Bytes {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = m.get_mut(&self.tenant) {
            *v = v.saturating_sub(self.n);
            if *v == 0 {
                m.remove(&self.tenant);
            }
        }
    }
}

/// Held while a command runs; releases its slot on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    map: Arc<Mutex<HashMap<String, u32>>>,
    tenant: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.tenant);
            }
        }
    }
}

fn exhausted(tenant: &str, what: &str, have: u64, key: &str, limit: u64) -> ServiceError {
    ServiceError::ResourceExhausted(format!(
        "tenant {tenant:?} has {have} {what} (quota quotas.{key} = {limit})"
    ))
}

fn take(
    map: &Arc<Mutex<HashMap<String, u32>>>,
    tenant: &str,
    base: u64,
    limit: u32,
    what: &str,
    key: &str,
) -> Result<Slot, ServiceError> {
    let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
    let n = m.entry(tenant.to_owned()).or_insert(0);
    if limit > 0 && base + u64::from(*n) >= u64::from(limit) {
        let have = base + u64::from(*n);
        if *n == 0 {
            m.remove(tenant);
        }
        return Err(exhausted(tenant, what, have, key, u64::from(limit)));
    }
    *n += 1;
    Ok(Slot {
        map: map.clone(),
        tenant: tenant.to_owned(),
    })
}

impl Counters {
    /// A slot for one more running command of `tenant`, or RESOURCE_EXHAUSTED.
    pub(crate) fn exec(&self, tenant: &str, q: &TenantQuota) -> Result<Slot, ServiceError> {
        take(
            &self.execs,
            tenant,
            0,
            q.concurrent_execs,
            "commands running",
            "concurrent_execs",
        )
    }

    /// Reserves a start for `tenant` before the running ones are counted; returns the slot
    /// and how many starts (this one included) are in progress. [`Counters::check_start`]
    /// then compares against what runs: a start finishing in between is counted twice (safe),
    /// never missed.
    pub(crate) fn reserve_start(&self, tenant: &str) -> (Slot, u64) {
        let mut m = self.starting.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(tenant.to_owned()).or_insert(0);
        *n += 1;
        let starting = u64::from(*n);
        (
            Slot {
                map: self.starting.clone(),
                tenant: tenant.to_owned(),
            },
            starting,
        )
    }

    /// RESOURCE_EXHAUSTED when `running` plus `starting` (this start included) exceed the
    /// tenant's running sandboxes quota.
    pub(crate) fn check_start(
        tenant: &str,
        running: u64,
        starting: u64,
        q: &TenantQuota,
    ) -> Result<(), ServiceError> {
        let limit = u64::from(q.running_sandboxes);
        if limit > 0 && running + starting > limit {
            return Err(exhausted(
                tenant,
                "sandboxes running or starting",
                running + starting - 1,
                "running_sandboxes",
                limit,
            ));
        }
        Ok(())
    }

    /// Reserves `n` bytes of an upload for `tenant`; returns the reservation and all bytes
    /// reserved by the tenant's uploads in progress (this one included).
    pub(crate) fn reserve_bytes(&self, tenant: &str, n: u64) -> (Bytes, u64) {
        let mut m = self.uploading.lock().unwrap_or_else(|p| p.into_inner());
        let v = m.entry(tenant.to_owned()).or_insert(0);
        *v = v.saturating_add(n);
        let total = *v;
        (
            Bytes {
                map: self.uploading.clone(),
                tenant: tenant.to_owned(),
                n,
            },
            total,
        )
    }
}

/// RESOURCE_EXHAUSTED when uploads of `adding` bytes (this one and those in progress) would
/// take `tenant` past its codebase bytes quota.
pub(crate) fn check_codebase_bytes(
    tenant: &str,
    usage: &TenantUsage,
    adding: u64,
    q: &TenantQuota,
) -> Result<(), ServiceError> {
    if q.codebase_bytes > 0 && usage.codebase_bytes.saturating_add(adding) > q.codebase_bytes {
        return Err(ServiceError::ResourceExhausted(format!(
            "tenant {tenant:?} stores {} codebase bytes; {adding} more would exceed quotas.codebase_bytes = {}",
            usage.codebase_bytes, q.codebase_bytes
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_slots_are_counted_per_tenant_and_released_on_drop() {
        let c = Counters::default();
        let q = TenantQuota {
            concurrent_execs: 2,
            ..TenantQuota::default()
        };
        let a1 = c.exec("a", &q).unwrap();
        let _a2 = c.exec("a", &q).unwrap();
        let e = c.exec("a", &q).unwrap_err().to_string();
        assert!(
            e.contains("quotas.concurrent_execs") && e.contains("2"),
            "{e}"
        );
        let _b = c.exec("b", &q).unwrap();
        drop(a1);
        let _a3 = c.exec("a", &q).unwrap();
        // Unlimited never refuses, and leaves nothing behind.
        let none = TenantQuota::default();
        let slots: Vec<_> = (0..100).map(|_| c.exec("z", &none).unwrap()).collect();
        drop(slots);
        assert!(!c.execs.lock().unwrap().contains_key("z"));
    }

    #[test]
    fn start_reservations_add_to_what_runs() {
        let c = Counters::default();
        let q = TenantQuota {
            running_sandboxes: 2,
            ..TenantQuota::default()
        };
        let (r, n) = c.reserve_start("a");
        assert_eq!(n, 1);
        assert!(Counters::check_start("a", 1, n, &q).is_ok());
        // One running plus one starting: the next start is refused until the first is saved.
        let (r2, n2) = c.reserve_start("a");
        assert!(Counters::check_start("a", 1, n2, &q).is_err());
        drop((r, r2));
        let (_r, n) = c.reserve_start("a");
        assert!(Counters::check_start("a", 1, n, &q).is_ok());
        assert!(Counters::check_start("a", 2, n, &q).is_err());
        let (b1, t1) = c.reserve_bytes("a", 10);
        let (_b2, t2) = c.reserve_bytes("a", 5);
        assert_eq!((t1, t2), (10, 15));
        drop(b1);
        assert_eq!(c.reserve_bytes("a", 1).1, 6);
    }

    #[test]
    fn codebase_bytes() {
        let q = TenantQuota {
            codebase_bytes: 100,
            ..TenantQuota::default()
        };
        let u = TenantUsage {
            codebase_bytes: 60,
            ..TenantUsage::default()
        };
        assert!(check_codebase_bytes("a", &u, 40, &q).is_ok());
        assert!(check_codebase_bytes("a", &u, 41, &q).is_err());
        assert!(check_codebase_bytes("a", &u, u64::MAX, &TenantQuota::default()).is_ok());
    }
}
