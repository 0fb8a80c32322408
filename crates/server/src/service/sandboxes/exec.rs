//! Commands in a running sandbox: exec (buffered and streamed), publish after each command,
//! the audit of each command.

use super::*;

impl Service {
    /// The running sandbox `id` as the caller may use it: NOT_FOUND when it cannot see it,
    /// FAILED_PRECONDITION when it is not running.
    pub(super) async fn running(
        self: &Arc<Self>,
        caller: &Caller,
        id: &SandboxId,
    ) -> Result<Arc<Live>, ServiceError> {
        // Live resources exist exactly while the store says the sandbox runs: added by a
        // start that is then saved (or undone), taken away first when it stops. Only the
        // error path reads the store.
        if let Some(live) = self.engine.live(id) {
            if !caller.sees_sandbox(&live.tenant, &live.id) {
                return Err(ServiceError::NotFound(format!("sandbox {id} not found")));
            }
            return Ok(live);
        }
        let rec = self.sandbox_for(caller, id).await?;
        self.own(&rec)?;
        Err(ServiceError::FailedPrecondition(format!(
            "sandbox {id} is not running (status {}); start it first",
            status_name(rec.status)
        )))
    }

    pub(super) fn effective_timeout(&self, requested: Option<Duration>) -> Duration {
        let rt = &self.settings.config.runtime;
        requested
            .filter(|d| !d.is_zero())
            .unwrap_or(rt.default_timeout)
            .min(rt.max_timeout)
    }

    pub(super) fn runtime_request(
        &self,
        p: ExecParams,
        live: &Live,
    ) -> Result<agentfense_runtime::ExecRequest, ServiceError> {
        if p.command.trim().is_empty() {
            return Err(ServiceError::required("command"));
        }
        if !p.workdir.is_empty() {
            let rel = p.workdir.strip_prefix("/workspace").unwrap_or(&p.workdir);
            SandboxPath::parse(rel).map_err(|e| {
                ServiceError::InvalidArgument(format!("workdir {:?}: {e}", p.workdir))
            })?;
        }
        Ok(agentfense_runtime::ExecRequest {
            timeout: Some(self.effective_timeout(p.timeout)),
            command: p.command,
            stdin: p.stdin,
            env: live.with_proxy_env(p.env),
            workdir: p.workdir,
        })
    }

    /// After a command: publishes what it changed (automatic mode), on a blocking thread.
    /// Most commands change nothing, and manual-publish sandboxes publish only on request:
    /// both skip the thread hop (a measurable share of a ~2 ms exec round trip).
    ///
    /// A publish that fails is audited (`publish_failed`) and returned: the caller must not
    /// believe the command's changes reached the codebase (they stay in the sandbox's delta,
    /// and its view is unchanged). `exit_code` is the command's, for the message.
    pub(super) async fn after_command(
        self: &Arc<Self>,
        live: &Arc<Live>,
        actor: &Actor,
        exit_code: Option<i32>,
    ) -> Result<(), ServiceError> {
        if live.mount.publish_mode() == PublishMode::Explicit || live.mount.surely_clean() {
            return Ok(());
        }
        let (this, l) = (self.clone(), live.clone());
        let failed = match tokio::task::spawn_blocking(move || {
            this.publish_counted(l.id.as_str(), &l.codebase_id, &l, false)
        })
        .await
        {
            Ok(Ok(Some(report))) if !report.failed.is_empty() => {
                // Some paths could not be written: as much a failure for the caller.
                let n = report.failed.len();
                let (path, why) = &report.failed[0];
                ServiceError::internal(
                    "publishing",
                    format!(
                        "{n} path(s) could not be written, the first {}: {why}",
                        path.display()
                    ),
                )
            }
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => e,
            Err(e) => ServiceError::internal("publishing", e),
        };
        self.audit.record_as(
            actor.clone(),
            AuditEvent::PublishFailed {
                sandbox_id: live.id.to_string(),
                error: crate::error::chain(&failed),
            },
        );
        let ran = match exit_code {
            Some(code) => format!("the command ran (exit code {code})"),
            None => "the command ended".to_owned(),
        };
        Err(ServiceError::internal(
            format!(
                "publishing: {ran} but writing its changes to the codebase failed; they stay \
                 in sandbox {} only",
                live.id
            ),
            failed,
        ))
    }

    /// Publishes (`explicit`: whatever the mode; else only in automatic mode) and adjusts the
    /// codebase's size and file count by what the publish changed: the pending paths are
    /// measured before and after, so the cost follows the change, never the codebase's size.
    /// Conflicts reach the audit log through the filesystem's event channel.
    pub(super) fn publish_counted(
        self: &Arc<Self>,
        sandbox_id: &str,
        cb: &CodebaseId,
        live: &Live,
        explicit: bool,
    ) -> Result<Option<PublishReport>, ServiceError> {
        let pending = live.mount.pending();
        let before = if pending.is_empty() {
            Ok((0, 0))
        } else {
            self.files.usage(cb, &pending)
        };
        // Checked last before writing, and only when something may be written (a manual
        // sandbox writes nothing after a command).
        if explicit || live.mount.publish_mode() != PublishMode::Explicit {
            self.may_publish()?;
        }
        let report = if explicit {
            live.mount.publish().map(Some)
        } else {
            live.mount.command_finished()
        };
        let report = match report {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(sandbox_id, error = %chain(&e), "publish failed");
                return Err(ServiceError::internal("publishing", e));
            }
        };
        let Some(report) = report else {
            return Ok(None);
        };
        for (path, why) in &report.failed {
            tracing::error!(sandbox_id, path = %path.display(), reason = %why, "publish of a path failed");
        }
        if !report.written.is_empty() || !report.deleted.is_empty() {
            match (before, self.files.usage(cb, &pending)) {
                (Ok((s0, n0)), Ok((s1, n1))) => {
                    let _ = self.store.adjust_codebase_stats(
                        cb,
                        s1 as i64 - s0 as i64,
                        n1 as i64 - n0 as i64,
                        SystemTime::now(),
                    );
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(codebase_id = %cb, error = %chain(&e), "codebase stats not updated")
                }
            }
        }
        Ok(Some(report))
    }

    /// A slot for one more command of the sandbox's tenant (`quotas.concurrent_execs`).
    pub(super) fn exec_slot(
        &self,
        live: &Live,
    ) -> Result<(super::super::quota::Slot, crate::metrics::InFlight), ServiceError> {
        let quota = self.settings.config.quotas.of(&live.tenant);
        let slot = self.quota.exec(&live.tenant, &quota)?;
        Ok((slot, crate::metrics::InFlight::start()))
    }

    pub(super) fn audit_command(
        &self,
        actor: &Actor,
        live: &Live,
        session: Option<&SessionId>,
        command: &str,
        (exit_code, duration, timed_out): (i32, Duration, bool),
    ) {
        let result = match (timed_out, exit_code) {
            (true, _) => "timeout",
            (false, 0) => "ok",
            _ => "nonzero",
        };
        crate::metrics::metrics().command(&live.runtime_kind, result, duration.as_secs_f64());
        self.audit.record_as(
            actor.clone(),
            AuditEvent::CommandExecuted {
                sandbox_id: live.id.to_string(),
                session_id: session.map(|s| s.to_string()),
                command: command.to_owned(),
                exit_code,
                duration_ms: duration.as_millis() as u64,
                timed_out,
            },
        );
    }

    /// Exec.
    pub async fn exec(
        self: &Arc<Self>,
        caller: &Caller,
        sandbox_id: &str,
        p: ExecParams,
    ) -> Result<ExecOutcome, ServiceError> {
        let id = Service::sandbox_id(sandbox_id)?;
        let live = self.running(caller, &id).await?;
        let command = p.command.clone();
        let req = self.runtime_request(p, &live)?;
        let _slot = self.exec_slot(&live)?;
        let actor = caller.actor();
        self.before_command(&live, &actor, &command).await;
        let timeout = req.timeout.unwrap_or_default();
        let started = std::time::Instant::now();
        let res = live.runtime.exec(id.as_str(), req).await;
        let published = self
            .after_command(&live, &actor, res.as_ref().ok().map(|r| r.exit_code))
            .await;
        match res {
            Ok(r) => {
                self.audit_command(
                    &actor,
                    &live,
                    None,
                    &command,
                    (r.exit_code, r.duration, false),
                );
                published?;
                Ok(ExecOutcome {
                    stdout: r.stdout,
                    stderr: r.stderr,
                    exit_code: r.exit_code,
                    duration: r.duration,
                })
            }
            Err(e) => {
                let timed_out = e.kind() == ErrorKind::DeadlineExceeded;
                if timed_out {
                    let d = started.elapsed();
                    self.audit_command(&actor, &live, None, &command, (-1, d, true));
                    return Err(ServiceError::DeadlineExceeded(format!(
                        "command timed out after {}",
                        humantime::format_duration(timeout)
                    )));
                }
                crate::metrics::metrics().command(
                    &live.runtime_kind,
                    "error",
                    started.elapsed().as_secs_f64(),
                );
                Err(runtime_error(e))
            }
        }
    }

    /// ExecStream: items arrive on the returned channel; the last is `Exit` or `Error`.
    pub async fn exec_stream(
        self: &Arc<Self>,
        caller: &Caller,
        sandbox_id: &str,
        p: ExecParams,
    ) -> Result<mpsc::Receiver<StreamItem>, ServiceError> {
        let id = Service::sandbox_id(sandbox_id)?;
        let live = self.running(caller, &id).await?;
        let command = p.command.clone();
        let req = self.runtime_request(p, &live)?;
        let slot = self.exec_slot(&live)?;
        self.before_command(&live, &caller.actor(), &command).await;
        let timeout = req.timeout.unwrap_or_default();
        let stream = live
            .runtime
            .exec_stream(id.as_str(), req)
            .await
            .map_err(runtime_error)?;
        Ok(self.pump(live, stream, command, timeout, None, (caller.actor(), slot)))
    }

    /// Forwards a command's stream to the client as [`StreamItem`]s; when it ends, publishes
    /// (per the sandbox's mode) and audits the command. A client that goes away drops the
    /// receiver; dropping the runtime's stream then ends the command.
    pub(super) fn pump(
        self: &Arc<Self>,
        live: Arc<Live>,
        mut stream: agentfense_runtime::ExecStream,
        command: String,
        timeout: Duration,
        session: Option<SessionId>,
        (actor, slot): (Actor, (super::super::quota::Slot, crate::metrics::InFlight)),
    ) -> mpsc::Receiver<StreamItem> {
        let (tx, rx) = mpsc::channel(64);
        let this = self.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let mut outcome: Option<(i32, Duration, bool)> = None;
            let mut published = false;
            while let Some(ev) = stream.next().await {
                let item = match ev {
                    Ok(ExecEvent::Stdout(s)) => StreamItem::Stdout(s),
                    Ok(ExecEvent::Stderr(s)) => StreamItem::Stderr(s),
                    Ok(ExecEvent::Exit {
                        exit_code,
                        duration,
                    }) => {
                        outcome = Some((exit_code, duration, false));
                        // Published before the end is said, so that a failure can be.
                        published = true;
                        match this.after_command(&live, &actor, Some(exit_code)).await {
                            Ok(()) => StreamItem::Exit {
                                exit_code,
                                duration,
                            },
                            Err(e) => StreamItem::Error(e),
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::DeadlineExceeded => {
                        outcome = Some((-1, started.elapsed(), true));
                        let still = if session.is_some() {
                            "; the session is still usable"
                        } else {
                            ""
                        };
                        StreamItem::Error(ServiceError::DeadlineExceeded(format!(
                            "command timed out after {}{still}",
                            humantime::format_duration(timeout)
                        )))
                    }
                    Err(e) => match (&e, &session) {
                        (RuntimeError::SessionClosed { .. }, Some(sid)) => {
                            StreamItem::Error(this.session_closed(sid.clone()).await)
                        }
                        _ => StreamItem::Error(runtime_error(e)),
                    },
                };
                if tx.send(item).await.is_err() {
                    break;
                }
            }
            drop(stream);
            if !published {
                // A timeout or a client gone: the failure, if any, is audited.
                let _ = this.after_command(&live, &actor, None).await;
            }
            if let Some((code, d, timed_out)) = outcome {
                let sess = session.as_ref();
                this.audit_command(&actor, &live, sess, &command, (code, d, timed_out));
            }
            drop(slot);
        });
        rx
    }

    /// Publishes a manual-publish sandbox's pending changes now.
    pub async fn publish(
        self: &Arc<Self>,
        caller: &Caller,
        sandbox_id: &str,
    ) -> Result<PublishReport, ServiceError> {
        let id = Service::sandbox_id(sandbox_id)?;
        let live = self.running(caller, &id).await?;
        let this = self.clone();
        blocking(move || {
            Ok(this
                .publish_counted(live.id.as_str(), &live.codebase_id, &live, true)?
                .unwrap_or_default())
        })
        .await
    }
}
