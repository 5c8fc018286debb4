//! construir-init as PID 1: set up, run the job disk, power off. Whatever
//! happens in between, including a panic, ends in a power-off.

use construir_guest_init::runner::KillScope;
use construir_guest_init::{power, run_job_disk, say, setup_system, Paths, VERSION};

fn main() {
    if std::process::id() != 1 {
        eprintln!("construir-init {VERSION}: the init of construir's job VMs; it only runs as PID 1 (kernel init= or an initramfs /init)");
        std::process::exit(2);
    }
    // The very first act: the host takes this line as the sign that the VM booted.
    say!("version {VERSION} starting");
    let paths = Paths::default();
    let result = std::panic::catch_unwind(|| {
        setup_system(&paths)?;
        Ok::<_, String>(run_job_disk(&paths, KillScope::Everything))
    });
    match result {
        Ok(Ok(status)) => say!("result {}; powering off", status.result.as_str()),
        // The job disk is left untouched: the host reports that no result came back, with this line.
        Ok(Err(e)) => say!("cannot set up the VM: {e}; powering off without running the job"),
        Err(_) => say!("internal error (panic); powering off"),
    }
    power::power_off()
}
