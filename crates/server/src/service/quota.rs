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

    /// A reservation for one more running sandbox of `tenant`, given the `running` ones the
    /// store knows of; held until the start is saved (or failed), so concurrent starts cannot
    /// all slip under the limit.
    pub(crate) fn start(
        &self,
        tenant: &str,
        running: u64,
        q: &TenantQuota,
    ) -> Result<Slot, ServiceError> {
        take(
            &self.starting,
            tenant,
            running,
            q.running_sandboxes,
            "sandboxes running or starting",
            "running_sandboxes",
        )
    }
}

/// RESOURCE_EXHAUSTED when an upload of `adding` bytes would take `tenant` past its codebase
/// bytes quota.
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
        let r = c.start("a", 1, &q).unwrap();
        // One running plus one starting: the next start is refused until the first is saved.
        assert!(c.start("a", 1, &q).is_err());
        drop(r);
        assert!(c.start("a", 1, &q).is_ok());
        assert!(c.start("a", 2, &q).is_err());
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
