//! The key: a sha256 over everything that can change a job's result. What a
//! submission fixes (`Lookup`) is known at submit; the machine its run had
//! (`Machine`: the architecture, CPUs, memory and timeout a host chose) is
//! known from the run's verified provenance. An entry is stored under both,
//! and found by the first.

use jobfile::deps::Resolution;
use jobfile::jobenv::JobEnv;
use serde::Serialize;

/// Bumped when what goes into a key changes: every older entry is then a miss.
pub const KEY_VERSION: u32 = 1;

/// What a submission fixes.
#[derive(Debug, Clone, Serialize)]
pub struct Lookup<'a> {
    /// The job file's bytes as received (its zero padding included), and so its size.
    pub job_sha256: &'a str,
    pub size: u64,
    /// The image: its number, its manifest's sha256 (which names every file
    /// of it, the kernel and the initramfs holding the guest init included),
    /// the architecture and the builder that made it (and so its init's version).
    pub image: &'a str,
    pub manifest_sha256: &'a str,
    pub arch: &'a str,
    pub init: &'a str,
    /// This server's version: how it fixes the environment and the terms.
    pub construir: &'a str,
    /// The packages resolved at submit, exactly as every host installs them.
    pub packages: Option<&'a Resolution>,
    /// The variables construir sets that vary between jobs (the rest are fixed by `construir`).
    pub env: &'a JobEnv,
    /// A digest of the operator's salt (`serve --cache-salt`).
    pub salt: &'a str,
}

/// What the host chose for the run, from its verified provenance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Machine {
    pub architecture: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub timeout_secs: u64,
}

impl Machine {
    pub fn of(statement: &construir_provenance::Statement) -> Machine {
        let m = &statement.predicate.build_definition.internal_parameters;
        Machine {
            architecture: m.architecture.clone(),
            cpus: m.cpus,
            memory_mib: m.memory_mib,
            timeout_secs: m.timeout_secs,
        }
    }
}

fn digest(value: &impl Serialize) -> String {
    let text = serde_json::to_vec(value).expect("a key's parts always serialize");
    construir_provenance::sha256_bytes(&text)
}

impl Lookup<'_> {
    /// Its digest: what entries are looked up by.
    pub fn digest(&self) -> String {
        digest(&serde_json::json!({ "construir-result-key": KEY_VERSION, "submitted": self }))
    }
}

/// The whole key: the lookup digest and the run's machine.
pub fn key(lookup: &str, machine: &Machine) -> String {
    digest(&serde_json::json!({ "construir-result-key": KEY_VERSION, "lookup": lookup, "machine": machine }))
}

/// A digest of the operator's salt, as keys and entries carry it.
pub fn salt_digest(salt: &str) -> String {
    construir_provenance::sha256_bytes(format!("construir-result-cache-salt\0{salt}").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(env: &'a JobEnv, packages: Option<&'a Resolution>) -> Lookup<'a> {
        Lookup {
            job_sha256: "a",
            size: 1 << 20,
            image: "0",
            manifest_sha256: "m",
            arch: "amd64",
            init: "0.1.0",
            construir: "0.1.0",
            packages,
            env,
            salt: "s",
        }
    }

    #[test]
    fn every_input_changes_the_key_and_nothing_else_does() {
        let env = JobEnv { name: "hello".into(), epoch: 1 };
        let base = lookup(&env, None).digest();
        assert_eq!(base, lookup(&env, None).digest(), "the same inputs, the same key");
        let pin = Resolution { install: Vec::new(), ..Default::default() };
        let other_env = JobEnv { name: "hello".into(), epoch: 2 };
        let renamed = JobEnv { name: "hullo".into(), epoch: 1 };
        let changed = [
            Lookup { job_sha256: "b", ..lookup(&env, None) },
            Lookup { size: 2 << 20, ..lookup(&env, None) },
            Lookup { image: "1", ..lookup(&env, None) },
            Lookup { manifest_sha256: "n", ..lookup(&env, None) },
            Lookup { arch: "arm64", ..lookup(&env, None) },
            Lookup { init: "0.2.0", ..lookup(&env, None) },
            Lookup { construir: "0.2.0", ..lookup(&env, None) },
            lookup(&env, Some(&pin)),
            lookup(&other_env, None),
            lookup(&renamed, None),
            Lookup { salt: "t", ..lookup(&env, None) },
        ];
        let mut seen = std::collections::BTreeSet::from([base.clone()]);
        for l in &changed {
            assert!(seen.insert(l.digest()), "{l:?} gave a key seen before");
        }
        let machine = Machine { architecture: "amd64".into(), cpus: 2, memory_mib: 512, timeout_secs: 600 };
        let whole = key(&base, &machine);
        assert_eq!(whole, key(&base, &machine.clone()));
        for other in [
            Machine { cpus: 1, ..machine.clone() },
            Machine { memory_mib: 1024, ..machine.clone() },
            Machine { timeout_secs: 60, ..machine.clone() },
            Machine { architecture: "arm64".into(), ..machine.clone() },
        ] {
            assert_ne!(key(&base, &other), whole, "{other:?}");
        }
        assert_ne!(salt_digest(""), salt_digest("x"));
    }
}
