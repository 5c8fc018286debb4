//! What the `construir` program and `construir-gitlab` both do with a
//! server's results: check one against its signed provenance, with the key
//! of the host the server recorded for the run.

pub mod results;
