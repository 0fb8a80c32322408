//! One conformance suite for every metadata backend: each case takes a `&dyn Store` and
//! runs against an in-memory SQLite and against a real PostgreSQL (a throwaway cluster per
//! test, see `agentfense_testsupport::postgres`). Then what is particular to each backend:
//! migrations, and limits that must hold across processes.
use super::*;
use agentfense_core::Level;
use agentfense_testsupport::postgres::Postgres;
use pretty_assertions::assert_eq;

fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::new(secs, 123)
}

fn codebase(owner: &str) -> CodebaseRecord {
    CodebaseRecord {
        id: CodebaseId::generate(),
        name: "demo".into(),
        owner_id: owner.into(),
        tenant: format!("t-{owner}"),
        size: 0,
        file_count: 0,
        created_at: t(1),
        updated_at: t(1),
    }
}

fn sandbox(cb: &CodebaseRecord) -> SandboxRecord {
    SandboxRecord {
        id: SandboxId::generate(),
        codebase_id: cb.id.clone(),
        owner_id: cb.owner_id.clone(),
        tenant: cb.tenant.clone(),
        rules: vec![PermissionRule::glob("**/*", Level::Read, 0)],
        status: SandboxStatus::Pending,
        status_reason: None,
        labels: BTreeMap::from([("team".into(), "a".into())]),
        runtime: RuntimeKind::Bwrap,
        image: String::new(),
        resources: ResourceLimits {
            pids_limit: 50,
            ..ResourceLimits::default()
        },
        created_at: t(2),
        started_at: None,
        stopped_at: None,
        expires_at: Some(t(100)),
        node: "n1".into(),
        lost_at: None,
    }
}

#[test]
fn sqlite_migrations_are_idempotent_and_versioned() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.db");
    let cb = codebase("u");
    {
        let s = SqliteStore::open(&path).unwrap();
        s.insert_codebase(&cb).unwrap();
    }
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.get_codebase(&cb.id).unwrap(), Some(cb));
    let v: i64 = s
        .conn()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(v as usize, MIGRATIONS.len());
    drop(s);
    // A database from a newer server is refused, not silently used.
    let c = rusqlite::Connection::open(&path).unwrap();
    c.pragma_update(None, "user_version", 99).unwrap();
    drop(c);
    assert!(matches!(
        SqliteStore::open(&path),
        Err(StoreError::TooNew { found: 99, .. })
    ));
}

fn codebase_pagination_is_real_and_filters_by_owner(s: &dyn Store) {
    let mut ids = vec![];
    for i in 0..5 {
        let c = codebase(if i % 2 == 0 { "even" } else { "odd" });
        ids.push(c.id.clone());
        s.insert_codebase(&c).unwrap();
    }
    let p1 = s.list_codebases(None, None, 0, 2).unwrap();
    assert_eq!(p1.items.len(), 2);
    assert!(!p1.next_token.is_empty());
    let p2 = s
        .list_codebases(None, None, p1.next_token.parse().unwrap(), 2)
        .unwrap();
    let p3 = s
        .list_codebases(None, None, p2.next_token.parse().unwrap(), 2)
        .unwrap();
    assert_eq!(p3.items.len(), 1);
    assert_eq!(p3.next_token, "");
    let all: Vec<_> = [p1, p2, p3]
        .into_iter()
        .flat_map(|p| p.items)
        .map(|c| c.id)
        .collect();
    assert_eq!(all, ids);
    let even = s.list_codebases(None, Some("even"), 0, 100).unwrap();
    assert_eq!(even.items.len(), 3);
    assert!(even.items.iter().all(|c| c.owner_id == "even"));
    // By tenant, alone or with an owner.
    let odd = s.list_codebases(Some("t-odd"), None, 0, 100).unwrap();
    assert_eq!(odd.items.len(), 2);
    assert!(
        s.list_codebases(Some("t-odd"), Some("even"), 0, 100)
            .unwrap()
            .items
            .is_empty()
    );
}

fn stats_are_incremental(s: &dyn Store) {
    let c = codebase("u");
    s.insert_codebase(&c).unwrap();
    s.adjust_codebase_stats(&c.id, 100, 1, t(5)).unwrap();
    s.adjust_codebase_stats(&c.id, -40, 0, t(6)).unwrap();
    let got = s.get_codebase(&c.id).unwrap().unwrap();
    assert_eq!((got.size, got.file_count, got.updated_at), (60, 1, t(6)));
    assert!(s.delete_codebase(&c.id).unwrap());
    assert!(!s.delete_codebase(&c.id).unwrap());
}

fn sandboxes_round_trip_and_update(s: &dyn Store) {
    let c = codebase("owner");
    s.insert_codebase(&c).unwrap();
    let mut sb = sandbox(&c);
    s.insert_sandbox(&sb).unwrap();
    assert_eq!(s.get_sandbox(&sb.id).unwrap(), Some(sb.clone()));
    sb.status = SandboxStatus::Error;
    sb.status_reason = Some("mount failed".into());
    sb.started_at = Some(t(3));
    s.update_sandbox(&sb).unwrap();
    assert_eq!(s.get_sandbox(&sb.id).unwrap(), Some(sb.clone()));
    assert_eq!(s.count_sandboxes_of_owner("owner").unwrap(), 1);
    // Limits are checked in the same transaction as the insert; a refused create inserts
    // and counts nothing.
    let now = t(50_000);
    let hit = s
        .insert_sandbox_limited(&sandbox(&c), 1, 0, 0, now)
        .unwrap();
    assert_eq!(hit, Err(LimitHit::Owner(1)));
    let hit = s
        .insert_sandbox_limited(&sandbox(&c), 0, 1, 0, now)
        .unwrap();
    assert_eq!(hit, Err(LimitHit::Tenant(1)));
    assert_eq!(s.count_sandboxes_of_owner("owner").unwrap(), 1);
    let extra = sandbox(&c);
    assert_eq!(
        s.insert_sandbox_limited(&extra, 0, 2, 1, now).unwrap(),
        Ok(())
    );
    let hit = s
        .insert_sandbox_limited(&sandbox(&c), 0, 0, 1, now)
        .unwrap();
    assert_eq!(hit, Err(LimitHit::PerHour(1)));
    // The hour slides.
    let later = now + Duration::from_secs(3601);
    let again = sandbox(&c);
    assert_eq!(
        s.insert_sandbox_limited(&again, 0, 0, 1, later).unwrap(),
        Ok(())
    );
    s.delete_sandbox(&extra.id).unwrap();
    s.delete_sandbox(&again.id).unwrap();
    assert_eq!(
        s.sandboxes_of_codebase(&c.id).unwrap(),
        vec![sb.id.to_string()]
    );
    let other = codebase("x");
    s.insert_codebase(&other).unwrap();
    s.insert_sandbox(&sandbox(&other)).unwrap();
    assert_eq!(
        s.list_sandboxes(
            crate::store::SandboxFilter {
                codebase: Some(&c.id),
                ..Default::default()
            },
            0,
            10
        )
        .unwrap()
        .items,
        vec![sb.clone()]
    );
    assert_eq!(s.all_sandboxes().unwrap().len(), 2);
    // A codebase with sandboxes cannot be deleted underneath them.
    assert!(s.delete_codebase(&c.id).is_err());
    assert!(s.delete_sandbox(&sb.id).unwrap());
    assert!(s.delete_codebase(&c.id).unwrap());
}

fn sessions_round_trip_close_and_cascade(s: &dyn Store) {
    let c = codebase("o");
    s.insert_codebase(&c).unwrap();
    let sb = sandbox(&c);
    s.insert_sandbox(&sb).unwrap();
    let sess = SessionRecord {
        id: SessionId::generate(),
        sandbox_id: sb.id.clone(),
        shell: "/bin/sh".into(),
        env: BTreeMap::from([("A".into(), "1".into())]),
        status: SessionStatus::Active,
        created_at: t(9),
        closed_at: None,
    };
    s.insert_session(&sess).unwrap();
    assert_eq!(s.get_session(&sess.id).unwrap(), Some(sess.clone()));
    s.close_sessions_of(&sb.id, t(10)).unwrap();
    let closed = s.get_session(&sess.id).unwrap().unwrap();
    assert_eq!(
        (closed.status, closed.closed_at),
        (SessionStatus::Closed, Some(t(10)))
    );
    assert_eq!(s.list_sessions(&sb.id).unwrap().len(), 1);
    s.delete_sandbox(&sb.id).unwrap();
    assert_eq!(s.get_session(&sess.id).unwrap(), None);
}

fn keys_tenants_and_hourly_creations(s: &dyn Store) {
    let k = crate::store::KeyRecord {
        id: "key_0123456789ab".into(),
        tenant: "a".into(),
        scopes: vec!["exec".into(), "sandboxes:read".into()],
        sandbox_id: None,
        parent_id: None,
        created_at: t(1),
        expires_at: Some(t(100)),
        last_used_at: None,
        revoked_at: None,
    };
    s.insert_key(&k, b"hash").unwrap();
    let got = s.key(&k.id, t(2)).unwrap().unwrap();
    assert_eq!(
        (
            got.key,
            got.hash.as_slice(),
            got.tenant_blocked,
            got.parent_dead
        ),
        (k.clone(), &b"hash"[..], false, false)
    );
    assert!(s.key("key_nope", t(2)).unwrap().is_none());
    assert_eq!(s.key_ids().unwrap(), vec![k.id.clone()]);
    // A token minted by it dies with it: revoked, expired, or gone.
    let tok = crate::store::KeyRecord {
        id: "tok_0123456789ab".into(),
        sandbox_id: Some("sb_0123456789abcdef".into()),
        parent_id: Some(k.id.clone()),
        expires_at: None,
        ..k.clone()
    };
    s.insert_key(&tok, b"h2").unwrap();
    assert!(!s.key(&tok.id, t(2)).unwrap().unwrap().parent_dead);
    assert!(
        s.key(&tok.id, t(100)).unwrap().unwrap().parent_dead,
        "parent expired"
    );
    assert_eq!(s.count_tokens_of("sb_0123456789abcdef").unwrap(), 1);
    s.touch_key(&k.id, t(5)).unwrap();
    assert!(s.revoke_key(&k.id, t(6)).unwrap());
    assert!(s.revoke_key(&k.id, t(7)).unwrap());
    assert!(
        s.key(&tok.id, t(7)).unwrap().unwrap().parent_dead,
        "parent revoked"
    );
    let listed = s.list_keys().unwrap();
    assert_eq!(listed[0].revoked_at, Some(t(6)));
    assert_eq!(listed[0].last_used_at, Some(t(5)));
    assert!(!s.revoke_key("key_nope", t(7)).unwrap());

    // Blocking: visible through the key lookup, pending until enforced, undoable.
    assert!(s.block_tenant("a", "leak", t(8)).unwrap());
    assert!(!s.block_tenant("a", "again", t(9)).unwrap());
    assert!(s.key(&k.id, t(8)).unwrap().unwrap().tenant_blocked);
    assert!(s.tenant_blocked("a").unwrap());
    assert!(!s.tenant_blocked("b").unwrap());
    assert_eq!(
        s.blocks_to_enforce().unwrap(),
        vec![("a".into(), "leak".into())]
    );
    s.block_enforced("a", t(10)).unwrap();
    assert!(s.blocks_to_enforce().unwrap().is_empty());
    assert!(s.unblock_tenant("a").unwrap());
    assert!(!s.unblock_tenant("a").unwrap());
    assert_eq!(s.list_tenants().unwrap()[0].name, "a");

    // Usage by tenant.
    let c = codebase("u");
    s.insert_codebase(&c).unwrap();
    s.adjust_codebase_stats(&c.id, 1000, 1, t(11)).unwrap();
    let mut sb = sandbox(&c);
    sb.status = SandboxStatus::Running;
    s.insert_sandbox(&sb).unwrap();
    s.insert_sandbox(&sandbox(&c)).unwrap();
    let u = s.tenant_usage("t-u").unwrap();
    assert_eq!((u.sandboxes, u.running, u.codebase_bytes), (2, 1, 1000));
    s.delete_tokens_of("sb_x").unwrap();
}

fn leases_go_to_one_holder_until_they_expire(s: &dyn Store) {
    // Leases are timed by the database's clock: "held" is an hour, "expired" a TTL of 0.
    let hour = Duration::from_secs(3600);
    let gone = Duration::ZERO;
    assert!(s.try_lease("reaper", "a", hour).unwrap());
    assert!(!s.try_lease("reaper", "b", hour).unwrap(), "a holds it");
    assert!(s.try_lease("reaper", "a", hour).unwrap(), "a renews it");
    // a renews with no time left: expired, b takes it, and a no longer holds it.
    assert!(s.try_lease("reaper", "a", gone).unwrap());
    assert!(s.try_lease("reaper", "b", hour).unwrap());
    assert!(!s.try_lease("reaper", "a", hour).unwrap());
    // Other names are independent; releasing frees at once, and only for the holder.
    assert!(s.try_lease("orphans", "a", hour).unwrap());
    s.release_lease("reaper", "a").unwrap();
    assert!(!s.try_lease("reaper", "a", hour).unwrap());
    s.release_lease("reaper", "b").unwrap();
    assert!(s.try_lease("reaper", "a", hour).unwrap());
}

fn corrupt_and_missing_rows_are_errors_not_panics(s: &dyn Store) {
    // Reads of what is not there are `None` or empty, never errors.
    assert_eq!(s.get_codebase(&CodebaseId::generate()).unwrap(), None);
    assert_eq!(s.get_sandbox(&SandboxId::generate()).unwrap(), None);
    assert_eq!(s.get_session(&SessionId::generate()).unwrap(), None);
    assert!(s.list_sessions(&SandboxId::generate()).unwrap().is_empty());
    assert_eq!(s.tenant_usage("nobody").unwrap(), TenantUsage::default());
    assert!(!s.tenant_blocked("nobody").unwrap());
    // A sandbox on a codebase that does not exist is refused by the database.
    assert!(s.insert_sandbox(&sandbox(&codebase("ghost"))).is_err());
    // A session of a sandbox that does not exist too.
    let orphan = SessionRecord {
        id: SessionId::generate(),
        sandbox_id: SandboxId::generate(),
        shell: "/bin/sh".into(),
        env: BTreeMap::new(),
        status: SessionStatus::Active,
        created_at: t(1),
        closed_at: None,
    };
    assert!(s.insert_session(&orphan).is_err());
    assert!(s.sessions_open_since(t(1_000)).unwrap().is_empty());
}

fn nodes_register_beat_drain_and_own_sandboxes(s: &dyn Store) {
    let node = NodeRecord {
        id: "worker-1".into(),
        host: "host-1".into(),
        boot_id: "boot-a".into(),
        cpus: 8,
        memory_bytes: 32 << 30,
        draining: false,
        registered_at: t(1),
        heartbeat_at: t(1),
        lost_at: None,
    };
    s.register_node(&node).unwrap();
    assert_eq!(s.get_node("worker-1").unwrap(), Some(node.clone()));
    assert_eq!(s.heartbeat_node("worker-1", "boot-a").unwrap(), Beat::Alive);
    // A stale boot's heartbeat is refused: the node rebooted and is someone new.
    assert_eq!(
        s.heartbeat_node("worker-1", "boot-old").unwrap(),
        Beat::Superseded
    );
    assert_eq!(
        s.heartbeat_node("nobody", "boot-a").unwrap(),
        Beat::Superseded
    );
    // Timed by the database's clock, not the caller's.
    let beat = s.get_node("worker-1").unwrap().unwrap().heartbeat_at;
    assert!(beat > t(1_000_000_000), "{beat:?}");
    // Draining survives a re-registration (a restart), undraining lifts it.
    assert!(s.set_node_draining("worker-1", true).unwrap());
    let again = NodeRecord {
        boot_id: "boot-b".into(),
        host: "renamed".into(),
        registered_at: t(10),
        heartbeat_at: t(10),
        ..node.clone()
    };
    s.register_node(&again).unwrap();
    let got = s.get_node("worker-1").unwrap().unwrap();
    assert_eq!(
        (
            got.boot_id.as_str(),
            got.host.as_str(),
            got.draining,
            got.heartbeat_at
        ),
        ("boot-b", "renamed", true, t(10))
    );
    assert!(!s.set_node_draining("nobody", true).unwrap());
    assert!(s.set_node_draining("worker-1", false).unwrap());
    s.register_node(&NodeRecord {
        id: "worker-0".into(),
        ..node.clone()
    })
    .unwrap();
    let ids: Vec<String> = s.list_nodes().unwrap().into_iter().map(|n| n.id).collect();
    assert_eq!(ids, ["worker-0", "worker-1"]);
    // Sandboxes carry their node, and can be moved to another.
    let c = codebase("n");
    s.insert_codebase(&c).unwrap();
    let sb = sandbox(&c);
    s.insert_sandbox(&sb).unwrap();
    assert_eq!(s.get_sandbox(&sb.id).unwrap().unwrap().node, "n1");
    s.set_sandbox_node(&sb.id, "worker-1").unwrap();
    assert_eq!(s.all_sandboxes().unwrap()[0].node, "worker-1");
}

fn lost_nodes_lose_their_sandboxes_and_fence_stale_writers(s: &dyn Store) {
    let node = |id: &str| NodeRecord {
        id: id.into(),
        host: format!("host-{id}"),
        boot_id: "boot".into(),
        cpus: 2,
        memory_bytes: 1 << 30,
        draining: false,
        registered_at: t(1),
        heartbeat_at: t(1),
        lost_at: None,
    };
    s.register_node(&node("gone")).unwrap();
    s.register_node(&node("keeper")).unwrap();
    assert_eq!(s.heartbeat_node("gone", "boot").unwrap(), Beat::Alive);
    let c = codebase("lost");
    s.insert_codebase(&c).unwrap();
    let on = |node: &str, started: bool| SandboxRecord {
        node: node.into(),
        status: if started {
            SandboxStatus::Running
        } else {
            SandboxStatus::Pending
        },
        started_at: started.then(|| t(3)),
        ..sandbox(&c)
    };
    let (running, pending, theirs) = (on("gone", true), on("gone", false), on("keeper", true));
    for sb in [&running, &pending, &theirs] {
        s.insert_sandbox(sb).unwrap();
    }
    let session = SessionRecord {
        id: SessionId::generate(),
        sandbox_id: running.id.clone(),
        shell: "/bin/sh".into(),
        env: BTreeMap::new(),
        status: SessionStatus::Active,
        created_at: t(4),
        closed_at: None,
    };
    s.insert_session(&session).unwrap();

    // Only the holder of the server lease declares nodes lost.
    assert_eq!(
        s.mark_lost_nodes(Duration::ZERO, "keeper", "keeper")
            .unwrap(),
        []
    );
    assert_eq!(s.get_node("gone").unwrap().unwrap().lost_at, None);
    assert!(
        s.try_lease(SERVER_LEASE, "keeper", Duration::from_secs(60))
            .unwrap()
    );
    assert!(s.holds_claim(SERVER_LEASE, "keeper", "keeper").unwrap());
    assert!(!s.holds_claim(SERVER_LEASE, "gone", "gone").unwrap());
    // It beat just now: not silent for an hour.
    assert_eq!(
        s.mark_lost_nodes(Duration::from_secs(3600), "keeper", "keeper")
            .unwrap(),
        []
    );
    // Silent for any time at all: every node but the keeper.
    let lost = s
        .mark_lost_nodes(Duration::ZERO, "keeper", "keeper")
        .unwrap();
    assert_eq!(lost.len(), 1, "{lost:?}");
    let gone = &lost[0];
    assert_eq!(
        (gone.id.as_str(), gone.host.as_str()),
        ("gone", "host-gone")
    );
    assert_eq!(gone.sandboxes, [(running.id.clone(), c.tenant.clone())]);
    // Never started there: nothing lost, it moves to the keeper.
    assert_eq!(gone.moved, std::slice::from_ref(&pending.id));
    let r = s.get_sandbox(&running.id).unwrap().unwrap();
    assert_eq!(r.status, SandboxStatus::Error);
    assert_eq!(
        (r.lost_at, r.stopped_at),
        (Some(gone.lost_at), Some(gone.lost_at))
    );
    let reason = r.status_reason.clone().unwrap();
    assert!(
        reason.contains("lost with its node gone on host host-gone") && reason.contains("gone"),
        "{reason}"
    );
    let p = s.get_sandbox(&pending.id).unwrap().unwrap();
    assert_eq!(
        (p.node.as_str(), p.status, p.lost_at),
        ("keeper", SandboxStatus::Pending, None)
    );
    assert_eq!(s.get_sandbox(&theirs.id).unwrap().unwrap(), theirs);
    let sess = s.get_session(&session.id).unwrap().unwrap();
    assert_eq!(
        (sess.status, sess.closed_at),
        (SessionStatus::Closed, Some(gone.lost_at))
    );
    assert_eq!(
        s.get_node("gone").unwrap().unwrap().lost_at,
        Some(gone.lost_at)
    );
    // A lost node holds no claim, even one under its name.
    assert!(
        s.try_lease("other", "gone", Duration::from_secs(60))
            .unwrap()
    );
    assert!(!s.holds_claim("other", "gone", "gone").unwrap());
    // Once: a second pass finds nothing new.
    assert_eq!(
        s.mark_lost_nodes(Duration::ZERO, "keeper", "keeper")
            .unwrap(),
        []
    );

    // The lost node, coming back, is told so by its heartbeat ...
    assert_eq!(
        s.heartbeat_node("gone", "boot").unwrap(),
        Beat::Lost(gone.lost_at)
    );
    assert_eq!(s.heartbeat_node("gone", "other").unwrap(), Beat::Superseded);
    // ... and what it still writes of its sandboxes changes nothing: no new session either.
    let late = SessionRecord {
        id: SessionId::generate(),
        ..session.clone()
    };
    assert!(matches!(
        s.insert_session(&late),
        Err(StoreError::Fenced { .. })
    ));
    assert_eq!(s.get_session(&late.id).unwrap(), None);
    let stale = SandboxRecord {
        status: SandboxStatus::Running,
        status_reason: None,
        ..running.clone()
    };
    let err = s.update_sandbox(&stale).unwrap_err();
    assert!(
        matches!(&err, StoreError::Fenced { why, .. } if why.contains("declared lost with node gone")),
        "{err}"
    );
    assert_eq!(s.get_sandbox(&running.id).unwrap().unwrap(), r);
    let err = s
        .update_sandbox(&SandboxRecord {
            status: SandboxStatus::Running,
            ..pending.clone()
        })
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Fenced { why, .. } if why.contains("moved from node gone to node keeper")),
        "{err}"
    );
    // The keeper's own writes go through; a destroyed sandbox's update is still no error.
    let mut mine = s.get_sandbox(&pending.id).unwrap().unwrap();
    mine.status = SandboxStatus::Running;
    s.update_sandbox(&mine).unwrap();
    assert_eq!(s.get_sandbox(&pending.id).unwrap().unwrap(), mine);
    assert!(s.delete_sandbox(&theirs.id).unwrap());
    s.update_sandbox(&theirs).unwrap();

    // Only a lost node can be forgotten.
    assert!(!s.remove_lost_node("keeper").unwrap());
    assert!(!s.remove_lost_node("nobody").unwrap());
    s.register_node(&node("spare")).unwrap();
    assert!(
        s.mark_lost_nodes(Duration::ZERO, "keeper", "keeper")
            .unwrap()
            .len()
            == 1
    );
    assert!(s.remove_lost_node("spare").unwrap());
    assert_eq!(s.get_node("spare").unwrap(), None);
    // Registering again (a fresh start) makes it a node like any other; what was lost stays.
    s.register_node(&node("gone")).unwrap();
    assert_eq!(s.get_node("gone").unwrap().unwrap().lost_at, None);
    assert_eq!(s.heartbeat_node("gone", "boot").unwrap(), Beat::Alive);
    assert_eq!(s.get_sandbox(&running.id).unwrap().unwrap(), r);
}

#[test]
fn listing_seq_follows_the_sandbox_columns() {
    assert_eq!(SANDBOX_COLS.split(',').count(), SANDBOX_SEQ);
}

/// Every conformance case, once per backend.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[test]
                fn $case() {
                    super::$case(&super::SqliteStore::open_in_memory().unwrap());
                }
            )*
        }
        mod postgres {
            $(
                #[test]
                fn $case() {
                    let name = concat!("store::tests::postgres::", stringify!($case));
                    let Some(pg) = super::Postgres::start(name) else {
                        return;
                    };
                    super::$case(&super::PgStore::connect(&pg.database(), None).unwrap());
                }
            )*
        }
    };
}

conformance!(
    codebase_pagination_is_real_and_filters_by_owner,
    stats_are_incremental,
    sandboxes_round_trip_and_update,
    sessions_round_trip_close_and_cascade,
    keys_tenants_and_hourly_creations,
    leases_go_to_one_holder_until_they_expire,
    corrupt_and_missing_rows_are_errors_not_panics,
    nodes_register_beat_drain_and_own_sandboxes,
    lost_nodes_lose_their_sandboxes_and_fence_stale_writers,
);

#[test]
fn postgres_migrates_once_refuses_a_newer_schema_and_names_no_password() {
    let Some(pg) = Postgres::start("store::tests::postgres_migrates_once") else {
        return;
    };
    let url = pg.database();
    let cb = codebase("u");
    // Replicas starting together: every one migrates or finds the schema migrated.
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| PgStore::connect(&url, None).map(drop)))
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
    });
    PgStore::connect(&url, None)
        .unwrap()
        .insert_codebase(&cb)
        .unwrap();
    let s = PgStore::connect(&url, None).unwrap();
    assert_eq!(s.get_codebase(&cb.id).unwrap(), Some(cb));
    let mut c = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
    let v: i32 = c
        .query_one("SELECT version FROM agentfense_schema", &[])
        .unwrap()
        .get(0);
    assert_eq!(v as usize, super::postgres::MIGRATIONS.len());
    // A database from a newer server is refused, not silently used.
    c.execute("UPDATE agentfense_schema SET version = 99", &[])
        .unwrap();
    assert!(matches!(
        PgStore::connect(&url, None),
        Err(StoreError::TooNew { found: 99, .. })
    ));
    // An unreachable server: the error names it, never the password.
    let err = PgStore::connect("postgres://u:s3cret@%2Fnonexistent/db", None).unwrap_err();
    let shown = format!("{err}");
    assert!(shown.contains("postgres://u@"), "{shown}");
    assert!(!format!("{err:?}").contains("s3cret"), "{err:?}");
}

#[test]
fn postgres_limits_hold_across_processes_sharing_the_database() {
    let Some(pg) = Postgres::start("store::tests::postgres_limits_hold") else {
        return;
    };
    let url = pg.database();
    // Under a stricter default isolation a transaction's snapshot predates the lock it then
    // waits for: the store must not depend on the database's default.
    let mut admin = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
    admin
        .batch_execute(
            "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET default_transaction_isolation \
             = ''repeatable read''', current_database()); END $$",
        )
        .unwrap();
    drop(admin);
    // Two API replicas, each with its own pool, creating for one tenant at once.
    let a = PgStore::connect(&url, None).unwrap();
    let b = PgStore::connect(&url, None).unwrap();
    let c = codebase("owner");
    a.insert_codebase(&c).unwrap();
    let made = std::sync::atomic::AtomicU32::new(0);
    std::thread::scope(|scope| {
        for store in [&a, &b, &a, &b, &a, &b, &a, &b] {
            let (c, made) = (&c, &made);
            scope.spawn(move || {
                for _ in 0..5 {
                    let r = store
                        .insert_sandbox_limited(&sandbox(c), 0, 7, 0, t(1_000))
                        .unwrap();
                    if r.is_ok() {
                        made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(made.into_inner(), 7);
    assert_eq!(b.tenant_usage("t-owner").unwrap().sandboxes, 7);
}

#[test]
fn postgres_over_tls_verifies_the_server_and_never_falls_back() {
    let test = "store::tests::postgres_over_tls";
    if !agentfense_testsupport::require(test, agentfense_testsupport::openssl()) {
        return;
    }
    let pki = tempfile::tempdir().unwrap();
    agentfense_testsupport::pki(pki.path(), "unused");
    let Some(pg) = Postgres::start_tls(
        test,
        &pki.path().join("srv.pem"),
        &pki.path().join("srv.key"),
    ) else {
        return;
    };
    let ca = pki.path().join("ca.pem");
    let url = pg.tls_database();
    // The server accepts TLS only on this port: a store that works spoke TLS, and verified
    // the server against the private CA (name included: the certificate is for 127.0.0.1).
    let s = PgStore::connect(&format!("{url}?sslmode=require"), Some(&ca)).unwrap();
    let cb = codebase("tls");
    s.insert_codebase(&cb).unwrap();
    assert_eq!(s.get_codebase(&cb.id).unwrap(), Some(cb));
    // The default, `prefer`, also uses TLS where the server offers it, verified the same way.
    PgStore::connect(&url, Some(&ca)).unwrap();
    // A server the trusted CAs did not sign (the public web roots here) is refused, under
    // `prefer` too: no silent fallback to plaintext.
    for mode in ["?sslmode=require", ""] {
        let err = PgStore::connect(&format!("{url}{mode}"), None).unwrap_err();
        let chain = format!("{:?}", anyhow_chain(&err));
        assert!(chain.contains("certificate"), "{mode}: {chain}");
    }
    // Plaintext to this port is refused by the server: the successes above were TLS.
    assert!(PgStore::connect(&format!("{url}?sslmode=disable"), Some(&ca)).is_err());
    // The name is checked too: the same server and CA, reached as another name (`hostaddr`
    // connects to 127.0.0.1 while TLS expects `db.example`), is refused.
    let other_name = format!(
        "{}?hostaddr=127.0.0.1",
        url.replace("127.0.0.1", "db.example")
    );
    let err = PgStore::connect(&other_name, Some(&ca)).unwrap_err();
    let chain = anyhow_chain(&err).join(": ");
    assert!(chain.contains("certificate"), "{chain}");
    // A CA file that is not one is a clear error naming the key.
    let bogus = pki.path().join("srv.key");
    let err = PgStore::connect(&url, Some(&bogus))
        .unwrap_err()
        .to_string();
    assert!(err.contains("storage.database_ca_file"), "{err}");
}

/// Every message of an error's source chain.
fn anyhow_chain(e: &dyn std::error::Error) -> Vec<String> {
    let mut out = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push(s.to_string());
        cur = s.source();
    }
    out
}

#[test]
fn postgres_over_tcp_never_continues_in_plaintext_unless_told_to() {
    let test = "store::tests::postgres_over_tcp_never_continues_in_plaintext";
    // A server on a loopback port without TLS: what `prefer` would silently talk to, or
    // what an attacker in the path answers ("no TLS here").
    let Some(pg) = Postgres::start_plain_tcp(test) else {
        return;
    };
    let url = pg.tls_database();
    for mode in ["", "?sslmode=prefer", "?sslmode=require"] {
        let err = PgStore::connect(&format!("{url}{mode}"), None).unwrap_err();
        let chain = anyhow_chain(&err).join(": ");
        assert!(chain.to_lowercase().contains("tls"), "{mode:?}: {chain}");
    }
    // Plaintext only when the URL asks for it.
    let s = PgStore::connect(&format!("{url}?sslmode=disable"), None).unwrap();
    assert!(s.list_tenants().unwrap().is_empty());
}
