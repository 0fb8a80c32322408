//! Create, start, stop, destroy; expiry, restart recovery and shutdown; the wiring of the
//! policy filesystem to the runtime.

use super::*;

impl Service {
    /// CreateSandbox.
    pub async fn create_sandbox(
        self: &Arc<Self>,
        caller: &Caller,
        req: CreateSandbox,
    ) -> Result<SandboxRecord, ServiceError> {
        let cb_id = Service::codebase_id(&req.codebase_id)?;
        // Rules are compiled now so that a bad pattern is INVALID_ARGUMENT at create, not a
        // failed start later.
        Policy::compile(req.rules.clone())
            .map_err(|e| ServiceError::InvalidArgument(format!("permissions: {}", chain(&e))))?;
        let kind = req.runtime.unwrap_or(self.settings.config.runtime.kind);
        if !self.engine.runtimes.contains_key(&kind) {
            let mut have: Vec<&str> = self.engine.runtimes.keys().map(|k| k.as_str()).collect();
            have.sort_unstable();
            return Err(ServiceError::FailedPrecondition(format!(
                "runtime {kind} is not available on this server (available: {})",
                if have.is_empty() {
                    "none".to_owned()
                } else {
                    have.join(", ")
                }
            )));
        }
        if kind == RuntimeKind::Bwrap && !req.image.is_empty() {
            return Err(ServiceError::InvalidArgument(format!(
                "image {:?} was given but the bwrap runtime runs no images; use runtime DOCKER",
                req.image
            )));
        }
        check_labels(&req.labels, self.settings.config.runtime.allow_network)?;
        if self.egress_policy(&req.labels)?.is_some() && req.labels.contains_key(LABEL_NETWORK) {
            return Err(ServiceError::InvalidArgument(format!(
                "labels {LABEL_NETWORK} and {} exclude each other: the egress policy is the \
                 sandbox's only way out",
                super::super::egress::LABEL_EGRESS
            )));
        }
        let rt_cfg = &self.settings.config.runtime;
        let mut resources = req.resources;
        if let Some(bytes) = disk_label(&req.labels)? {
            resources.disk_bytes = bytes;
        }
        let resources = resources.or(rt_cfg.default_resources);
        if let Some((field, value, ceiling)) = resources.exceeds(&rt_cfg.max_resources) {
            let value = if value == 0 {
                "0 (unlimited)".to_owned()
            } else {
                value.to_string()
            };
            return Err(ServiceError::InvalidArgument(format!(
                "resources.{field} = {value} is above this server's ceiling \
                 runtime.max_resources.{field} = {ceiling}"
            )));
        }
        let codebase = self.codebase(caller, &cb_id).await?;
        let max = self.settings.config.sandbox.max_per_user;
        // The sandbox belongs to its codebase's tenant (an admin may work on any).
        let tenant = codebase.tenant.clone();
        let quota = self.settings.config.quotas.of(&tenant);
        let now = SystemTime::now();
        let expires_in = req
            .expires_in
            .unwrap_or(self.settings.config.sandbox.default_expiration);
        let rec = SandboxRecord {
            id: SandboxId::generate(),
            codebase_id: cb_id,
            owner_id: codebase.owner_id.clone(),
            tenant,
            rules: req.rules,
            status: SandboxStatus::Pending,
            status_reason: None,
            labels: req.labels,
            runtime: kind,
            image: req.image,
            resources,
            created_at: now,
            started_at: None,
            stopped_at: None,
            expires_at: now.checked_add(expires_in),
            node: self.node.clone(),
            lost_at: None,
        };
        let store = self.store.clone();
        let r = rec.clone();
        blocking(move || {
            match store.get_node(&r.node)? {
                Some(n) if n.lost_at.is_some() => {
                    // A stale server (its node declared lost while it was away) must not
                    // make sandboxes nobody would ever look after.
                    return Err(ServiceError::Unavailable(format!(
                        "node {} was declared lost: this server is stopping and takes no new \
                         sandboxes",
                        r.node
                    )));
                }
                Some(n) if n.draining => {
                    return Err(ServiceError::Unavailable(format!(
                        "node {} is draining: it takes no new sandboxes (`agentfense nodes \
                         undrain {}` to lift it)",
                        r.node, r.node
                    )));
                }
                _ => {}
            }
            let hit = store.insert_sandbox_limited(
                &r,
                max,
                quota.sandboxes,
                quota.creations_per_hour,
                now,
            )?;
            Err(ServiceError::ResourceExhausted(match hit {
                Ok(()) => return Ok(()),
                Err(LimitHit::PerHour(n)) => format!(
                    "tenant {:?} created {n} sandboxes in the last hour (quota \
                     quotas.creations_per_hour = {}); try again later",
                    r.tenant, quota.creations_per_hour
                ),
                Err(LimitHit::Tenant(n)) => format!(
                    "tenant {:?} has {n} sandboxes (quota quotas.sandboxes = {}); destroy one \
                     first",
                    r.tenant, quota.sandboxes
                ),
                Err(LimitHit::Owner(n)) => format!(
                    "owner {:?} already has {n} sandboxes (limit sandbox.max_per_user = {max}); \
                     destroy one first",
                    r.owner_id
                ),
            }))
        })
        .await?;
        self.audit.record_as(
            caller.actor(),
            AuditEvent::SandboxCreated {
                sandbox_id: rec.id.to_string(),
                codebase_id: rec.codebase_id.to_string(),
                owner_id: rec.owner_id.clone(),
                user_id: rec.owner_id.clone(),
                rules: rec.rules.clone(),
                runtime: rec.runtime.to_string(),
                image: rec.image.clone(),
                resources: rec.resources,
                labels: rec.labels.clone(),
            },
        );
        Ok(rec)
    }

    /// GetSandbox.
    pub async fn get_sandbox(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
    ) -> Result<SandboxRecord, ServiceError> {
        let id = Service::sandbox_id(id)?;
        self.sandbox_for(caller, &id).await
    }

    /// ListSandboxes: those the caller may see.
    pub async fn list_sandboxes(
        self: &Arc<Self>,
        caller: &Caller,
        codebase_id: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<Page<SandboxRecord>, ServiceError> {
        let (size, after) = page_args(page_size, page_token)?;
        let cb = if codebase_id.is_empty() {
            None
        } else {
            Some(Service::codebase_id(codebase_id)?)
        };
        let store = self.store.clone();
        let tenant = caller.list_tenant().map(str::to_owned);
        let only = caller.sandbox.clone();
        blocking(move || {
            let filter = crate::store::SandboxFilter {
                codebase: cb.as_ref(),
                tenant: tenant.as_deref(),
                id: only.as_ref(),
            };
            Ok(store.list_sandboxes(filter, after, size)?)
        })
        .await
    }

    /// StartSandbox: PENDING, STOPPED or ERROR → RUNNING.
    pub async fn start_sandbox(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
    ) -> Result<SandboxRecord, ServiceError> {
        let id = Service::sandbox_id(id)?;
        self.sandbox_for(caller, &id).await?;
        let lock = self.engine.lock(&id);
        let _g = lock.lock().await;
        let mut rec = self.sandbox(&id).await?;
        self.own(&rec)?;
        if rec.status == SandboxStatus::Running {
            return Err(ServiceError::FailedPrecondition(format!(
                "sandbox {id} is already running"
            )));
        }
        let quota = self.settings.config.quotas.of(&rec.tenant);
        let _reservation = if quota.running_sandboxes > 0 {
            let (slot, starting) = self.quota.reserve_start(&rec.tenant);
            let store = self.store.clone();
            let t = rec.tenant.clone();
            let usage = blocking(move || Ok(store.tenant_usage(&t)?)).await?;
            super::super::quota::Counters::check_start(
                &rec.tenant,
                usage.running,
                starting,
                &quota,
            )?;
            Some(slot)
        } else {
            None
        };
        let started = std::time::Instant::now();
        match self.bring_up(&rec).await {
            Ok(()) => {
                crate::metrics::metrics()
                    .sandbox_start_seconds
                    .get_or_create(&crate::metrics::RuntimeLabel {
                        runtime: rec.runtime.to_string(),
                    })
                    .observe(started.elapsed().as_secs_f64());
                rec.status = SandboxStatus::Running;
                rec.status_reason = None;
                rec.started_at = Some(SystemTime::now());
                if let Err(e) = self.save(&rec).await {
                    // Not recorded as running: nothing may run in it either.
                    self.tear_down(&rec, false).await;
                    return Err(e);
                }
                self.audit.record_as(
                    caller.actor(),
                    AuditEvent::SandboxStarted {
                        sandbox_id: id.to_string(),
                    },
                );
                Ok(rec)
            }
            Err(e) => {
                let reason = match &e {
                    ServiceError::Internal { context, source } => format!("{context}: {source}"),
                    other => other.to_string(),
                };
                tracing::error!(sandbox_id = %id, error = %reason, "start failed");
                self.audit.record_as(
                    caller.actor(),
                    AuditEvent::SandboxStartFailed {
                        sandbox_id: id.to_string(),
                        error: reason.clone(),
                    },
                );
                rec.status = SandboxStatus::Error;
                rec.status_reason = Some(reason.clone());
                self.save(&rec).await?;
                Err(match e {
                    ServiceError::Internal { source, .. } => ServiceError::Internal {
                        context: format!("failed to start sandbox {id}: {reason}"),
                        source,
                    },
                    other => other,
                })
            }
        }
    }

    /// Mounts the policy filesystem and starts the environment. Undoes everything on failure.
    pub(super) async fn bring_up(
        self: &Arc<Self>,
        rec: &SandboxRecord,
    ) -> Result<(), ServiceError> {
        let runtime = self
            .engine
            .runtimes
            .get(&rec.runtime)
            .cloned()
            .ok_or_else(|| {
                ServiceError::FailedPrecondition(format!(
                    "runtime {} is not available on this server",
                    rec.runtime
                ))
            })?;
        // The server's mandatory floor ranks above the sandbox's own rules; it applies as the
        // config says at each start.
        let floor = self.settings.config.policy.mandatory.clone();
        let policy = Policy::compile_with_floor(rec.rules.clone(), floor)
            .map_err(|e| ServiceError::internal("compiling stored rules", e))?;
        let (mountpoint, delta) = self.mount_dirs(&rec.id);
        let lower = self.files.dir(&rec.codebase_id);
        let network = match rec.labels.get(LABEL_NETWORK).map(String::as_str) {
            Some("enabled") | Some("host") => NetworkMode::Host,
            _ => NetworkMode::None,
        };
        let mut r = rec.resources;
        // Sandboxes created before disk quotas existed get today's default.
        let defaults = self.settings.config.runtime.default_resources;
        if r.disk_bytes == 0 {
            r.disk_bytes = defaults.disk_bytes;
        }
        if r.disk_inodes == 0 {
            r.disk_inodes = defaults.disk_inodes;
        }
        let nz = |v: u64| (v > 0).then_some(v);
        let spec = agentfense_runtime::SandboxSpec {
            image: (!rec.image.is_empty()).then(|| rec.image.clone()),
            workspace: mountpoint.clone(),
            limits: (&r).into(),
            network,
            // /tmp (with $HOME) counts against the disk quota: it is that size at most.
            tmp_size: nz(match self.settings.config.runtime.tmp_bytes {
                0 => r.disk_bytes,
                cap => r.disk_bytes.min(cap),
            }),
            workspace_path: rec.labels.get(labels::LABEL_WORKSPACE_PATH).cloned(),
            home: None,
        };
        let mp = mountpoint.clone();
        blocking(move || {
            if let Some(parent) = mp.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| ServiceError::internal("creating the mount directory", e))?;
                use std::os::unix::fs::PermissionsExt;
                // allow_other mounts: keep the path to them private to the service.
                let _ = std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700));
            }
            std::fs::create_dir_all(&mp)
                .map_err(|e| ServiceError::internal("creating the mountpoint", e))
        })
        .await?;
        // Created before the mount: the runtime decides which host uid the sandbox user has
        // (one of its own with a user namespace), and the files must show that owner.
        let sid = rec.id.to_string();
        match runtime.create(&sid, spec).await {
            Ok(()) | Err(RuntimeError::SandboxExists { .. }) => {}
            Err(e) => return Err(runtime_error(e)),
        }
        let mut cfg = FsConfig::new(rec.id.to_string(), lower, delta, mountpoint, policy);
        cfg.mounts = self.engine.mounts.clone();
        // The server sees (and invalidates) every change it makes: the kernel may keep what
        // it learned across an agent's pauses.
        cfg.entry_ttl = self.settings.config.sandbox.cache_ttl;
        cfg.attr_ttl = self.settings.config.sandbox.cache_ttl;
        // Files appear owned by the sandbox user, so that tools like git do not refuse a
        // repository owned by someone else. Access is decided by the rules, not by owners.
        cfg.owner = Some(runtime.sandbox_owner(&sid).unwrap_or(SANDBOX_OWNER));
        if rec.labels.get(LABEL_PUBLISH).map(String::as_str) == Some("manual") {
            cfg.publish_mode = PublishMode::Explicit;
        }
        cfg.io_mode = io_mode(&rec.labels);
        cfg.max_open_files = self.settings.config.runtime.open_files_per_sandbox;
        cfg.disk_bytes = r.disk_bytes;
        cfg.disk_inodes = r.disk_inodes;
        let mounter = self.engine.mounter.clone();
        let mount = match blocking(move || {
            mounter
                .mount(cfg)
                .map_err(|e| ServiceError::internal("mounting the policy filesystem", e))
        })
        .await
        {
            Ok(m) => m,
            Err(e) => {
                let _ = runtime.destroy(&sid).await;
                return Err(e);
            }
        };
        let denials = self.spawn_fs_audit_bridge(&*mount, &rec.tenant);
        if let Err(e) = runtime.start(&sid).await.map_err(runtime_error) {
            let _ = runtime.destroy(&sid).await;
            let _ = tokio::task::spawn_blocking(move || mount.unmount()).await;
            return Err(e);
        }
        let egress = match self.egress_policy(&rec.labels) {
            Ok(None) => Ok(None),
            Ok(Some(policy)) => match runtime.network_namespace(&sid) {
                Some(ns) => self
                    .start_egress(&sid, &rec.tenant, policy, ns)
                    .await
                    .map(Some),
                None => Err(ServiceError::FailedPrecondition(format!(
                    "sandbox {sid}: the runtime cannot give its network namespace for the \
                     egress proxy (a Docker daemon on another machine cannot have one)"
                ))),
            },
            Err(e) => Err(e),
        };
        let egress = match egress {
            Ok(e) => e,
            Err(e) => {
                let _ = runtime.destroy(&sid).await;
                let _ = tokio::task::spawn_blocking(move || mount.unmount()).await;
                return Err(e);
            }
        };
        match runtime.scratch(&sid) {
            Some(tmp) => mount.count_scratch(tmp, self.settings.config.runtime.tmp_bytes),
            None => tracing::warn!(
                sandbox_id = %sid,
                "the sandbox's /tmp cannot be seen from here: it is sized at the disk quota but \
                 not counted with the delta"
            ),
        }
        self.engine
            .tenants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rec.id.to_string(), rec.tenant.clone());
        self.engine
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                rec.id.clone(),
                Arc::new(Live {
                    mount,
                    runtime,
                    id: rec.id.clone(),
                    codebase_id: rec.codebase_id.clone(),
                    tenant: rec.tenant.clone(),
                    egress,
                    auto_checkpoint: rec.labels.get(labels::LABEL_CHECKPOINT).map(String::as_str)
                        == Some("auto"),
                    runtime_kind: rec.runtime.to_string(),
                    denials,
                }),
            );
        Ok(())
    }

    /// Forwards the mount's events to the audit trail; returns the count of its denials.
    pub(super) fn spawn_fs_audit_bridge(
        self: &Arc<Self>,
        mount: &dyn Mounted,
        tenant: &str,
    ) -> Arc<std::sync::atomic::AtomicU64> {
        let rx = mount.events();
        let audit = self.audit.clone();
        let actor = Actor::tenant(tenant);
        let denials = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = denials.clone();
        let _ = std::thread::Builder::new()
            .name("fs-audit".into())
            .spawn(move || {
                // Ends when the mount is gone and its senders are dropped. Waits for room in
                // the writer's queue: a storm of denials slows down (see agentfense_fs::audit)
                // instead of losing events.
                for ev in rx {
                    if let agentfense_fs::AuditEvent::Denied { count, .. } = &ev {
                        counted.fetch_add((*count).max(1), std::sync::atomic::Ordering::Relaxed);
                    }
                    audit.record_wait(actor.clone(), fs_event(ev));
                }
            });
        denials
    }

    /// StopSandbox: RUNNING → STOPPED. Kills everything inside, publishes what is pending in
    /// automatic mode, unmounts. The delta is kept; Start reuses it.
    pub async fn stop_sandbox(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
    ) -> Result<SandboxRecord, ServiceError> {
        let id = Service::sandbox_id(id)?;
        self.sandbox_for(caller, &id).await?;
        let lock = self.engine.lock(&id);
        let _g = lock.lock().await;
        let mut rec = self.sandbox(&id).await?;
        self.own(&rec)?;
        if rec.status != SandboxStatus::Running {
            return Err(ServiceError::FailedPrecondition(format!(
                "sandbox {id} is not running (status {})",
                status_name(rec.status)
            )));
        }
        self.tear_down(&rec, false).await;
        rec.status = SandboxStatus::Stopped;
        rec.stopped_at = Some(SystemTime::now());
        self.save(&rec).await?;
        self.audit.record_as(
            caller.actor(),
            AuditEvent::SandboxStopped {
                sandbox_id: id.to_string(),
                reason: None,
            },
        );
        Ok(rec)
    }

    /// Stops the environment and unmounts (best effort: errors are logged; the sandbox ends
    /// up stopped either way). With `destroy`, the runtime forgets the sandbox.
    pub(super) async fn tear_down(self: &Arc<Self>, rec: &SandboxRecord, destroy: bool) {
        let sid = rec.id.to_string();
        let live = self.engine.take_live(&rec.id);
        let runtime = live
            .as_ref()
            .map(|l| l.runtime.clone())
            .or_else(|| self.engine.runtimes.get(&rec.runtime).cloned());
        if let Some(rt) = &runtime {
            stop_runtime(rt.as_ref(), &sid, destroy).await;
        }
        let now = SystemTime::now();
        let store = self.store.clone();
        let id = rec.id.clone();
        let _ = blocking(move || Ok(store.close_sessions_of(&id, now)?)).await;
        if let Some(live) = live {
            let this = self.clone();
            let cb = rec.codebase_id.clone();
            let sid2 = sid.clone();
            let tenant = rec.tenant.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(e) = this.publish_counted(&sid2, &cb, &live, false) {
                    tracing::warn!(sandbox_id = %sid2, error = %chain(&e), "publish at stop failed: the changes stay in the delta");
                    this.audit.record_as(Actor::tenant(&tenant), AuditEvent::PublishFailed {
                        sandbox_id: sid2.clone(),
                        error: chain(&e),
                    });
                }
                unmount(live, &sid2);
            })
            .await;
        }
    }

    /// DestroySandbox: from any state. Stops it, removes its delta and metadata.
    pub async fn destroy_sandbox(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
    ) -> Result<(), ServiceError> {
        let id = Service::sandbox_id(id)?;
        self.sandbox_for(caller, &id).await?;
        self.destroy_inner(&id, Some(caller.actor())).await
    }

    /// Destroys a sandbox: on request (`actor` = who asked) or by the reaper (`None`).
    pub(super) async fn destroy_inner(
        self: &Arc<Self>,
        id: &SandboxId,
        actor: Option<Actor>,
    ) -> Result<(), ServiceError> {
        self.sandbox(id).await?;
        let lock = self.engine.lock(id);
        let _g = lock.lock().await;
        let rec = self.sandbox(id).await?;
        self.tear_down(&rec, true).await;
        let (mountpoint, delta) = self.mount_dirs(id);
        let lost = self.settings.paths.mounts.join("lost").join(id.as_str());
        let store = self.store.clone();
        let id2 = id.clone();
        blocking(move || {
            let _ = std::fs::remove_dir(&mountpoint);
            // Its delta, and what was kept of it if it was ever lost with a node.
            for dir in [&delta, &lost] {
                if let Err(e) = std::fs::remove_dir_all(dir)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(path = %dir.display(), error = %e, "cannot remove delta");
                }
            }
            store.delete_tokens_of(id2.as_str())?;
            Ok(store.delete_sandbox(&id2)?)
        })
        .await?;
        self.engine
            .locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        match actor {
            None => self.audit.record_as(
                Actor::tenant(&rec.tenant),
                AuditEvent::SandboxExpired {
                    sandbox_id: id.to_string(),
                },
            ),
            Some(actor) => self.audit.record_as(
                actor,
                AuditEvent::SandboxDestroyed {
                    sandbox_id: id.to_string(),
                },
            ),
        }
        Ok(())
    }

    /// Destroys every sandbox past its expiry; returns how many.
    pub async fn reap_expired(self: &Arc<Self>) -> usize {
        let store = self.store.clone();
        let all = match blocking(move || Ok(store.all_sandboxes()?)).await {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "reaper cannot list sandboxes");
                return 0;
            }
        };
        let now = SystemTime::now();
        let mut n = 0;
        for s in all
            .into_iter()
            .filter(|s| s.expires_at.is_some_and(|t| t <= now))
        {
            match self.destroy_inner(&s.id, None).await {
                Ok(()) => n += 1,
                Err(e) => {
                    tracing::warn!(sandbox_id = %s.id, error = %e, "cannot destroy expired sandbox")
                }
            }
        }
        n
    }

    /// At startup: clear stale mounts, close sessions whose shells died with the previous
    /// process, and bring sandboxes that were running back up (or mark them STOPPED with the
    /// reason, restartable).
    pub async fn recover(self: &Arc<Self>) {
        let fuse_dir = self.settings.paths.mounts.join("fuse");
        let mounter = self.engine.mounter.clone();
        let cleaned = tokio::task::spawn_blocking(move || mounter.cleanup_stale(&fuse_dir)).await;
        if let Ok(Ok(paths)) = cleaned
            && !paths.is_empty()
        {
            tracing::info!(
                count = paths.len(),
                "detached stale FUSE mounts from a previous run"
            );
        }
        for (kind, rt) in &self.engine.runtimes {
            match rt.cleanup_stale().await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(runtime = %kind, count = n, "removed leftovers of a previous run")
                }
                Err(e) => {
                    tracing::warn!(runtime = %kind, error = %chain(&e), "cannot clean leftovers of a previous run")
                }
            }
        }
        let store = self.store.clone();
        let all = match blocking(move || Ok(store.all_sandboxes()?)).await {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "recovery cannot list sandboxes");
                return;
            }
        };
        for mut rec in all {
            let store = self.store.clone();
            let id = rec.id.clone();
            let _ = blocking(move || Ok(store.close_sessions_of(&id, SystemTime::now())?)).await;
            if !self.adopt(&mut rec).await {
                continue;
            }
            if rec.lost_at.is_some() {
                // Declared lost with this node while it was away: what is left of it here
                // is gone by contract, and must not come back.
                self.drop_lost_leftovers(&rec).await;
                continue;
            }
            if rec.status != SandboxStatus::Running {
                continue;
            }
            match self.bring_up(&rec).await {
                Ok(()) => {
                    rec.started_at = Some(SystemTime::now());
                    tracing::info!(sandbox_id = %rec.id, "sandbox restarted after server restart");
                    self.audit.record_as(
                        Actor::tenant(&rec.tenant),
                        AuditEvent::SandboxStarted {
                            sandbox_id: rec.id.to_string(),
                        },
                    );
                }
                Err(e) => {
                    rec.status = SandboxStatus::Stopped;
                    rec.stopped_at = Some(SystemTime::now());
                    rec.status_reason = Some(format!(
                        "server restarted and could not restart it: {}",
                        chain(&e)
                    ));
                    tracing::warn!(sandbox_id = %rec.id, error = %chain(&e), "sandbox could not be restarted");
                }
            }
            let _ = self.save(&rec).await;
        }
    }

    /// Whether `rec` is this node's, after taking it over where that loses nothing. A
    /// sandbox recorded before nodes existed (no node): this server takes it over when
    /// nothing is lost by it, that is when its delta is in this data directory or it never
    /// ran (no delta anywhere). A sandbox of another node is left alone (its record
    /// untouched): its changes are on that node's disk, and [`Service::own`] refuses to
    /// start or review it here. True when it is this node's.
    async fn adopt(self: &Arc<Self>, rec: &mut SandboxRecord) -> bool {
        if rec.node == self.node {
            return true;
        }
        let (_, delta) = self.mount_dirs(&rec.id);
        if !rec.node.is_empty() || !(delta.is_dir() || rec.started_at.is_none()) {
            tracing::info!(sandbox_id = %rec.id, node = %rec.node, "not this node's sandbox: left alone");
            return false;
        }
        let store = self.store.clone();
        let (id, node) = (rec.id.clone(), self.node.clone());
        if blocking(move || Ok(store.set_sandbox_node(&id, &node)?))
            .await
            .is_err()
        {
            return false;
        }
        rec.node = self.node.clone();
        true
    }

    /// Moves what a sandbox declared lost left in this data directory (its delta) out of
    /// the way, to `<mount_path>/lost/<id>`: it never runs again, but an operator can still
    /// salvage files from it by hand (then delete it).
    async fn drop_lost_leftovers(self: &Arc<Self>, rec: &SandboxRecord) {
        let (mountpoint, delta) = self.mount_dirs(&rec.id);
        let lost = self.settings.paths.mounts.join("lost");
        let id = rec.id.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_dir(&mountpoint);
            if !delta.exists() {
                return;
            }
            let to = lost.join(id.as_str());
            let moved = std::fs::create_dir_all(&lost).and_then(|()| std::fs::rename(&delta, &to));
            match moved {
                Ok(()) => tracing::warn!(
                    sandbox_id = %id,
                    kept_in = %to.display(),
                    "sandbox was declared lost with this node while it was away: it will not \
                     run again; its unpublished changes are kept for manual salvage only"
                ),
                Err(e) => {
                    tracing::warn!(path = %delta.display(), error = %e, "cannot move a lost sandbox's delta aside")
                }
            }
        })
        .await;
    }

    /// Declares lost every other node silent for `nodes.lost_after` (see
    /// [`crate::store::Store::mark_lost_nodes`]), and audits what that did; how many.
    pub async fn mark_lost_nodes(self: &Arc<Self>) -> usize {
        // A database only this server can open (an SQLite file) has no other live node: a
        // node there is a data directory that was replaced, whose sandboxes stay refused
        // ("lives on node ...") rather than lost.
        if !self.store.shared() {
            return 0;
        }
        let store = self.store.clone();
        let (after, keeper) = (self.settings.config.nodes.lost_after, self.node.clone());
        let holder = self
            .fence
            .as_ref()
            .map_or_else(|| keeper.clone(), |f| f.holder().to_owned());
        let lost = match blocking(move || Ok(store.mark_lost_nodes(after, &keeper, &holder)?)).await
        {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %chain(&e), "cannot look for lost nodes");
                return 0;
            }
        };
        for node in &lost {
            let last = humantime::format_rfc3339_seconds(node.heartbeat_at).to_string();
            tracing::error!(
                node = %node.id,
                host = %node.host,
                last_heartbeat = %last,
                sandboxes = node.sandboxes.len(),
                moved = node.moved.len(),
                "node declared lost: no heartbeat for nodes.lost_after; its sandboxes are in \
                 ERROR and their unpublished changes are gone"
            );
            crate::metrics::metrics().nodes_lost_total.inc();
            self.audit.record(AuditEvent::NodeLost {
                node: node.id.clone(),
                host: node.host.clone(),
                last_heartbeat: last,
                sandboxes: node.sandboxes.len(),
                moved: node.moved.len(),
            });
            for (id, tenant) in &node.sandboxes {
                self.audit.record_as(
                    Actor::tenant(tenant),
                    AuditEvent::SandboxLost {
                        sandbox_id: id.to_string(),
                        node: node.id.clone(),
                    },
                );
            }
        }
        lost.len()
    }

    /// FAILED_PRECONDITION unless `rec` is this node's: a sandbox whose delta is on another
    /// machine must never run, or be reviewed, here with an empty one. A sandbox lost with
    /// its node is nobody's.
    pub(super) fn own(&self, rec: &SandboxRecord) -> Result<(), ServiceError> {
        if rec.lost_at.is_some() {
            return Err(ServiceError::FailedPrecondition(format!(
                "sandbox {} was {}",
                rec.id,
                rec.status_reason
                    .as_deref()
                    .unwrap_or("lost with its node; destroy it and create a new one")
            )));
        }
        if rec.node == self.node {
            return Ok(());
        }
        Err(ServiceError::FailedPrecondition(if rec.node.is_empty() {
            format!(
                "sandbox {} was made before nodes existed and its changes are not in this \
                 server's data directory; destroy it and create a new one",
                rec.id
            )
        } else {
            format!(
                "sandbox {} lives on node {} (this server is node {}): its unpublished changes \
                 are on that machine, published work is in the codebase; use that server, or \
                 destroy it and create a new one",
                rec.id, rec.node, self.node
            )
        }))
    }

    /// At shutdown: stop every running sandbox's processes and unmount, keeping their
    /// status RUNNING in the store so the next start brings them back. Works from the live
    /// resources alone, never the store: it must finish when the database is unreachable
    /// (a server that lost its claim stops exactly then). Nothing is published here: the
    /// deltas are kept, and the next command after the restart publishes what is pending.
    pub async fn shutdown(self: &Arc<Self>) {
        let ids: Vec<SandboxId> = self
            .engine
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        for id in ids {
            let Some(live) = self.engine.take_live(&id) else {
                continue;
            };
            let sid = id.to_string();
            stop_runtime(live.runtime.as_ref(), &sid, false).await;
            let _ = tokio::task::spawn_blocking(move || unmount(live, &sid)).await;
        }
    }
}

/// Stops (or destroys) a sandbox's processes; one already gone is no error.
async fn stop_runtime(rt: &dyn Runtime, sid: &str, destroy: bool) {
    let res = if destroy {
        rt.destroy(sid).await
    } else {
        rt.stop(sid).await
    };
    match res {
        Ok(())
        | Err(RuntimeError::SandboxNotFound { .. })
        | Err(RuntimeError::NotRunning { .. }) => {}
        Err(e) => tracing::warn!(sandbox_id = %sid, error = %chain(&e), "runtime stop failed"),
    }
}

/// Unmounts a sandbox's filesystem (blocking), unless a request in flight still holds it:
/// then the last holder's drop unmounts.
fn unmount(live: Arc<Live>, sid: &str) {
    match Arc::try_unwrap(live) {
        Ok(live) => {
            if let Err(e) = live.mount.unmount() {
                tracing::warn!(sandbox_id = %sid, error = %chain(&e), "unmount failed");
            }
        }
        Err(_) => {
            tracing::debug!(sandbox_id = %sid, "mount still in use; unmounting on last release")
        }
    }
}

pub(super) fn fs_event(ev: agentfense_fs::AuditEvent) -> AuditEvent {
    match ev {
        agentfense_fs::AuditEvent::Denied {
            sandbox_id,
            op,
            path,
            level,
            rule,
            count,
        } => AuditEvent::PermissionDenied {
            sandbox_id,
            operation: op.to_owned(),
            path,
            level: Level::as_str(level).to_owned(),
            rule: rule.map(|(_, pattern)| pattern),
            count,
        },
        agentfense_fs::AuditEvent::PublishConflict {
            sandbox_id,
            conflict,
        } => AuditEvent::PublishConflict {
            sandbox_id,
            path: conflict.path.display().to_string(),
            detail: format!(
                "was {:?}, found {:?}; this sandbox's version was published",
                conflict.expected, conflict.found
            ),
        },
        agentfense_fs::AuditEvent::PublishRefused {
            sandbox_id,
            path,
            target,
        } => AuditEvent::PublishRefused {
            sandbox_id,
            path,
            target,
        },
        agentfense_fs::AuditEvent::LimitExceeded {
            sandbox_id,
            limit,
            detail,
        } => AuditEvent::ResourceLimitExceeded {
            sandbox_id,
            limit: limit.to_owned(),
            command: String::new(),
            detail,
        },
        agentfense_fs::AuditEvent::Dropped { sandbox_id, count } => {
            AuditEvent::AuditEventsDropped {
                sandbox_id: Some(sandbox_id),
                count,
            }
        }
    }
}

impl Service {
    /// Acts on tenant blocks (`agentfense tenants block`, written to the store by another
    /// process), on every call: stops every running sandbox of a blocked tenant (also one
    /// started by a request admitted just before the block), records `tenant_blocked` the
    /// first time. The tenant's credentials already fail at the gate. Returns how many
    /// sandboxes were stopped.
    pub async fn enforce_blocks(self: &Arc<Self>) -> usize {
        let store = self.store.clone();
        let found =
            blocking(move || Ok((store.blocks_to_enforce()?, store.running_of_blocked()?))).await;
        let (new_blocks, running) = match found {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "cannot read tenant blocks");
                return 0;
            }
        };
        let mut stopped: HashMap<String, Vec<String>> = HashMap::new();
        for (sid, tenant) in running {
            let Ok(id) = SandboxId::parse(&sid) else {
                continue;
            };
            let lock = self.engine.lock(&id);
            let _g = lock.lock().await;
            let Ok(mut rec) = self.sandbox(&id).await else {
                continue;
            };
            // Another node's sandbox runs there; this server can neither stop nor record it.
            if rec.status != SandboxStatus::Running || self.own(&rec).is_err() {
                continue;
            }
            self.tear_down(&rec, false).await;
            rec.status = SandboxStatus::Stopped;
            rec.stopped_at = Some(SystemTime::now());
            let reason = format!("tenant {tenant:?} is blocked");
            rec.status_reason = Some(reason.clone());
            if self.save(&rec).await.is_ok() {
                self.audit.record_as(
                    Actor::tenant(&tenant),
                    AuditEvent::SandboxStopped {
                        sandbox_id: sid.clone(),
                        reason: Some(reason),
                    },
                );
                stopped.entry(tenant).or_default().push(sid);
            }
        }
        let n = stopped.values().map(Vec::len).sum();
        for (tenant, reason) in new_blocks {
            let store = self.store.clone();
            let t = tenant.clone();
            if blocking(move || Ok(store.block_enforced(&t, SystemTime::now())?))
                .await
                .is_err()
            {
                continue;
            }
            let list = stopped.remove(&tenant).unwrap_or_default();
            tracing::warn!(tenant = %tenant, stopped = list.len(), "tenant blocked");
            self.audit.record_as(
                Actor::tenant(&tenant),
                AuditEvent::TenantBlocked {
                    blocked_tenant: tenant.clone(),
                    reason,
                    sandboxes_stopped: list,
                },
            );
        }
        n
    }
}
