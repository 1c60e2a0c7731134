//! Child processes and ports: every child runs under `infra/supervise.sh`, which stops it when
//! this process exits.

use crate::{fail, StackError};
use std::net::TcpListener as StdListener;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

pub(crate) fn free_port(preferred: u16) -> Result<u16, StackError> {
    let listener = StdListener::bind(("127.0.0.1", preferred))
        .map_err(|e| fail(format!("port {preferred} on 127.0.0.1 is not free ({e}); set another port")))?;
    Ok(listener.local_addr().map_err(fail)?.port())
}

pub(crate) async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut ready: F) -> Result<(), StackError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ready().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(fail(format!("{what} did not become ready within {timeout:?}")))
}

/// A command run under `infra/supervise.sh`, so it dies with this process.
pub(crate) fn supervised(root: &Path, program: &std::ffi::OsStr) -> Command {
    let mut cmd = Command::new(root.join("infra/supervise.sh"));
    cmd.arg(std::process::id().to_string()).arg(program).current_dir(root).stdin(Stdio::null());
    cmd
}

/// A running `supervise.sh`. Dropping it (say, when a later step of the start fails) asks it to
/// stop its command with SIGTERM, which it traps; SIGKILL (tokio's `kill_on_drop`) would kill
/// only the script and leave the command it started running.
pub(crate) struct Supervisor(pub(crate) Child);

impl Drop for Supervisor {
    fn drop(&mut self) {
        if let Some(pid) = self.0.id() {
            let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        }
    }
}
