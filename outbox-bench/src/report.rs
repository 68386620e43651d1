//! Output: the header (machine, date, commit), tables, `BENCH` lines and the goal summary.

use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

/// One table of a scenario, printed as Markdown, followed by its `BENCH` lines.
pub(crate) struct Table {
    title: String,
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
    notes: Vec<String>,
    bench: Vec<String>,
}

impl Table {
    pub(crate) fn new(title: impl Into<String>, headers: &[&str]) -> Table {
        Table {
            title: title.into(),
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
            notes: Vec::new(),
            bench: Vec::new(),
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub(crate) fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// Keep going when one run fails: note the error under the table (and on stderr) and
    /// return `None`.
    pub(crate) fn soft<T>(&mut self, what: &str, result: anyhow::Result<T>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("{what} failed: {e:#}");
                self.note(format!("{what}: FAILED: {e:#}"));
                None
            }
        }
    }

    /// A machine-readable figure: `BENCH <name> <value> <unit>`.
    pub(crate) fn bench(&mut self, name: &str, value: f64, unit: &str) {
        let v = if matches!(unit, "msg/s" | "tx/s" | "KiB" | "count") {
            format!("{value:.0}")
        } else {
            format!("{value:.3}")
        };
        self.bench.push(format!("BENCH {name} {v} {unit}"));
    }

    pub(crate) fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, c) in row.iter().enumerate() {
                if i < widths.len() {
                    widths[i] = widths[i].max(c.chars().count());
                }
            }
        }
        let line = |cells: &[String]| -> String {
            let mut s = String::from("|");
            for (i, w) in widths.iter().enumerate() {
                let c = cells.get(i).map(String::as_str).unwrap_or("");
                let pad = w - c.chars().count().min(*w);
                if i == 0 {
                    let _ = write!(s, " {c}{} |", " ".repeat(pad));
                } else {
                    let _ = write!(s, " {}{c} |", " ".repeat(pad));
                }
            }
            s
        };
        let mut out = format!("\n### {}\n\n", self.title);
        out.push_str(&line(&self.headers));
        out.push('\n');
        let mut sep = String::from("|");
        for (i, w) in widths.iter().enumerate() {
            if i == 0 {
                let _ = write!(sep, "{}|", "-".repeat(w + 2));
            } else {
                let _ = write!(sep, "{}:|", "-".repeat(w + 1));
            }
        }
        out.push_str(&sep);
        out.push('\n');
        for row in &self.rows {
            out.push_str(&line(row));
            out.push('\n');
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for n in &self.notes {
                let _ = writeln!(out, "- {n}");
            }
        }
        out
    }

    pub(crate) fn print(&self) {
        println!("{}", self.render());
        for b in &self.bench {
            println!("{b}");
        }
    }
}

/// A goal of the issue and what was measured.
pub(crate) struct Goal {
    pub(crate) name: String,
    pub(crate) target: String,
    pub(crate) measured: String,
    pub(crate) met: bool,
}

/// Goals met or missed, printed at the end.
#[derive(Default)]
pub(crate) struct Summary {
    goals: Vec<Goal>,
}

impl Summary {
    pub(crate) fn goal(&mut self, name: String, target: &str, measured: String, met: bool) {
        self.goals.push(Goal {
            name,
            target: target.to_string(),
            measured,
            met,
        });
    }

    pub(crate) fn print(&self) {
        if self.goals.is_empty() {
            return;
        }
        let mut t = Table::new("Goals", &["figure", "goal", "measured", "met"]);
        for g in &self.goals {
            t.row(vec![
                g.name.clone(),
                g.target.clone(),
                g.measured.clone(),
                if g.met { "yes" } else { "**no**" }.to_string(),
            ]);
        }
        t.print();
        let missed = self.goals.iter().filter(|g| !g.met).count();
        println!(
            "\n{} of {} goals met{}",
            self.goals.len() - missed,
            self.goals.len(),
            if missed > 0 {
                " (see the notes above)"
            } else {
                ""
            }
        );
    }
}

pub(crate) fn rate(r: f64) -> String {
    format!("{r:.0}")
}

pub(crate) fn ratio(r: f64) -> String {
    if r.is_finite() {
        format!("{r:.2}")
    } else {
        "n/a".to_string()
    }
}

pub(crate) fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn first_line(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()?
            .trim()
            .to_string(),
    )
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

fn mem_total() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown".to_string())
}

/// The header lines: machine, date, commit, toolchain.
pub(crate) fn header() -> Vec<String> {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let commit =
        first_line("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let rustc = first_line("rustc", &["--version"]).unwrap_or_else(|| "unknown".into());
    vec![
        format!(
            "date: {}",
            outbox_core::chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC")
        ),
        format!(
            "commit: {commit}{}",
            if dirty > 0 {
                format!(" (+{dirty} locally modified tracked files)")
            } else {
                String::new()
            }
        ),
        format!(
            "machine: {cpus} CPUs (nproc), {}, {} RAM, Linux {kernel}",
            cpu_model(),
            mem_total()
        ),
        format!(
            "build: {} ({rustc})",
            if cfg!(debug_assertions) {
                "DEBUG — figures are meaningless, use --release"
            } else {
                "release"
            }
        ),
    ]
}

/// A field of `/proc/self/status` in KiB (`VmRSS`, `VmHWM`).
pub(crate) fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// The `q`-quantile (0..=1) of sorted values, nearest rank.
// The rank is within 0..=len (q is clamped to 0..=1): the casts cannot lose.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub(crate) fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// CPU use over a run: busy CPUs of the machine and of this process on average, and CPU
/// seconds by process group (database, brokers, this process, everything else).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CpuUse {
    /// Busy CPUs of the whole machine (the servers, this process, and anyone else's load).
    pub(crate) machine: f64,
    /// CPUs this process used (the relay or producer under test).
    pub(crate) process: f64,
    /// CPU seconds of the database (`postgres`, `mariadbd`, `mysqld` processes).
    pub(crate) postgres: f64,
    /// CPU seconds of RabbitMQ (`beam.smp`).
    pub(crate) rabbitmq: f64,
    /// CPU seconds of the Kafka-protocol broker (`tansu`, `nisshi`).
    pub(crate) tansu: f64,
    /// CPU seconds of this process.
    pub(crate) bench: f64,
    /// CPU seconds of every other process.
    pub(crate) other: f64,
}

impl CpuUse {
    pub(crate) fn cell(&self) -> String {
        format!("{:.1} / {:.1}", self.machine, self.process)
    }

    /// The rate at which the run's CPU cost per message (database + broker + this process)
    /// would keep every CPU of the machine busy: the most this machine can do for that work.
    pub(crate) fn limit(&self, messages: u64) -> f64 {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let secs = self.postgres + self.rabbitmq + self.tansu + self.bench;
        if secs > 0.0 {
            cpus * messages as f64 / secs
        } else {
            f64::NAN
        }
    }

    /// CPU microseconds per message of the database, the broker, this process and the rest:
    /// what the run cost the machine, less sensitive to other load than a rate.
    pub(crate) fn per_message(&self, messages: u64) -> String {
        if messages == 0 {
            return "-".into();
        }
        let us = |secs: f64| secs * 1e6 / messages as f64;
        format!(
            "{:.0} / {:.0} / {:.0} / {:.0}",
            us(self.postgres),
            us(self.rabbitmq + self.tansu),
            us(self.bench),
            us(self.other)
        )
    }
}

/// Reads `/proc` at the start and the end of a run.
pub(crate) struct CpuMeter {
    machine: (u64, u64),
    process: u64,
    groups: std::collections::HashMap<u32, (Group, u64)>,
    started: std::time::Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    Postgres,
    Rabbitmq,
    Tansu,
    Bench,
    Other,
}

/// (busy, total) jiffies of the machine.
fn machine_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    (busy, busy + get(3) + get(4))
}

/// (command name, utime + stime jiffies) of a `/proc/<pid>/stat` text.
fn parse_stat(stat: &str) -> Option<(&str, u64)> {
    // The command name (field 2) is in parentheses and may hold spaces.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = &stat[open + 1..close];
    let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // f[0] is field 3 (state): utime is field 14, stime field 15.
    let get = |i: usize| {
        f.get(i - 3)
            .and_then(|x| x.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some((comm, get(14) + get(15)))
}

/// utime + stime jiffies of this process.
fn process_jiffies() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| parse_stat(&s).map(|(_, j)| j))
        .unwrap_or(0)
}

/// Every process's group and CPU jiffies.
fn group_jiffies() -> std::collections::HashMap<u32, (Group, u64)> {
    let me = std::process::id();
    let mut out = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((comm, jiffies)) = parse_stat(&stat) else {
            continue;
        };
        let group = if pid == me {
            Group::Bench
        } else if comm == "postgres" || comm == "mariadbd" || comm == "mysqld" {
            Group::Postgres
        } else if comm.starts_with("beam") || comm == "erl_child_setup" {
            Group::Rabbitmq
        } else if comm == "tansu" || comm == "nisshi" {
            Group::Tansu
        } else {
            Group::Other
        };
        out.insert(pid, (group, jiffies));
    }
    out
}

/// Clock ticks per second of `/proc` times (USER_HZ, 100 on Linux).
const USER_HZ: f64 = 100.0;

impl CpuMeter {
    pub(crate) fn start() -> CpuMeter {
        CpuMeter {
            machine: machine_jiffies(),
            process: process_jiffies(),
            groups: group_jiffies(),
            started: std::time::Instant::now(),
        }
    }

    pub(crate) fn stop(&self) -> CpuUse {
        let (busy, total) = machine_jiffies();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let d_total = total.saturating_sub(self.machine.1) as f64;
        let machine = if d_total > 0.0 {
            busy.saturating_sub(self.machine.0) as f64 / d_total * cpus
        } else {
            0.0
        };
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let process = process_jiffies().saturating_sub(self.process) as f64 / USER_HZ / secs;
        let mut use_ = CpuUse {
            machine,
            process,
            ..CpuUse::default()
        };
        for (pid, (group, now)) in group_jiffies() {
            // A process that started during the run counts from zero.
            let before = self
                .groups
                .get(&pid)
                .filter(|(g, _)| *g == group)
                .map_or(0, |(_, j)| *j);
            let d = now.saturating_sub(before) as f64 / USER_HZ;
            match group {
                Group::Postgres => use_.postgres += d,
                Group::Rabbitmq => use_.rabbitmq += d,
                Group::Tansu => use_.tansu += d,
                Group::Bench => use_.bench += d,
                Group::Other => use_.other += d,
            }
        }
        use_
    }
}

/// Busy CPUs of the whole machine over `window`, before anything of ours runs.
pub(crate) async fn background_cpus(window: Duration) -> f64 {
    let meter = CpuMeter::start();
    tokio::time::sleep(window).await;
    meter.stop().machine
}
