//! Taking connections: the one accept loop for plain HTTP and HTTPS. What
//! a client may hold of the server is bounded here, before any handler
//! runs: connections in all and per client address, the time to finish the
//! TLS handshake, the time to send a request's header, and how long an idle
//! keep-alive connection stays open. Past a bound the connection is closed
//! (and logged, once a second at most): a client that sends half a header,
//! or opens connections and sends nothing, holds nothing for long.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower_service::Service;

/// What a client may hold of the server.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Connections open at once, from everyone.
    pub max_connections: usize,
    /// Connections open at once from one client address.
    pub max_per_address: usize,
    /// Time to send a request's whole header (and, with TLS, to finish the handshake).
    pub header_timeout: Duration,
}

#[derive(Debug, Error)]
pub enum ListenError {
    #[error("cannot read the TLS certificate chain {path}")]
    Certificate { path: String, source: rustls::pki_types::pem::Error },
    #[error("cannot read the TLS private key {path}")]
    Key { path: String, source: rustls::pki_types::pem::Error },
    #[error("the TLS certificate and key do not make a server configuration")]
    Tls(#[from] rustls::Error),
    #[error("cannot take connections")]
    Accept(#[source] std::io::Error),
}

/// A TLS configuration from a PEM certificate chain and private key.
pub fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, ListenError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| ListenError::Certificate { path: cert.display().to_string(), source })?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|source| ListenError::Key { path: key.display().to_string(), source })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Connections open now, by client address.
#[derive(Default)]
struct Open {
    by_address: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place, given back when it closes.
struct Slot {
    open: Arc<Open>,
    ip: IpAddr,
    _all: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.open.by_address.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Says at most once a second, for each reason, that connections were turned away.
#[derive(Default)]
struct Refusals {
    last: Mutex<HashMap<&'static str, Instant>>,
}

impl Refusals {
    fn note(&self, why: &'static str, detail: &str, peer: SocketAddr) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.get(why).is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            last.insert(why, Instant::now());
            log::warn!("closed a connection from {peer}: {detail}");
        }
    }
}

/// Serves `router` on `listener` (over TLS when `tls` is given) until
/// `shutdown` resolves; then lets requests under way finish for `grace`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: Router,
    bounds: Bounds,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> Result<(), ListenError> {
    let all = Arc::new(tokio::sync::Semaphore::new(bounds.max_connections));
    let open = Arc::new(Open::default());
    let refusals = Arc::new(Refusals::default());
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: wait, do not spin.
                    log::warn!("cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while tasks.try_join_next().is_some() {}
        let Ok(permit) = all.clone().try_acquire_owned() else {
            refusals.note("all", &format!("{} connections are open, the limit", bounds.max_connections), peer);
            continue;
        };
        let ip = peer.ip();
        {
            let mut m = open.by_address.lock().unwrap_or_else(|p| p.into_inner());
            let n = m.entry(ip).or_insert(0);
            if *n >= bounds.max_per_address {
                drop(m);
                let detail = format!("{} connections from this address, the limit", bounds.max_per_address);
                refusals.note("address", &detail, peer);
                continue;
            }
            *n += 1;
        }
        let slot = Slot { open: open.clone(), ip, _all: permit };
        let _ = stream.set_nodelay(true);
        let (router, acceptor, refusals, mut stop) =
            (router.clone(), acceptor.clone(), refusals.clone(), stop_rx.clone());
        tasks.spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                let mut router = router.clone();
                async move { router.call(request).await }
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(bounds.header_timeout).keep_alive(true);
            match acceptor {
                Some(acceptor) => {
                    let stream = match tokio::time::timeout(bounds.header_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => return log::debug!("TLS handshake with {peer} failed: {e}"),
                        Err(_) => return refusals.note("tls", "the TLS handshake took too long", peer),
                    };
                    let conn = http.serve_connection(TokioIo::new(stream), service).with_upgrades();
                    drive(conn, &mut stop, peer).await;
                }
                None => {
                    let conn = http.serve_connection(TokioIo::new(stream), service).with_upgrades();
                    drive(conn, &mut stop, peer).await;
                }
            }
        });
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    Ok(())
}

/// Runs one connection; on shutdown, lets the request under way finish, then closes.
async fn drive<C>(conn: C, stop: &mut watch::Receiver<bool>, peer: SocketAddr)
where
    C: Future<Output = hyper::Result<()>> + GracefulConnection,
{
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                log::debug!("connection from {peer}: {e}");
            }
        }
        _ = async { let _ = stop.wait_for(|s| *s).await; } => {
            conn.as_mut().graceful();
            let _ = conn.await;
        }
    }
}

/// A connection that can be asked to finish what it does and close.
trait GracefulConnection {
    fn graceful(self: std::pin::Pin<&mut Self>);
}

impl<I, S> GracefulConnection for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}
