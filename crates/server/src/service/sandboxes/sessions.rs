//! Sessions: long-lived shells in a running sandbox.

use super::*;

impl Service {
    /// CreateSession.
    pub async fn create_session(
        self: &Arc<Self>,
        caller: &Caller,
        sandbox_id: &str,
        shell: String,
        env: BTreeMap<String, String>,
    ) -> Result<SessionRecord, ServiceError> {
        let id = Service::sandbox_id(sandbox_id)?;
        let live = self.running(caller, &id).await?;
        let shell = if shell.is_empty() {
            "/bin/sh".to_owned()
        } else {
            shell
        };
        let spec = agentfense_runtime::SessionSpec {
            shell: shell.clone(),
            env: live.with_proxy_env(env.clone()),
            workdir: String::new(),
        };
        let sess = live
            .runtime
            .session_create(id.as_str(), spec)
            .await
            .map_err(runtime_error)?;
        let session_id = SessionId::parse(&sess)
            .map_err(|e| ServiceError::internal("runtime returned a malformed session id", e))?;
        let rec = SessionRecord {
            id: session_id,
            sandbox_id: id,
            shell,
            env,
            status: SessionStatus::Active,
            created_at: SystemTime::now(),
            closed_at: None,
        };
        let store = self.store.clone();
        let r = rec.clone();
        if let Err(e) = blocking(move || Ok(store.insert_session(&r)?)).await {
            // Unrecorded, it could never be closed: its shell goes now.
            let _ = live
                .runtime
                .session_destroy(rec.sandbox_id.as_str(), &sess)
                .await;
            return Err(e);
        }
        Ok(rec)
    }

    /// The session, or NOT_FOUND: also when the caller cannot see its sandbox.
    pub(super) async fn session(
        self: &Arc<Self>,
        caller: &Caller,
        id: &SessionId,
    ) -> Result<SessionRecord, ServiceError> {
        let store = self.store.clone();
        let id2 = id.clone();
        let not_found = || ServiceError::NotFound(format!("session {id} not found"));
        let sess = blocking(move || Ok(store.get_session(&id2)?))
            .await?
            .ok_or_else(not_found)?;
        let visible = match self.engine.live(&sess.sandbox_id) {
            Some(live) => caller.sees_sandbox(&live.tenant, &live.id),
            None => self.sandbox_for(caller, &sess.sandbox_id).await.is_ok(),
        };
        if visible { Ok(sess) } else { Err(not_found()) }
    }

    /// GetSession.
    pub async fn get_session(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
    ) -> Result<SessionRecord, ServiceError> {
        let id = Service::session_id(id)?;
        self.session(caller, &id).await
    }

    /// ListSessions (an unknown sandbox, or one the caller cannot see, lists as empty, like
    /// the original).
    pub async fn list_sessions(
        self: &Arc<Self>,
        caller: &Caller,
        sandbox_id: &str,
    ) -> Result<Vec<SessionRecord>, ServiceError> {
        let id = Service::sandbox_id(sandbox_id)?;
        if self.sandbox_for(caller, &id).await.is_err() {
            return Ok(Vec::new());
        }
        let store = self.store.clone();
        blocking(move || Ok(store.list_sessions(&id)?)).await
    }

    /// DestroySession: kills the shell and everything it started.
    pub async fn destroy_session(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
    ) -> Result<(), ServiceError> {
        let id = Service::session_id(id)?;
        let sess = self.session(caller, &id).await?;
        if let Some(live) = self.engine.live(&sess.sandbox_id) {
            match live
                .runtime
                .session_destroy(sess.sandbox_id.as_str(), id.as_str())
                .await
            {
                Ok(())
                | Err(RuntimeError::SessionNotFound { .. })
                | Err(RuntimeError::SessionClosed { .. }) => {}
                Err(e) => return Err(runtime_error(e)),
            }
        }
        let store = self.store.clone();
        blocking(move || Ok(store.delete_session(&id)?)).await?;
        Ok(())
    }

    /// SessionExec.
    pub async fn session_exec(
        self: &Arc<Self>,
        caller: &Caller,
        session_id: &str,
        command: String,
        timeout: Option<Duration>,
    ) -> Result<ExecOutcome, ServiceError> {
        let (sid, live) = self.session_call(caller, session_id, &command).await?;
        let _slot = self.exec_slot(&live)?;
        let actor = caller.actor();
        self.before_command(&live, &actor, &command).await;
        let timeout = self.effective_timeout(timeout);
        let started = std::time::Instant::now();
        let res = live
            .runtime
            .session_exec(live.id.as_str(), sid.as_str(), &command, Some(timeout))
            .await;
        let published = self
            .after_command(&live, &actor, res.as_ref().ok().map(|r| r.exit_code))
            .await;
        match res {
            Ok(r) => {
                self.audit_command(
                    &actor,
                    &live,
                    Some(&sid),
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
            Err(RuntimeError::SessionClosed { .. }) => Err(self.session_closed(sid).await),
            Err(e) if e.kind() == ErrorKind::DeadlineExceeded => {
                let d = started.elapsed();
                self.audit_command(&actor, &live, Some(&sid), &command, (-1, d, true));
                Err(ServiceError::DeadlineExceeded(format!(
                    "command timed out after {}; the session is still usable",
                    humantime::format_duration(timeout)
                )))
            }
            Err(e) => {
                crate::metrics::metrics().command(
                    &live.runtime_kind,
                    "error",
                    started.elapsed().as_secs_f64(),
                );
                Err(runtime_error(e))
            }
        }
    }

    /// Like [`Service::session_exec`], with the output streamed as the command produces it.
    pub async fn session_exec_stream(
        self: &Arc<Self>,
        caller: &Caller,
        session_id: &str,
        command: String,
        timeout: Option<Duration>,
    ) -> Result<mpsc::Receiver<StreamItem>, ServiceError> {
        let (sid, live) = self.session_call(caller, session_id, &command).await?;
        let slot = self.exec_slot(&live)?;
        self.before_command(&live, &caller.actor(), &command).await;
        let timeout = self.effective_timeout(timeout);
        let stream = match live
            .runtime
            .session_exec_stream(live.id.as_str(), sid.as_str(), &command, Some(timeout))
            .await
        {
            Ok(s) => s,
            Err(RuntimeError::SessionClosed { .. }) => return Err(self.session_closed(sid).await),
            Err(e) => return Err(runtime_error(e)),
        };
        Ok(self.pump(
            live,
            stream,
            command,
            timeout,
            Some(sid),
            (caller.actor(), slot),
        ))
    }

    /// Checks a session call: a command, an open session, a running sandbox.
    async fn session_call(
        self: &Arc<Self>,
        caller: &Caller,
        session_id: &str,
        command: &str,
    ) -> Result<(SessionId, Arc<Live>), ServiceError> {
        let sid = Service::session_id(session_id)?;
        if command.trim().is_empty() {
            return Err(ServiceError::required("command"));
        }
        let sess = self.session(caller, &sid).await?;
        if sess.status == SessionStatus::Closed {
            return Err(ServiceError::FailedPrecondition(format!(
                "session {sid} is closed"
            )));
        }
        let live = self.running(caller, &sess.sandbox_id).await?;
        Ok((sid, live))
    }

    /// Records that the session's shell is gone; the error to answer.
    pub(super) async fn session_closed(self: &Arc<Self>, sid: SessionId) -> ServiceError {
        let store = self.store.clone();
        let s2 = sid.clone();
        let _ = blocking(move || Ok(store.close_session(&s2, SystemTime::now())?)).await;
        ServiceError::FailedPrecondition(format!("session {sid} is closed"))
    }
}
