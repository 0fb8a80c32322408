//! Latency of the Docker runtime against the docker CLI on the same image (not a test):
//! sandbox start (create + start + first exec) vs `docker run --rm IMAGE true`, and the exec
//! round trip of `true` vs `docker exec CONTAINER true`.
//!
//! Usage: `agentfense-docker-bench [IMAGE] [ITERATIONS]` (defaults: `agentfense-test-base`, 10),
//! as root with a running dockerd.

use std::process::Command;
use std::time::{Duration, Instant};

use agentfense_docker::{DockerConfig, DockerRuntime};
use agentfense_runtime::{ExecRequest, Runtime, SandboxSpec};
use anyhow::{Context, bail};

fn stats(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mean = v.iter().map(|d| ms(*d)).sum::<f64>() / v.len() as f64;
    println!(
        "{name:<44} n={:<3} min {:>7.1} ms  p50 {:>7.1} ms  mean {:>7.1} ms  max {:>7.1} ms",
        v.len(),
        ms(v[0]),
        ms(v[v.len() / 2]),
        mean,
        ms(v[v.len() - 1])
    );
}

fn docker_cli(args: &[&str]) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let out = Command::new("docker")
        .args(args)
        .output()
        .context("running docker")?;
    let took = t.elapsed();
    if !out.status.success() {
        bail!("docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(took)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let image = args.next().unwrap_or_else(|| "agentfense-test-base".into());
    let n: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(10);
    let ws = std::env::temp_dir().join(format!("agentfense-docker-bench-{}", std::process::id()));
    std::fs::create_dir_all(&ws)?;
    std::os::unix::fs::chown(&ws, Some(1000), Some(1000))?;
    let cfg = DockerConfig {
        default_image: image.clone(),
        ..Default::default()
    };
    let (tx, _rx) = tokio::sync::mpsc::channel(64);
    let rt = DockerRuntime::connect(cfg, tx).await?;
    let spec = SandboxSpec {
        image: None,
        workspace: ws.clone(),
        limits: Default::default(),
        network: Default::default(),
        tmp_size: None,
        workspace_path: None,
        home: None,
    };
    let t_true = || ExecRequest {
        command: "true".into(),
        ..Default::default()
    };

    // Warm up caches (image layers, daemon) once.
    rt.create("bench-warm", spec.clone()).await?;
    rt.start("bench-warm").await?;
    rt.exec("bench-warm", t_true()).await?;
    rt.destroy("bench-warm").await?;
    docker_cli(&["run", "--rm", "--network", "none", &image, "true"])?;

    let mut start = Vec::new();
    let mut destroy = Vec::new();
    for i in 0..n {
        let id = format!("bench-{i}");
        let t = Instant::now();
        rt.create(&id, spec.clone()).await?;
        rt.start(&id).await?;
        let r = rt.exec(&id, t_true()).await?;
        start.push(t.elapsed());
        anyhow::ensure!(r.exit_code == 0, "first exec failed: {r:?}");
        let t = Instant::now();
        rt.destroy(&id).await?;
        destroy.push(t.elapsed());
    }
    let mut run = Vec::new();
    for _ in 0..n {
        run.push(docker_cli(&[
            "run",
            "--rm",
            "--network",
            "none",
            &image,
            "true",
        ])?);
    }

    rt.create("bench-exec", spec.clone()).await?;
    rt.start("bench-exec").await?;
    let cid = rt.container_id("bench-exec").await?;
    let mut exec = Vec::new();
    let mut cli_exec = Vec::new();
    for _ in 0..(n * 3) {
        let t = Instant::now();
        rt.exec("bench-exec", t_true()).await?;
        exec.push(t.elapsed());
        cli_exec.push(docker_cli(&["exec", &cid, "true"])?);
    }
    let sid = rt.session_create("bench-exec", Default::default()).await?;
    let mut sess = Vec::new();
    for _ in 0..(n * 3) {
        let t = Instant::now();
        rt.session_exec("bench-exec", &sid, "true", None).await?;
        sess.push(t.elapsed());
    }
    rt.destroy("bench-exec").await?;
    let _ = std::fs::remove_dir(&ws);

    println!("image {image}, {n} iterations (exec: {})", n * 3);
    stats("runtime start (create+start+first exec)", start);
    stats("docker run --rm --network none IMAGE true", run);
    stats("runtime destroy (force remove)", destroy);
    stats("runtime exec `true` round trip", exec);
    stats("docker exec CONTAINER true", cli_exec);
    stats("runtime session_exec `true` round trip", sess);
    Ok(())
}
