//! Keeping vCPUs awake. On a VM a CPU with nothing to run halts, and waking a halted vCPU goes
//! through the hypervisor: tens of microseconds that land on whichever round trip happened to
//! find its peer's CPU asleep, and make rows bimodal. One `SCHED_IDLE` spinner per CPU keeps
//! the CPUs out of halt; it runs only when nothing else wants the CPU and yields at once to
//! any other thread (its scheduling weight is ~0.3 % of a normal thread's). This is the
//! situation of a busy inference host, and the floors measured this way match a bare-metal
//! ping-pong.
//!
//! Placement: where the client and the daemons run. A ping-pong between two threads costs
//! differently on one core and across cores, and if the OS chooses, each connection lands on
//! one or the other and stays there — rows become bimodal again. So the benchmark pins: the
//! daemons' threads (and the floors' echo threads, and Redis) on the server CPUs, the calling
//! threads (and the Python and worker processes) on the client CPUs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Placement {
    /// Client on the first CPU, daemons on the second (a client and a server on different
    /// cores, as on an inference host).
    Spread,
    /// Everything on the first CPU.
    Same,
    /// No pinning: the OS decides (on a VM, rows may become bimodal).
    Os,
}

/// CPUs of the client side and of the server side.
#[derive(Debug, Clone, Default)]
pub struct Sides {
    pub client: Vec<usize>,
    pub server: Vec<usize>,
}

static SIDES: Mutex<Option<Sides>> = Mutex::new(None);

fn sides() -> Option<Sides> {
    SIDES.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Decides the sides and pins the calling thread to the client side. Returns a description.
pub fn place(p: Placement) -> String {
    let all = allowed_cpus_of_process();
    let s = match (p, all.as_slice()) {
        (Placement::Os, _) | (_, []) => return "not pinned".into(),
        (Placement::Spread, [c, s, ..]) => Sides {
            client: vec![*c],
            server: vec![*s],
        },
        (_, [c, ..]) => Sides {
            client: vec![*c],
            server: vec![*c],
        },
    };
    let text = format!(
        "client on CPU {:?}, daemons on CPU {:?}",
        s.client, s.server
    );
    pin_current(&s.client);
    *SIDES.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
    text
}

/// Pins the calling thread to the server side (for echo threads and daemon start-up).
pub fn enter_server_side() {
    if let Some(s) = sides() {
        pin_current(&s.server);
    }
}

/// Pins the calling thread back to the client side.
pub fn enter_client_side() {
    if let Some(s) = sides() {
        pin_current(&s.client);
    }
}

/// Runs `f` with the calling thread on the server side: threads and processes it starts
/// inherit that placement.
pub fn on_server_side<T>(f: impl FnOnce() -> T) -> T {
    enter_server_side();
    let out = f();
    enter_client_side();
    out
}

/// Runs `f` with the calling thread free to use every CPU of the process: processes it
/// starts inherit that, as clients spread over a host's cores do.
pub fn on_every_cpu<T>(f: impl FnOnce() -> T) -> T {
    if sides().is_none() {
        return f();
    }
    pin_current(&allowed_cpus_of_process());
    let out = f();
    enter_client_side();
    out
}

/// How a spinner thread's name begins (followed by its CPU).
pub const SPINNER_NAME: &str = "bench-idle-";

/// The spinners; stopped on drop.
pub struct Spinners {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Spinners {
    /// One spinner per CPU this process may run on.
    pub fn start() -> Spinners {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for cpu in allowed_cpus_of_process() {
            let stop = stop.clone();
            let t = std::thread::Builder::new()
                .name(format!("{SPINNER_NAME}{cpu}"))
                .spawn(move || {
                    // Without both, the spinner would compete with the benchmark instead of
                    // filling idle time; if either fails, spinning is worse than nothing.
                    if !(pin_to(cpu) && make_idle_class()) {
                        return;
                    }
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                });
            if let Ok(t) = t {
                threads.push(t);
            }
        }
        Spinners { stop, threads }
    }
}

impl Drop for Spinners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Number of CPUs this process may use (before any pinning).
pub fn cpu_count() -> usize {
    allowed_cpus_of_process().len()
}

/// CPUs of the process as started (the first thread's mask, read before any pinning).
fn allowed_cpus_of_process() -> Vec<usize> {
    static ALL: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();
    ALL.get_or_init(allowed_cpus).clone()
}

fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it for the
    // calling thread and reads nothing else.
    unsafe {
        let mut set = std::mem::zeroed::<libc::cpu_set_t>();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

fn pin_to(cpu: usize) -> bool {
    pin_current(&[cpu])
}

fn pin_current(cpus: &[usize]) -> bool {
    if cpus.is_empty() {
        return false;
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it (the indices
    // came from sched_getaffinity, so they are below CPU_SETSIZE); sched_setaffinity(0, …)
    // changes only the calling thread.
    unsafe {
        let mut set = std::mem::zeroed::<libc::cpu_set_t>();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

fn make_idle_class() -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param; pid 0 is the calling thread.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) == 0 }
}

/// Sets the calling thread's timer slack (how late the kernel may fire its timers, so they
/// can share an interrupt); returns the previous value.
pub fn set_timer_slack_ns(ns: u64) -> u64 {
    // SAFETY: PR_GET_TIMERSLACK / PR_SET_TIMERSLACK take and return plain integers and affect
    // only the calling thread.
    unsafe {
        let old = libc::prctl(libc::PR_GET_TIMERSLACK, 0, 0, 0, 0);
        libc::prctl(libc::PR_SET_TIMERSLACK, ns as libc::c_ulong, 0, 0, 0);
        if old > 0 {
            old as u64
        } else {
            50_000
        }
    }
}
