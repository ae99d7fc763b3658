//! A real `dataflow` process (`serve`, `worker`, …) on a given config, so a test can kill,
//! stop or resume it outright.

use std::process::{Command, Stdio};

use dataflow_platform::Config;

/// The command that runs `dataflow <role>` on `config`, written to `<data_dir>/<name>.toml`;
/// its output goes to `log` when given, else nowhere. Configuration from the environment
/// (`DATABASE_URL`, `DATAFLOW_…`) is removed, so the process runs on exactly `config`.
pub fn dataflow_command(
    config: &Config,
    role: &str,
    name: &str,
    log: Option<std::fs::File>,
) -> Command {
    std::fs::create_dir_all(&config.data_dir).unwrap();
    let config_file = config.data_dir.join(format!("{name}.toml"));
    std::fs::write(&config_file, toml::to_string(config).unwrap()).unwrap();
    let (stdout, stderr) = match log {
        Some(f) => (f.try_clone().unwrap().into(), f.into()),
        None => (Stdio::null(), Stdio::null()),
    };
    let mut command = Command::new(env!("CARGO_BIN_EXE_dataflow"));
    for (name, _) in std::env::vars() {
        if dataflow_platform::config::read_by_dataflow(&name) {
            command.env_remove(name);
        }
    }
    command
        .arg("--config")
        .arg(&config_file)
        .arg(role)
        .env("DATAFLOW_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(stdout)
        .stderr(stderr);
    command
}

/// Sends `signal` (`STOP`, `CONT`, …) to a process the test started, by its pid.
pub fn signal(child: &std::process::Child, signal: &str) {
    let sent = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(sent.success(), "kill -{signal} {}", child.id());
}

/// A process the test started, killed when this is dropped, so a failing test leaves none
/// running.
pub struct Spawned(pub std::process::Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
