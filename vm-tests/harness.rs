//! The rescue image, qemu, and what a guest run leaves behind.
//!
//! A VM test builds raw disk files on the host, boots the rescue system under qemu-system-x86_64
//! (TCG only: KVM hangs on the CI machines), lets the guest's init run `autorun.sh` from a CAIRNRUN
//! disk, and reads back what each step printed and returned. Nothing here sleeps to synchronise:
//! the serial console is read by a thread and waited on with a condition variable, and a run ends
//! when qemu exits (the guest powers off) or a generous timeout kills it.

use std::collections::BTreeMap;
use std::env;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// Set to 1 by a developer to skip the VM tests (CI never sets it).
pub const SKIP_ENV: &str = "CAIRN_SKIP_VM";
/// A directory with a prebuilt rescue image (vmlinuz, initrd.img, cairn-rescue.iso, cmdline).
pub const RESCUE_DIR_ENV: &str = "CAIRN_RESCUE_DIR";

/// True (after saying so) when the developer opted out with CAIRN_SKIP_VM=1.
pub fn skip_vm(test: &str) -> bool {
    if env::var(SKIP_ENV).as_deref() == Ok("1") {
        eprintln!("{test}: skipped because {SKIP_ENV}=1 (CI never sets it)");
        true
    } else {
        false
    }
}

/// Where a program is on PATH.
pub fn which(prog: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// Fails the test, saying how to get `prog`, when it is not installed.
pub fn require_tool(prog: &str, package: &str) -> PathBuf {
    which(prog).unwrap_or_else(|| {
        panic!(
            "precondition missing: `{prog}` not found; install it with `apt-get install {package}` \
             (.ci/run does), or set {SKIP_ENV}=1 to skip the VM tests"
        )
    })
}

pub fn qemu() -> PathBuf {
    match env::var_os("CAIRN_QEMU") {
        Some(p) => PathBuf::from(p),
        None => require_tool("qemu-system-x86_64", "qemu-system-x86"),
    }
}

// ---------------------------------------------------------------------------------------------------
// The rescue image
// ---------------------------------------------------------------------------------------------------

pub struct Rescue {
    pub vmlinuz: PathBuf,
    pub initrd: PathBuf,
    pub iso: PathBuf,
    /// Kernel command line the image is meant to boot with (OUT/cmdline).
    pub cmdline: String,
}

impl Rescue {
    fn from_dir(dir: &Path) -> Result<Rescue, String> {
        let get = |name: &str| {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(format!("{} is missing", p.display()))
            }
        };
        let cmdline = fs::read_to_string(get("cmdline")?)
            .map_err(|e| format!("reading {}/cmdline: {e}", dir.display()))?;
        Ok(Rescue {
            vmlinuz: get("vmlinuz")?,
            initrd: get("initrd.img")?,
            iso: get("cairn-rescue.iso")?,
            cmdline: cmdline.trim().to_string(),
        })
    }
}

/// The rescue image under test: $CAIRN_RESCUE_DIR if set, else built into target/rescue (once per
/// test process; the script caches downloads and images across runs) with tools/build-rescue from
/// this checkout.
pub fn rescue() -> &'static Rescue {
    static RESCUE: OnceLock<Result<Rescue, String>> = OnceLock::new();
    match RESCUE.get_or_init(build_rescue) {
        Ok(r) => r,
        Err(e) => panic!("precondition missing: no rescue image: {e}"),
    }
}

fn build_rescue() -> Result<Rescue, String> {
    if let Some(dir) = env::var_os(RESCUE_DIR_ENV) {
        return Rescue::from_dir(Path::new(&dir))
            .map_err(|e| format!("{RESCUE_DIR_ENV}={}: {e}", Path::new(&dir).display()));
    }
    // In this checkout's target/ (where .ci/run builds it too): the image holds this checkout's
    // cairn, and another checkout's test run must not swap it under a running test.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("target/rescue");
    let script = root.join("tools/build-rescue");
    let started = Instant::now();
    let o = Command::new(&script)
        .arg(&out)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !o.status.success() {
        return Err(format!(
            "{} {} failed ({}); it needs the host packages named in README \"Rescue\" (.ci/run \
             installs them), or point {RESCUE_DIR_ENV} at a built image, or set {SKIP_ENV}=1 to \
             skip the VM tests:\n{}{}",
            script.display(),
            out.display(),
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    eprintln!(
        "vm-tests: rescue image in {} ({:.0?}): {}",
        out.display(),
        started.elapsed(),
        String::from_utf8_lossy(&o.stderr)
            .lines()
            .find(|l| l.contains("done:"))
            .unwrap_or("")
    );
    Rescue::from_dir(&out)
}

// ---------------------------------------------------------------------------------------------------
// qemu
// ---------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Boot {
    /// `-kernel vmlinuz -initrd initrd.img` (like PXE), i440FX machine, SeaBIOS.
    KernelInitrd,
    /// The ISO as an IDE CD-ROM, i440FX machine, SeaBIOS, GRUB's default entry.
    IsoBiosCdrom,
    /// The ISO written to a USB stick (usb-storage on xHCI), q35 machine, OVMF (UEFI) with Secure
    /// Boot on and Microsoft's keys: shim, Debian's signed GRUB and kernel.
    IsoUefiUsb,
}

/// A raw disk image given to the guest as a virtio disk with a serial number (the guest finds its
/// disks by serial: /sys/block/vdX/serial).
pub struct Disk {
    pub path: PathBuf,
    pub serial: String,
}

pub struct Vm {
    pub boot: Boot,
    pub disks: Vec<Disk>,
    /// Appended to the kernel command line (KernelInitrd only: the ISO boots GRUB's default entry).
    pub extra_cmdline: String,
    pub memory_mib: u32,
    /// Where serial.log and qemu.stderr go.
    pub workdir: PathBuf,
}

impl Vm {
    pub fn new(boot: Boot, workdir: &Path) -> Vm {
        Vm {
            boot,
            disks: Vec::new(),
            extra_cmdline: String::new(),
            memory_mib: 1024,
            workdir: workdir.to_path_buf(),
        }
    }

    pub fn disk(mut self, path: &Path, serial: &str) -> Vm {
        self.disks.push(Disk {
            path: path.to_path_buf(),
            serial: serial.to_string(),
        });
        self
    }

    pub fn cmdline(mut self, extra: &str) -> Vm {
        self.extra_cmdline = extra.to_string();
        self
    }

    fn command(&self, rescue: &Rescue) -> Command {
        let mut c = Command::new(qemu());
        c.args(["-accel", "tcg", "-smp", "1", "-nodefaults", "-no-reboot"]);
        c.args([
            "-display", "none", "-vga", "none", "-serial", "stdio", "-monitor", "none",
        ]);
        c.arg("-m").arg(self.memory_mib.to_string());
        match self.boot {
            Boot::KernelInitrd => {
                let mut cmdline = format!("{} panic=1", rescue.cmdline);
                if !self.extra_cmdline.is_empty() {
                    cmdline.push(' ');
                    cmdline.push_str(&self.extra_cmdline);
                }
                c.args(["-machine", "pc"]);
                c.arg("-kernel").arg(&rescue.vmlinuz);
                c.arg("-initrd").arg(&rescue.initrd);
                c.arg("-append").arg(cmdline);
            }
            Boot::IsoBiosCdrom => {
                c.args(["-machine", "pc", "-boot", "d"]);
                c.arg("-drive").arg(format!(
                    "file={},format=raw,if=ide,media=cdrom,readonly=on",
                    rescue.iso.display()
                ));
            }
            Boot::IsoUefiUsb => {
                let (code, vars) = ovmf(&self.workdir);
                c.args(["-machine", "q35,smm=on"]);
                c.args(["-global", "driver=cfi.pflash01,property=secure,value=on"]);
                c.arg("-drive").arg(format!(
                    "if=pflash,format=raw,unit=0,readonly=on,file={}",
                    code.display()
                ));
                c.arg("-drive").arg(format!(
                    "if=pflash,format=raw,unit=1,file={}",
                    vars.display()
                ));
                c.args(["-device", "qemu-xhci,id=xhci"]);
                c.arg("-drive").arg(format!(
                    "file={},format=raw,if=none,id=stick,readonly=on",
                    rescue.iso.display()
                ));
                c.args([
                    "-device",
                    "usb-storage,bus=xhci.0,drive=stick,removable=on,bootindex=0",
                ]);
            }
        }
        for (i, d) in self.disks.iter().enumerate() {
            c.arg("-drive").arg(format!(
                "file={},format=raw,if=none,id=disk{i},cache=unsafe,discard=unmap",
                d.path.display()
            ));
            c.arg("-device")
                .arg(format!("virtio-blk-pci,drive=disk{i},serial={}", d.serial));
        }
        c
    }

    /// Boots the guest with its serial console on a pipe.
    pub fn spawn(&self) -> Running {
        let rescue = rescue();
        // Before the command: it copies the UEFI variable store into the workdir.
        fs::create_dir_all(&self.workdir).unwrap();
        spawn_qemu(self.command(rescue), &self.workdir)
    }

    /// Boots the guest and waits until it powers off (or `timeout` passes: then qemu is killed and
    /// the test fails with the end of the serial console).
    pub fn run(&self, timeout: Duration) -> Finished {
        let mut r = self.spawn();
        r.wait_exit(timeout)
    }
}

/// Starts `cmd` (a qemu with `-serial stdio`) with its serial console on a pipe, and serial.log and
/// qemu.stderr in `workdir`.
pub fn spawn_qemu(mut cmd: Command, workdir: &Path) -> Running {
    fs::create_dir_all(workdir).unwrap();
    let rendered = format!("{cmd:?}");
    let stderr_path = workdir.join("qemu.stderr");
    let serial_path = workdir.join("serial.log");
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(File::create(&stderr_path).unwrap());
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start qemu ({rendered}): {e}"));
    let stdout = child.stdout.take().unwrap();
    let stdin = child.stdin.take();
    let console = Arc::new(Console::default());
    let c2 = console.clone();
    let log = File::create(&serial_path).unwrap();
    let reader = thread::spawn(move || c2.pump(stdout, log));
    Running {
        child,
        stdin,
        console,
        reader: Some(reader),
        started,
        command: rendered,
        serial_path,
        stderr_path,
    }
}

/// OVMF (UEFI firmware for qemu): the code, and a private copy of the variable store.
fn ovmf(workdir: &Path) -> (PathBuf, PathBuf) {
    // Secure Boot firmware (needs SMM) and a variable store with Microsoft's keys enrolled and Secure
    // Boot on: the state of a PC as shipped.
    let pairs = [
        (
            "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
            "/usr/share/OVMF/OVMF_VARS_4M.ms.fd",
        ),
        (
            "/usr/share/OVMF/OVMF_CODE.secboot.fd",
            "/usr/share/OVMF/OVMF_VARS.ms.fd",
        ),
    ];
    for (code, vars) in pairs {
        if Path::new(code).is_file() && Path::new(vars).is_file() {
            let copy = workdir.join("OVMF_VARS.fd");
            fs::copy(vars, &copy).unwrap();
            return (PathBuf::from(code), copy);
        }
    }
    panic!(
        "precondition missing: Secure Boot UEFI firmware for qemu \
         (/usr/share/OVMF/OVMF_CODE_4M.secboot.fd, OVMF_VARS_4M.ms.fd) not found; install it with \
         `apt-get install ovmf` (.ci/run does), or set {SKIP_ENV}=1"
    )
}

/// The serial console's bytes so far, and whether qemu closed it.
#[derive(Default)]
struct Console {
    state: Mutex<(Vec<u8>, bool)>,
    changed: Condvar,
}

impl Console {
    fn pump(&self, mut from: impl Read, mut log: File) {
        let mut buf = [0u8; 8192];
        loop {
            let n = from.read(&mut buf).unwrap_or(0);
            let mut st = self.state.lock().unwrap();
            if n == 0 {
                st.1 = true;
                self.changed.notify_all();
                return;
            }
            st.0.extend_from_slice(&buf[..n]);
            let _ = log.write_all(&buf[..n]);
            self.changed.notify_all();
        }
    }
}

pub struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    console: Arc<Console>,
    reader: Option<thread::JoinHandle<()>>,
    pub started: Instant,
    pub command: String,
    pub serial_path: PathBuf,
    pub stderr_path: PathBuf,
}

pub struct Finished {
    pub elapsed: Duration,
    pub serial: String,
    pub serial_path: PathBuf,
}

impl Finished {
    /// The last `n` lines of the serial console, for assertion messages.
    pub fn tail(&self, n: usize) -> String {
        tail_lines(&self.serial, n)
    }
}

pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Running {
    pub fn serial(&self) -> String {
        String::from_utf8_lossy(&self.console.state.lock().unwrap().0).into_owned()
    }

    /// Waits until the console shows `needle` at or after byte `from`; returns the offset just
    /// past it. Fails the test when qemu exits first or `timeout` passes.
    pub fn wait_for(&mut self, needle: &str, from: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut st = self.console.state.lock().unwrap();
        loop {
            if let Some(pos) = find(&st.0[from.min(st.0.len())..], needle.as_bytes()) {
                return from + pos + needle.len();
            }
            let now = Instant::now();
            if st.1 || now >= deadline {
                let text = String::from_utf8_lossy(&st.0).into_owned();
                drop(st);
                let why = if now >= deadline {
                    format!("not within {timeout:?}")
                } else {
                    "qemu exited first".to_string()
                };
                self.kill();
                panic!(
                    "waiting for {needle:?} on the serial console: {why}\nqemu: {}\n{}\n--- serial \
                     console (last 60 lines; all in {}) ---\n{}",
                    self.command,
                    stderr_of(&self.stderr_path),
                    self.serial_path.display(),
                    tail_lines(&text, 60)
                );
            }
            st = self
                .console
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// Types `text` on the guest's serial console.
    pub fn send(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        stdin.write_all(text.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the guest to power off (qemu exits and closes the console).
    pub fn wait_exit(&mut self, timeout: Duration) -> Finished {
        let deadline = Instant::now() + timeout;
        {
            let mut st = self.console.state.lock().unwrap();
            while !st.1 {
                let now = Instant::now();
                if now >= deadline {
                    let text = String::from_utf8_lossy(&st.0).into_owned();
                    drop(st);
                    self.kill();
                    panic!(
                        "the guest did not power off within {timeout:?}; killed qemu\nqemu: {}\n{}\n--- \
                         serial console (last 80 lines; all in {}) ---\n{}",
                        self.command,
                        stderr_of(&self.stderr_path),
                        self.serial_path.display(),
                        tail_lines(&text, 80)
                    );
                }
                st = self
                    .console
                    .changed
                    .wait_timeout(st, deadline - now)
                    .unwrap()
                    .0;
            }
        }
        self.stdin = None;
        let status = self.child.wait().unwrap();
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        let serial = self.serial();
        assert!(
            status.success(),
            "qemu failed ({status}): {}\n{}\n--- serial console (last 60 lines) ---\n{}",
            self.command,
            stderr_of(&self.stderr_path),
            tail_lines(&serial, 60)
        );
        assert!(
            !serial.contains("Kernel panic"),
            "the guest kernel panicked:\n{}",
            tail_lines(&serial, 80)
        );
        Finished {
            elapsed: self.started.elapsed(),
            serial,
            serial_path: self.serial_path.clone(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.reader.is_some() {
            self.kill();
        }
    }
}

fn stderr_of(path: &Path) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    if s.trim().is_empty() {
        String::new()
    } else {
        format!("--- qemu stderr ---\n{}", s.trim_end())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------------
// autorun.sh and what it leaves on the CAIRNRUN disk
// ---------------------------------------------------------------------------------------------------

/// Shell functions every generated autorun.sh starts with.
///
/// `step NAME CMD...` runs CMD with stdout in steps/NAME.out, stderr in steps/NAME.err and the exit
/// status in steps/NAME.rc, echoes all three to the log, and stops the script at the first failure.
/// `note NAME CMD...` records the same but never stops (for facts shown on failure, not asserted).
/// `disk SERIAL` prints the /dev node of the virtio disk with that serial.
pub const AUTORUN_PRELUDE: &str = r#"# Generated by cairn's vm-tests (vm-tests/harness.rs).
set -u
mkdir -p steps
record() {
    stop=$1 name=$2
    shift 2
    echo "--- step $name: $*"
    "$@" >"steps/$name.out" 2>"steps/$name.err"
    rc=$?
    echo "$rc" >"steps/$name.rc"
    cat "steps/$name.out" "steps/$name.err"
    echo "--- step $name: exit $rc"
    if [ "$rc" != 0 ] && [ "$stop" = stop ]; then
        echo "--- stopping after the failed step $name"
        exit "$rc"
    fi
    return 0
}
step() { record stop "$@"; }
note() { record continue "$@"; }
disk() {
    for d in /sys/block/*; do
        if [ "$(cat "$d/serial" 2>/dev/null)" = "$1" ]; then
            echo "/dev/${d##*/}"
            return 0
        fi
    done
    echo "no disk with serial $1" >&2
    exit 1
}
"#;

/// One step's record.
#[derive(Debug, Clone)]
pub struct Step {
    pub rc: Option<i32>,
    pub out: String,
    pub err: String,
}

/// What the guest left on the CAIRNRUN disk.
pub struct Autorun {
    pub log: String,
    pub steps: BTreeMap<String, Step>,
    /// The serial console, for messages.
    pub serial_tail: String,
}

impl Autorun {
    /// Reads autorun.log and steps/ back from the CAIRNRUN image (mtools, no mount).
    pub fn read(cairnrun: &Path, dest: &Path, finished: &Finished) -> Autorun {
        fs::create_dir_all(dest).unwrap();
        let log = crate::disks::mcopy_out(cairnrun, "autorun.log").unwrap_or_else(|e| {
            panic!(
                "the guest left no autorun.log on the CAIRNRUN disk ({e}): the init did not run \
                 autorun.sh\n--- serial console (last 80 lines; all in {}) ---\n{}",
                finished.serial_path.display(),
                finished.tail(80)
            )
        });
        let log = String::from_utf8_lossy(&log).into_owned();
        let mut steps = BTreeMap::new();
        if crate::disks::mcopy_tree(cairnrun, "steps", dest).is_ok() {
            for e in fs::read_dir(dest.join("steps")).unwrap() {
                let p = e.unwrap().path();
                if p.extension().and_then(|x| x.to_str()) != Some("rc") {
                    continue;
                }
                let name = p.file_stem().unwrap().to_string_lossy().into_owned();
                let read =
                    |ext: &str| fs::read_to_string(p.with_extension(ext)).unwrap_or_default();
                steps.insert(
                    name,
                    Step {
                        rc: read("rc").trim().parse().ok(),
                        out: read("out"),
                        err: read("err"),
                    },
                );
            }
        }
        Autorun {
            log,
            steps,
            serial_tail: finished.tail(40),
        }
    }

    fn context(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "--- autorun.log ---\n{}\n--- serial console (last 40 lines) ---\n{}",
            self.log.trim_end(),
            self.serial_tail
        );
        s
    }

    /// Every step in `names` ran and exited 0, and so did autorun.sh.
    pub fn assert_ok(&self, names: &[&str]) {
        for name in names {
            match self.steps.get(*name) {
                None => panic!(
                    "step {name} did not run in the guest (steps that ran: {:?})\n{}",
                    self.steps.keys().collect::<Vec<_>>(),
                    self.context()
                ),
                Some(st) if st.rc != Some(0) => panic!(
                    "step {name} failed in the guest (exit {:?})\n--- stdout ---\n{}\n--- stderr \
                     ---\n{}\n{}",
                    st.rc,
                    st.out.trim_end(),
                    st.err.trim_end(),
                    self.context()
                ),
                Some(_) => {}
            }
        }
        assert!(
            self.log
                .contains("=== cairn autorun: autorun.sh exited with status 0"),
            "autorun.sh did not exit 0\n{}",
            self.context()
        );
    }

    pub fn step(&self, name: &str) -> &Step {
        self.steps
            .get(name)
            .unwrap_or_else(|| panic!("no step {name}\n{}", self.context()))
    }

    /// A step's stdout parsed as one JSON document.
    pub fn json(&self, name: &str) -> serde_json::Value {
        let st = self.step(name);
        serde_json::from_str(&st.out).unwrap_or_else(|e| {
            panic!(
                "step {name}: stdout is not one JSON document ({e}):\n{}\n--- stderr ---\n{}",
                st.out, st.err
            )
        })
    }
}
