//! The server under test: started on a private data directory, driven over its API.

use super::*;

pub(super) struct Server {
    pub(super) child: Child,
    pub(super) grpc: String,
    pub(super) data: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(super) fn pinned(cpu: &Option<usize>, program: &str) -> Command {
    match cpu {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", &c.to_string(), program]);
            cmd
        }
        None => Command::new(program),
    }
}

/// Starts `agentfense serve` on `data`, with `extra` YAML configuration.
pub(super) fn start_server_with(
    exe: &Path,
    data: &Path,
    cpu: &Option<usize>,
    extra: &str,
) -> anyhow::Result<Server> {
    std::fs::create_dir_all(data)?;
    let config = data.with_extension("yaml");
    // No per-owner quota: the density and concurrency cases start many sandboxes.
    std::fs::write(
        &config,
        format!("sandbox:\n  max_per_user: 0\nlogging:\n  level: warn\n{extra}"),
    )?;
    let mut cmd = pinned(cpu, &exe.to_string_lossy());
    // The server (and its mounts) must not outlive a bench that is killed.
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no shared state.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))
                .map_err(Into::into)
        });
    }
    cmd.args(["serve", "--grpc-addr", "127.0.0.1:0", "--http-addr", ""])
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .context("the server did not start")?;
        if let Some(a) = line.strip_prefix("agentfense: gRPC listening on ")
            && !a.starts_with("unix:")
        {
            return Ok(Server {
                child,
                grpc: a.to_owned(),
                data: data.to_owned(),
            });
        }
    }
}

/// Adds `authorization: Bearer <key>` to each call when a key is set.
#[derive(Clone)]
pub(super) struct Key(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Key {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(k) = &self.0 {
            req.metadata_mut().insert("authorization", k.clone());
        }
        Ok(req)
    }
}

type Authed = tonic::service::interceptor::InterceptedService<Channel, Key>;

pub(super) struct Api {
    pub(super) cb: CodebaseServiceClient<Authed>,
    pub(super) sb: SandboxServiceClient<Authed>,
    /// `agentfense.v1.Review`.
    pub(super) rv: agentfense_proto::agentfense_v1::review_client::ReviewClient<Authed>,
}

impl Api {
    pub(super) async fn connect(addr: &str) -> anyhow::Result<Api> {
        Api::connect_with_key(addr, None).await
    }

    /// A client that presents `key` (an authenticated server).
    pub(super) async fn connect_with_key(addr: &str, key: Option<&str>) -> anyhow::Result<Api> {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        let key = Key(match key {
            Some(k) => Some(format!("Bearer {k}").parse()?),
            None => None,
        });
        Ok(Api {
            cb: CodebaseServiceClient::with_interceptor(ch.clone(), key.clone()),
            sb: SandboxServiceClient::with_interceptor(ch.clone(), key.clone())
                .max_decoding_message_size(4 << 20),
            rv: agentfense_proto::agentfense_v1::review_client::ReviewClient::with_interceptor(
                ch, key,
            )
            .max_decoding_message_size(256 << 20),
        })
    }

    pub(super) async fn codebase(&mut self, name: &str) -> anyhow::Result<String> {
        Ok(self
            .cb
            .create_codebase(v1::CreateCodebaseRequest {
                name: name.into(),
                owner_id: "bench".into(),
            })
            .await?
            .into_inner()
            .id)
    }

    pub(super) async fn upload(&mut self, cb: &str, path: &str, data: &[u8]) -> anyhow::Result<()> {
        let mut msgs = vec![v1::UploadChunk {
            content: Some(Content::Metadata(v1::upload_chunk::Metadata {
                codebase_id: cb.into(),
                file_path: path.into(),
                total_size: data.len() as i64,
            })),
        }];
        msgs.extend(data.chunks(64 << 10).map(|c| v1::UploadChunk {
            content: Some(Content::Data(c.to_vec())),
        }));
        self.cb
            .upload_files(tonic::codegen::tokio_stream::iter(msgs))
            .await?;
        Ok(())
    }

    pub(super) async fn sandbox(&mut self, cb: &str) -> anyhow::Result<String> {
        self.sandbox_with(cb, &[("**", v1::Permission::Write, 0)], &[])
            .await
    }

    pub(super) async fn sandbox_with(
        &mut self,
        cb: &str,
        rules: &[(&str, v1::Permission, i32)],
        labels: &[(&str, &str)],
    ) -> anyhow::Result<String> {
        Ok(self
            .sb
            .create_sandbox(v1::CreateSandboxRequest {
                codebase_id: cb.into(),
                permissions: rules
                    .iter()
                    .map(|(p, l, pr)| v1::PermissionRule {
                        pattern: (*p).into(),
                        r#type: v1::PatternType::Glob as i32,
                        permission: *l as i32,
                        priority: *pr,
                    })
                    .collect(),
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect(),
                runtime: v1::RuntimeType::Bwrap as i32,
                ..Default::default()
            })
            .await?
            .into_inner()
            .id)
    }

    pub(super) async fn start(&mut self, sb: &str) -> anyhow::Result<()> {
        self.sb
            .start_sandbox(v1::StartSandboxRequest {
                sandbox_id: sb.into(),
            })
            .await?;
        Ok(())
    }

    pub(super) async fn exec(&mut self, sb: &str, command: &str) -> anyhow::Result<v1::ExecResult> {
        let r = self
            .sb
            .exec(v1::ExecRequest {
                sandbox_id: sb.into(),
                command: command.into(),
                timeout: Some(Duration::from_secs(300).into()),
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(
            r.exit_code == 0,
            "{command:?} exited {} in the sandbox: {}",
            r.exit_code,
            r.stderr
        );
        Ok(r)
    }

    pub(super) async fn destroy(&mut self, sb: &str) -> anyhow::Result<()> {
        self.sb
            .destroy_sandbox(v1::DestroySandboxRequest {
                sandbox_id: sb.into(),
            })
            .await?;
        Ok(())
    }
}
