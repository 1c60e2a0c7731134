//! Where the local stack's CPU goes: per process from `/proc` (user + system time), and inside
//! this process, per DynamoDB operation the embedded emulator serves.
//!
//! The emulator's share is measured from dynoxide's own `request` and `response` events (target
//! `dynoxide::server`, level debug), which it logs on the thread that runs the operation, before
//! and after it: the thread's CPU clock read at each is the operation's CPU time, the HTTP
//! parsing around it excluded.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;

/// CPU time (user + system) by process name, of this process and every process below it.
#[derive(Debug, Clone, Default)]
pub struct ProcessCpu(pub BTreeMap<String, Duration>);

impl ProcessCpu {
    /// Reads `/proc` now. This process is `chat-local`; below it, a process is named by its
    /// command (`ingest`, `generator`, `moto_server`, `cargo-lambda`, …). Processes that already
    /// exited are not counted.
    pub fn sample() -> ProcessCpu {
        let tick = clock_ticks_per_second();
        let me = std::process::id();
        let mut parents: HashMap<u32, u32> = HashMap::new();
        let mut stats: HashMap<u32, (String, u64)> = HashMap::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            // `pid (comm) state ppid … utime stime` (fields 14 and 15); comm may hold spaces.
            let Some((head, rest)) = stat.rsplit_once(')') else { continue };
            let comm = head.split_once('(').map_or("", |(_, c)| c).to_owned();
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let (Some(ppid), Some(utime), Some(stime)) = (
                fields.get(1).and_then(|f| f.parse().ok()),
                fields.get(11).and_then(|f| f.parse::<u64>().ok()),
                fields.get(12).and_then(|f| f.parse::<u64>().ok()),
            ) else {
                continue;
            };
            parents.insert(pid, ppid);
            stats.insert(pid, (comm, utime + stime));
        }
        let below_me = |mut pid: u32| {
            while let Some(&parent) = parents.get(&pid) {
                if parent == me {
                    return true;
                }
                if parent <= 1 {
                    return false;
                }
                pid = parent;
            }
            false
        };
        let mut by_name = BTreeMap::new();
        let mut add = |name: &str, ticks: u64| {
            *by_name.entry(name.to_owned()).or_insert(Duration::ZERO) +=
                Duration::from_secs_f64(ticks as f64 / tick);
        };
        for (pid, (comm, ticks)) in &stats {
            if *pid == me {
                // This process's threads named `load-client` are a benchmark's client, not the stack.
                let client = client_thread_ticks();
                add("chat-local", ticks.saturating_sub(client));
                if client > 0 {
                    add(CLIENT, client);
                }
            } else if below_me(*pid) {
                add(comm, *ticks);
            }
        }
        ProcessCpu(by_name)
    }

    /// What was spent between `earlier` and this sample.
    pub fn since(&self, earlier: &ProcessCpu) -> ProcessCpu {
        ProcessCpu(
            self.0
                .iter()
                .map(|(name, t)| {
                    (name.clone(), t.saturating_sub(earlier.0.get(name).copied().unwrap_or_default()))
                })
                .collect(),
        )
    }

    /// The sum over every process.
    pub fn total(&self) -> Duration {
        self.0.values().sum()
    }
}

/// The name [`ProcessCpu`] gives the threads of this process named [`CLIENT_THREADS`].
pub const CLIENT: &str = "load client";

/// Threads of this process with this name are a benchmark's client: [`ProcessCpu`] counts them
/// apart from the stack.
pub const CLIENT_THREADS: &str = "load-client";

fn client_thread_ticks() -> u64 {
    let mut ticks = 0;
    for entry in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        let Some((head, rest)) = stat.rsplit_once(')') else { continue };
        if !head.ends_with(CLIENT_THREADS) {
            continue;
        }
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| fields.get(n).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        ticks += field(11) + field(12);
    }
    ticks
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// This thread's CPU time so far.
fn thread_cpu() -> Duration {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec, which lives on this stack.
    let read = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    if read != 0 {
        return Duration::ZERO;
    }
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// The emulator's CPU time by operation, as a `tracing` layer over dynoxide's own events. Install
/// it with a filter that lets `dynoxide::server` through at debug ([`EmulatorProfile::filter`]).
#[derive(Clone, Default)]
pub struct EmulatorProfile {
    samples: Arc<Mutex<BTreeMap<String, Vec<Duration>>>>,
}

thread_local! {
    /// The operation running on this thread, and the thread's CPU clock when it started.
    static RUNNING: std::cell::RefCell<Option<(String, Duration)>> = const { std::cell::RefCell::new(None) };
}

impl EmulatorProfile {
    /// The filter that lets through exactly the events this layer reads.
    pub fn filter() -> tracing_subscriber::filter::Targets {
        tracing_subscriber::filter::Targets::new().with_target("dynoxide::server", tracing::Level::DEBUG)
    }

    /// Every operation's CPU time since the last call, by operation; clears them.
    pub fn take(&self) -> BTreeMap<String, Vec<Duration>> {
        std::mem::take(&mut *self.samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

#[derive(Default)]
struct EventFields {
    message: String,
    operation: String,
}

impl Visit for EventFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "operation" {
            value.clone_into(&mut self.operation);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "operation" if self.operation.is_empty() => self.operation = format!("{value:?}"),
            _ => {}
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for EmulatorProfile {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = EventFields::default();
        event.record(&mut fields);
        match fields.message.as_str() {
            "request" => RUNNING.with(|r| *r.borrow_mut() = Some((fields.operation, thread_cpu()))),
            "response" | "error response" => {
                let Some((operation, started)) = RUNNING.with(|r| r.borrow_mut().take()) else { return };
                if operation != fields.operation {
                    return;
                }
                let spent = thread_cpu().saturating_sub(started);
                let mut samples = self.samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                samples.entry(operation).or_default().push(spent);
            }
            _ => {}
        }
    }
}

/// Lambda's memory size for one full vCPU.
pub const MB_PER_VCPU: f64 = 1769.0;

/// The memory sizes (MB) `template.yaml` gives by default: the generator's and the stream's
/// parameters, and every other function's. `make bench-turn` prices these; a template test
/// keeps them equal.
pub const GENERATOR_MEMORY_MB: u32 = 256;
pub const STREAM_MEMORY_MB: u32 = 128;
pub const OTHER_MEMORY_MB: u32 = 256;

/// The root `cpu` group, where a thread goes back before it ends.
const ROOT_TASKS: &str = "/sys/fs/cgroup/cpu/tasks";

/// A cgroup v1 `cpu` group whose CFS quota gives its processes (or threads) the CPU share
/// Lambda gives a function of `memory_mb`; removed on drop. Needs root.
pub struct CpuLimit {
    dir: PathBuf,
    memory_mb: u32,
    share: f64,
}

impl CpuLimit {
    /// A group for `memory_mb`, quota per 100 ms period.
    pub fn new(memory_mb: u32) -> Result<CpuLimit, String> {
        Self::named(memory_mb, "all")
    }

    /// A group for `memory_mb` of its own, when several run at once (`name` tells them apart).
    pub fn named(memory_mb: u32, name: &str) -> Result<CpuLimit, String> {
        let share = (f64::from(memory_mb) / MB_PER_VCPU).min(1.0);
        let dir =
            PathBuf::from(format!("/sys/fs/cgroup/cpu/chat-bench-{}-{name}-{memory_mb}", std::process::id()));
        let period = 100_000u64;
        let quota = ((period as f64) * share).round().max(1000.0) as u64;
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(dir.join("cpu.cfs_period_us"), period.to_string()))
            .and_then(|()| std::fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string()))
            .map_err(|e| {
                let _ = std::fs::remove_dir(&dir);
                format!(
                    "BENCH_MEMORY_MB needs a writable cgroup v1 cpu controller, so root ({}: {e}); set BENCH_MEMORY_MB=none to run unthrottled",
                    dir.display()
                )
            })?;
        Ok(CpuLimit { dir, memory_mb, share })
    }

    /// Whether groups can be made here (root, and a cgroup v1 `cpu` controller).
    pub fn available() -> bool {
        CpuLimit::named(128, "probe").is_ok()
    }

    /// The memory size it stands for.
    pub fn memory_mb(&self) -> u32 {
        self.memory_mb
    }

    /// `, 128 MB (0.072 vCPU)`, for headings.
    pub fn label(&self) -> String {
        format!(", {} MB ({:.3} vCPU)", self.memory_mb, self.share)
    }

    /// Where a process writes `0` to join the group.
    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// How often the quota held the group back so far: (periods it ran in, periods it was
    /// throttled in, time throttled).
    pub fn throttled(&self) -> (u64, u64, Duration) {
        let stat = std::fs::read_to_string(self.dir.join("cpu.stat")).unwrap_or_default();
        let field = |name: &str| {
            stat.lines().find_map(|line| line.strip_prefix(name)?.trim().parse::<u64>().ok()).unwrap_or(0)
        };
        (field("nr_periods "), field("nr_throttled "), Duration::from_nanos(field("throttled_time ")))
    }

    /// Moves the calling thread (only it) into the group.
    pub fn join_this_thread(&self) -> Result<(), String> {
        std::fs::write(self.dir.join("tasks"), this_thread_id()?)
            .map_err(|e| format!("joining {}: {e}", self.dir.display()))
    }

    /// Moves the calling thread back to the root group, so the group can be removed once every
    /// thread that joined it has left.
    pub fn leave_this_thread() {
        if let Ok(tid) = this_thread_id() {
            let _ = std::fs::write(ROOT_TASKS, tid);
        }
    }
}

fn this_thread_id() -> Result<String, String> {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|path| path.file_name().and_then(|n| n.to_str()).map(str::to_owned))
        .ok_or_else(|| "cannot tell this thread's id from /proc/thread-self".to_owned())
}

impl Drop for CpuLimit {
    fn drop(&mut self) {
        // A thread that just ended may still be counted in the group for a moment.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("warning: could not remove {} (rmdir it once its threads are gone)", self.dir.display());
    }
}
