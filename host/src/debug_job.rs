//! A debug job (`jobfile::debug`) once init says its session is open: the
//! result is read from a copy of the working copy taken then (so nothing
//! the session does can change it), delivered at once, and the session is
//! served (`debug::serve`) before the VM ends. A job that ends ok opens no
//! session; neither does a VM whose result does not read.

use std::ffi::OsStr;
use std::io;

use jobfile::Outcome;

use crate::caches::Checkout;
use crate::claim::Claim;
use crate::debug::{self, Channel, DebugLimits, Place};
use crate::files::{self, read_status};
use crate::intake::{Intake, DISK};
use crate::lending;
use crate::outcome::{self, Ran};
use crate::qemu::{Cut, Vm};
use crate::queue::Ending;

/// The name the VM's working copy is moved to when its result is copied out.
const VM_DISK: &str = "disk.vm";

/// A debug job's session, before its VM starts: its bounds and the host's
/// end of the channel (QEMU's end goes into the VM's `debug_port`).
pub(crate) struct Debugging {
    pub(crate) limits: DebugLimits,
    channel: Channel,
}

/// For a job that gets a session (`limits_for`): its bounds and channel,
/// and QEMU's end of the channel.
pub(crate) fn prepare(claim: &Claim, intake: &Intake) -> io::Result<Option<(Debugging, std::os::fd::OwnedFd)>> {
    let Some(limits) = limits_for(claim, intake) else { return Ok(None) };
    let (channel, port) = debug::channel()?;
    Ok(Some((Debugging { limits, channel }, port)))
}

/// Whether this job's VM gets a session port, and its bounds: when the job
/// asks for one (its `construir.toml`, or its terms) and this host allows
/// them. A verified rebuild's run never does.
fn limits_for(claim: &Claim, intake: &Intake) -> Option<DebugLimits> {
    let asked = intake.declaration.as_ref().is_some_and(|(d, _)| d.debug) || intake.terms.debug;
    if !asked {
        return None;
    }
    if intake.terms.rebuild.is_some() {
        log::info!("job {}: a verified rebuild's run opens no debug session", claim.label());
        return None;
    }
    if claim.limits.debug.is_none() {
        log::info!("job {}: it asks for a debug session, but this host runs with --no-debug", claim.label());
    }
    claim.limits.debug
}

/// Takes the result as it is now, delivers it, then serves the session.
pub(crate) fn opened(
    claim: &Claim,
    intake: &mut Intake,
    vm: Vm,
    checkouts: Vec<Checkout>,
    ran: Ran,
    debug: Debugging,
) -> io::Result<Ending> {
    let Debugging { limits, channel } = debug;
    let label = claim.label();
    let copied = copy_out(intake);
    let st = copied.as_ref().ok().and_then(|()| read_status(&intake.disk));
    let Some(st) = st.filter(|st| st.result != Outcome::Ok) else {
        // No session after all: the VM ends, and its result is judged as any other's.
        let why = match &copied {
            Err(e) => format!("cannot copy the result out of the running VM: {e}"),
            Ok(()) => "the VM said a debug session opened, but its result is ok or does not read".to_owned(),
        };
        log::warn!("job {label}: {why}; the VM is ended");
        let vm = vm.finish(Some(Cut::Deadline));
        let log = vm.console.finish(&format!("failed: no result: {why}"));
        return claim.fail("no_result", &format!("no result: {why}"), Some(&log));
    };
    intake.stages.vm(vm.booted(), st.duration_secs, vm.elapsed());
    let how = format!(
        "result packed after {:.1} s; a debug session is open: attach within {} s, at most {} s \
         (construir debug ID, or construir-host debug FILE on this queue)",
        vm.elapsed().as_secs_f64(),
        limits.wait.as_secs(),
        limits.max.as_secs()
    );
    let verdict = outcome::verdict(&st, &how, &intake.stages);
    let mut log = ran.preface;
    log.extend(vm.console_so_far().finish(&verdict));
    let place = Place {
        running: &claim.dirs.running,
        file_name: claim.file_name,
        host_id: &claim.limits.host_id,
        label: &label,
    };
    // Open before the result lands: whoever sees the result sees the session.
    let listening = debug::open(&place, limits);
    let ending = outcome::deliver(claim, intake, &st, &log, verdict, ran.record.as_ref())?;
    let served = listening.and_then(|listening| {
        log::info!(
            "job {label}: debug session open (attach within {} s, at most {} s)",
            limits.wait.as_secs(),
            limits.max.as_secs()
        );
        debug::serve(&place, limits, listening, &vm, channel, claim.stop, claim.cancel)
    });
    let vm_ended = served.as_ref().is_ok_and(|s| s.vm_ended);
    let vm = vm.finish(if vm_ended { None } else { Some(Cut::Stop) });
    match served {
        Ok(s) => log::info!(
            "job {label}: debug session ended after {:.1} s ({}; {}); the VM ran {:.1} s in all",
            s.lasted.as_secs_f64(),
            s.attached_after
                .map_or("nobody attached".to_owned(), |a| format!("attached after {:.1} s", a.as_secs_f64())),
            s.why,
            vm.elapsed.as_secs_f64()
        ),
        Err(e) => log::error!("job {label}: cannot serve its debug session: {e}; the VM is ended"),
    }
    // Only now: the VM had the caches' disks until it ended. A job that did not end ok keeps none.
    lending::settle(claim.limits, &label, checkouts, &st);
    lending::report(claim.dirs, claim.limits);
    Ok(ending)
}

/// Moves the VM's working copy aside (QEMU keeps it open) and puts a copy
/// of it, as it is now, under the working copy's name, as `intake.disk`.
fn copy_out(intake: &mut Intake) -> io::Result<()> {
    let dir = &intake.prepared.dir;
    files::rename_noreplace_at(&dir.fd, OsStr::new(DISK), &dir.fd, OsStr::new(VM_DISK))?;
    let copy = files::create_new_at(&dir.fd, OsStr::new(DISK), 0o600)?;
    files::copy_sparse(&intake.disk, &copy, intake.size)?;
    copy.set_len(intake.size)?;
    intake.disk = copy;
    Ok(())
}
