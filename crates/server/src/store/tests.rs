//! The metadata store against an in-memory SQLite: records, quotas, pagination, migrations.
use super::*;
use agentfense_core::Level;
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
    }
}

#[test]
fn migrations_are_idempotent_and_versioned() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.db");
    let cb = codebase("u");
    {
        let s = Store::open(&path).unwrap();
        s.insert_codebase(&cb).unwrap();
    }
    let s = Store::open(&path).unwrap();
    assert_eq!(s.get_codebase(&cb.id).unwrap(), Some(cb));
    let v: i64 = s
        .conn()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(v as usize, MIGRATIONS.len());
    drop(s);
    // A database from a newer server is refused, not silently used.
    let c = Connection::open(&path).unwrap();
    c.pragma_update(None, "user_version", 99).unwrap();
    drop(c);
    assert!(matches!(
        Store::open(&path),
        Err(StoreError::TooNew { found: 99, .. })
    ));
}

#[test]
fn codebase_pagination_is_real_and_filters_by_owner() {
    let s = Store::open_in_memory().unwrap();
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

#[test]
fn stats_are_incremental() {
    let s = Store::open_in_memory().unwrap();
    let c = codebase("u");
    s.insert_codebase(&c).unwrap();
    s.adjust_codebase_stats(&c.id, 100, 1, t(5)).unwrap();
    s.adjust_codebase_stats(&c.id, -40, 0, t(6)).unwrap();
    let got = s.get_codebase(&c.id).unwrap().unwrap();
    assert_eq!((got.size, got.file_count, got.updated_at), (60, 1, t(6)));
    assert!(s.delete_codebase(&c.id).unwrap());
    assert!(!s.delete_codebase(&c.id).unwrap());
}

#[test]
fn sandboxes_round_trip_and_update() {
    let s = Store::open_in_memory().unwrap();
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

#[test]
fn sessions_round_trip_close_and_cascade() {
    let s = Store::open_in_memory().unwrap();
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

#[test]
fn keys_tenants_and_hourly_creations() {
    let s = Store::open_in_memory().unwrap();
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
