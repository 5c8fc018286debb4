//! What the HTTP clients (the `construir` client, and build hosts taking
//! work from a server) share: trusting a CA given as a PEM file.

use std::io;
use std::path::Path;

/// TLS that trusts the certificates in the PEM file `ca` (`--ca-cert`).
pub fn trusting(ca: &Path) -> io::Result<ureq::tls::TlsConfig> {
    let pem = std::fs::read(ca).map_err(|e| io::Error::new(e.kind(), format!("cannot read {}: {e}", ca.display())))?;
    let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect();
    if certs.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} holds no PEM certificate", ca.display())));
    }
    Ok(ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::new_with_certs(&certs)).build())
}
