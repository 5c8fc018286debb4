//! An account's limits applied to one upload, decided before a byte of it
//! is read: pure functions of what the database counted in the
//! reservation's transaction (`db::Usage`, every upload under way included)
//! and of what the disk has free. What they allow is reserved at once, so
//! uploads started together cannot all pass the same check.

use serde::Serialize;

use crate::db::{Limits, Usage};

/// Server-wide rules for uploads, beside each account's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadRules {
    /// Uploads one account may have under way at once.
    pub max_uploads: u64,
    /// Bytes the disk holding the queue keeps free: an upload that would
    /// leave less is refused (507), counting what uploads under way reserved.
    pub min_free: u64,
}

/// Why an upload is refused: the HTTP status, the limit by name, and the
/// amounts, so that a client can say what to change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    #[serde(skip)]
    pub status: u16,
    pub limit: &'static str,
    pub allowed: u64,
    pub requested: u64,
    #[serde(rename = "error")]
    pub message: String,
}

impl Refusal {
    fn new(status: u16, limit: &'static str, allowed: u64, requested: u64, message: String) -> Refusal {
        Refusal { status, limit, allowed, requested, message }
    }
}

/// The bytes to reserve for an upload that declared `declared` bytes
/// (`None`: sent in chunks, so it may take all the room it has), or why it
/// is refused. `disk_free` is what the queue's filesystem has free now.
pub fn admit(
    usage: &Usage,
    limits: &Limits,
    rules: &UploadRules,
    declared: Option<u64>,
    disk_free: u64,
) -> Result<u64, Refusal> {
    if usage.uploads + 1 > rules.max_uploads {
        return Err(Refusal::new(
            429,
            "max_uploads",
            rules.max_uploads,
            usage.uploads + 1,
            format!("{} of your uploads are under way; the limit is {}", usage.uploads, rules.max_uploads),
        ));
    }
    if let Some(max) = limits.max_waiting {
        if usage.unfinished + 1 > max {
            return Err(Refusal::new(
                429,
                "max_waiting",
                max,
                usage.unfinished + 1,
                format!("{} of your jobs are not finished; the limit is {max}", usage.unfinished),
            ));
        }
    }
    if let Some(max) = limits.max_per_hour {
        if usage.last_hour + 1 > max {
            return Err(Refusal::new(
                429,
                "max_per_hour",
                max,
                usage.last_hour + 1,
                format!("you submitted {} jobs in the last hour; the limit is {max}", usage.last_hour),
            ));
        }
    }
    let max_job = limits.max_job_bytes.unwrap_or(u64::MAX);
    if let Some(size) = declared.filter(|&s| s > max_job) {
        return Err(too_large_job(max_job, size));
    }
    let max_stored = limits.max_stored_bytes.unwrap_or(u64::MAX);
    let room = max_stored.saturating_sub(usage.stored_bytes);
    let reserve = declared.unwrap_or(max_job.min(room));
    if reserve > room || room == 0 {
        return Err(too_much_stored(max_stored, usage.stored_bytes.saturating_add(reserve.max(1))));
    }
    let needed = rules.min_free.saturating_add(usage.reserved_everywhere).saturating_add(reserve);
    if disk_free < needed {
        return Err(disk_full(disk_free, usage.reserved_everywhere, reserve, rules.min_free));
    }
    Ok(reserve)
}

/// The refusal for a job file larger than the account may send.
pub fn too_large_job(max_job: u64, size: u64) -> Refusal {
    Refusal::new(
        413,
        "max_job_bytes",
        max_job,
        size,
        format!("the job file is larger than the {max_job} bytes allowed"),
    )
}

/// The refusal for an upload that would make the account hold more than its limit.
pub fn too_much_stored(max_stored: u64, would_be: u64) -> Refusal {
    Refusal::new(
        413,
        "max_stored_bytes",
        max_stored,
        would_be,
        format!("your jobs would hold {would_be} bytes; the limit is {max_stored}"),
    )
}

/// The refusal for an upload that would leave the disk below its reserve.
pub fn disk_full(free: u64, reserved: u64, this: u64, min_free: u64) -> Refusal {
    Refusal::new(
        507,
        "min_free",
        free.saturating_sub(reserved).saturating_sub(min_free),
        this,
        format!(
            "the server's disk is too full: {free} bytes free, {reserved} reserved by uploads under way, \
             this upload {this}, and {min_free} are kept free; try again later"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_limit_refuses_with_its_name_and_amounts_and_an_admitted_upload_reserves_its_bytes() {
        let limits = Limits {
            max_job_bytes: Some(1000),
            max_waiting: Some(3),
            max_stored_bytes: Some(5000),
            max_per_hour: Some(10),
            retention_days: None,
        };
        let rules = UploadRules { max_uploads: 2, min_free: 10_000 };
        let idle = Usage::default();
        let plenty = 1 << 30;
        type Case = (&'static str, Usage, Option<u64>, u64, Result<u64, (&'static str, u64, u64)>);
        let table: &[Case] = &[
            ("declared", idle, Some(600), plenty, Ok(600)),
            ("chunked takes all it may", idle, None, plenty, Ok(1000)),
            ("chunked, little room", Usage { stored_bytes: 4700, ..idle }, None, plenty, Ok(300)),
            ("uploads under way", Usage { uploads: 2, ..idle }, Some(1), plenty, Err(("max_uploads", 2, 3))),
            ("unfinished", Usage { unfinished: 3, ..idle }, Some(1), plenty, Err(("max_waiting", 3, 4))),
            ("per hour", Usage { last_hour: 10, ..idle }, Some(1), plenty, Err(("max_per_hour", 10, 11))),
            ("job size", idle, Some(1001), plenty, Err(("max_job_bytes", 1000, 1001))),
            ("stored", Usage { stored_bytes: 4500, ..idle }, Some(600), plenty, Err(("max_stored_bytes", 5000, 5100))),
            (
                "stored full, chunked",
                Usage { stored_bytes: 5000, ..idle },
                None,
                plenty,
                Err(("max_stored_bytes", 5000, 5001)),
            ),
            ("disk", idle, Some(600), 10_599, Err(("min_free", 599, 600))),
            (
                "disk with others' reservations",
                Usage { reserved_everywhere: 5000, ..idle },
                Some(600),
                15_000,
                Err(("min_free", 0, 600)),
            ),
            ("disk just enough", idle, Some(600), 10_600, Ok(600)),
        ];
        for (what, usage, declared, free, want) in table {
            let got = admit(usage, &limits, &rules, *declared, *free).map_err(|r| (r.limit, r.allowed, r.requested));
            assert_eq!(&got, want, "{what}");
        }
        let refusal = admit(&Usage { uploads: 2, ..idle }, &limits, &rules, Some(1), plenty).expect_err("refused");
        assert_eq!(refusal.status, 429);
        assert!(refusal.message.contains("2 of your uploads are under way"), "{}", refusal.message);
        assert_eq!(admit(&idle, &limits, &rules, Some(1001), plenty).expect_err("refused").status, 413);
        assert_eq!(admit(&idle, &limits, &rules, Some(1), 0).expect_err("refused").status, 507);
    }
}
