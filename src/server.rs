//! Listeners and lifecycle: accepts connections on the main and admin listeners, serves HTTP/1.1 and
//! HTTP/2 (cleartext, by prior knowledge) on each, and drains in-flight requests on shutdown.
//!
//! [`Server::serve`] takes already-bound listeners and a shutdown future, so a test binds
//! `127.0.0.1:0`, learns the port, and stops the server when it wants.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::admin::{Admin, Readiness};
use crate::auth::service::{AuthService, StartError};
use crate::auth::{Anonymous, Authenticator};
use crate::config::{Config, LimitsConfig};
use crate::gateway::{Gateway, Tunnels};
use crate::limits::RateLimits;
use crate::metrics::Metrics;
use crate::proxy::headers::ClientInfo;
use crate::tls::TlsReloader;

/// The two listeners wxgate serves.
pub struct Listeners {
    pub main: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds the addresses of `[server]`.
    pub async fn bind(config: &Config) -> io::Result<Listeners> {
        let main = TcpListener::bind(config.server.listen).await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot listen on {} (server.listen): {e}",
                    config.server.listen
                ),
            )
        })?;
        let admin = TcpListener::bind(config.server.admin_listen)
            .await
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot listen on {} (server.admin_listen): {e}",
                        config.server.admin_listen
                    ),
                )
            })?;
        Ok(Listeners { main, admin })
    }
}

/// A configured wxgate, ready to serve.
pub struct Server {
    config: Config,
    /// TLS on the main listener, when `[server.tls]` is set.
    tls: Option<(tokio_rustls::TlsAcceptor, TlsReloader)>,
    auth: Option<Arc<AuthService>>,
    authenticator: Arc<dyn Authenticator>,
    metrics: Arc<Metrics>,
    readiness: Readiness,
}

impl Server {
    /// Opens the stores and builds the login service. Fails when a store cannot be opened.
    pub async fn new(config: Config) -> Result<Self, StartError> {
        let metrics = Arc::new(Metrics::new());
        let auth = AuthService::from_config(&config, metrics.clone())
            .await?
            .map(Arc::new);
        let authenticator: Arc<dyn Authenticator> = match &auth {
            Some(auth) => auth.clone(),
            None => Arc::new(Anonymous),
        };
        let tls = match &config.server.tls {
            Some(tls) => Some(crate::tls::acceptor(&tls.cert, &tls.key)?),
            None => None,
        };
        Ok(Server {
            config,
            tls,
            auth,
            authenticator,
            metrics,
            readiness: Readiness::default(),
        })
    }

    /// Replaces the authenticator of proxied requests (by default: the login service's tokens, or
    /// nobody when no app is configured). Tests use it to play fixed identities.
    pub fn with_authenticator(mut self, authenticator: Arc<dyn Authenticator>) -> Self {
        self.authenticator = authenticator;
        self
    }

    /// Reloads the TLS certificate from its files (the binary calls it on SIGHUP); `None` without
    /// `[server.tls]`.
    pub fn tls_reloader(&self) -> Option<TlsReloader> {
        self.tls.as_ref().map(|(_, reloader)| reloader.clone())
    }

    /// The readiness flag `/readyz` reports.
    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight requests finish for at
    /// most `server.shutdown_timeout`, and returns.
    pub async fn serve(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        let main_addr = listeners.main.local_addr()?;
        let admin_addr = listeners.admin.local_addr()?;
        let mut limits = RateLimits::new(&self.config.limits);
        if let Some(redis) = self.auth.as_ref().and_then(|auth| auth.redis()) {
            limits = limits.shared(redis);
        }
        let limits = Arc::new(limits);
        // Raised when the drain deadline passes: connections still open then are cut off.
        let cut_off = Arc::new(Signal::default());
        let tunnels = Tunnels {
            tracker: tokio_util::task::TaskTracker::new(),
            cut_off: cut_off.clone(),
        };
        let gateway = Arc::new(Gateway::new(
            &self.config,
            self.auth.clone(),
            self.authenticator.clone(),
            self.metrics.clone(),
            limits.clone(),
            tunnels.clone(),
        ));
        // Once a minute: rate-limit state of clients that have gone quiet is dropped, and so are
        // expired sessions.
        let sessions = self.auth.as_ref().map(|auth| auth.sessions().clone());
        let pruning = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(60));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                limits.prune();
                if let Some(sessions) = &sessions {
                    sessions.sweep(crate::auth::service::unix_now());
                }
            }
        });
        let admin = Admin {
            metrics: self.metrics.clone(),
            readiness: self.readiness.clone(),
            auth: self.auth.clone(),
        };
        let builder = connection_builder(&self.config.limits);
        let admin_builder = connection_builder(&crate::config::Config::default_limits());
        // At most this many client connections at once; the next accept waits for one to close
        // (the kernel's backlog holds the newcomers meanwhile).
        let connections = Arc::new(Semaphore::new(self.config.limits.max_connections));
        let graceful = GracefulShutdown::new();
        // Client connections, whichever lane serves them: shutdown waits for them all. `draining`
        // tells the fast lane's connections to finish the request in flight and take no other (the
        // ones hyper serves hear it from `graceful`).
        let clients = tokio_util::task::TaskTracker::new();
        let draining = Arc::new(Signal::default());
        let handover = || crate::gateway::fast::Handover {
            builder: builder.clone(),
            watcher: graceful.watcher(),
            draining: draining.clone(),
        };

        self.readiness.set(true);
        tracing::info!(listen = %main_addr, admin = %admin_addr, "wxgate ready");

        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                (accepted, permit) = accept_within(&listeners.main, &connections) => {
                    let Some((stream, peer)) = accepted_or_pause(accepted, "main").await else { continue };
                    let Some((acceptor, _)) = &self.tls else {
                        // Proxied requests are small writes that must not wait for Nagle.
                        let _ = stream.set_nodelay(true);
                        let client = Arc::new(ClientInfo::new(peer.ip(), "http"));
                        // Boxed where it is made: a future passed by value into the task's layers
                        // (this block, `connection_task`) would otherwise be laid out again in each
                        // of them: every connection's task was ~4 times the future (18.8 KB).
                        let served = Box::pin(crate::gateway::fast::serve(gateway.clone(), stream, client, handover()));
                        clients.spawn(connection_task(async move {
                            let _permit = permit;
                            served.await
                        }, peer, cut_off.clone()));
                        continue;
                    };
                    // The handshake runs in the connection's task, bounded by the header timeout, so
                    // a slow or silent client never holds up the accept loop.
                    let (acceptor, handover) = (acceptor.clone(), handover());
                    let gateway = gateway.clone();
                    let handshake_timeout = self.config.limits.header_timeout;
                    clients.spawn(connection_task(Box::pin(async move {
                        let _permit = permit;
                        let _ = stream.set_nodelay(true);
                        let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => return Err(format!("TLS handshake failed: {e}").into()),
                            Err(_) => return Err("TLS handshake timed out".into()),
                        };
                        let client = Arc::new(ClientInfo::new(peer.ip(), "https"));
                        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                            let service = gateway.service_with(client);
                            let connection = handover.builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
                            return handover.watcher.watch(connection.into_owned()).await;
                        }
                        crate::gateway::fast::serve(gateway, tls, client, handover).await
                    }), peer, cut_off.clone()));
                }
                accepted = listeners.admin.accept() => {
                    let Some((stream, peer)) = accepted_or_pause(accepted, "admin").await else { continue };
                    let admin = admin.clone();
                    let service = service_fn(move |request| {
                        let admin = admin.clone();
                        async move { admin.handle(request).await }
                    });
                    let connection = admin_builder.serve_connection(io(stream), service);
                    tokio::spawn(connection_task(graceful.watch(connection.into_owned()), peer, cut_off.clone()));
                }
            }
        }

        // Not ready first, so that health checks stop routing here; then stop accepting.
        self.readiness.set(false);
        pruning.abort();
        drop(listeners);
        let open = clients.len();
        tunnels.tracker.close();
        clients.close();
        tracing::info!(connections = open, upgraded = tunnels.tracker.len(), timeout = ?self.config.server.shutdown_timeout, "shutting down, draining connections");
        draining.raise();
        let drained = async {
            tokio::join!(graceful.shutdown(), clients.wait());
            tunnels.tracker.wait().await;
        };
        match tokio::time::timeout(self.config.server.shutdown_timeout, drained).await {
            Ok(()) => tracing::info!("all connections drained"),
            Err(_) => {
                tracing::warn!("shutdown timeout reached; closing the remaining connections");
                cut_off.raise();
            }
        }
        Ok(())
    }
}

/// Serves `config` on freshly bound listeners until `shutdown`.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let server = Server::new(config.clone()).await?;
    if let Some(reloader) = server.tls_reloader() {
        // Installed before the listeners are bound, so no SIGHUP after readiness is missed (or kills
        // the process with the default action).
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        tokio::spawn(reload_on_sighup(hangup, reloader));
    }
    let listeners = Listeners::bind(&config).await?;
    server.serve(listeners, shutdown).await?;
    Ok(())
}

/// HTTP/1.1 and HTTP/2 settings from `[limits]`.
/// Reloads the TLS certificate on every SIGHUP; a failed reload keeps the current one.
async fn reload_on_sighup(mut hangup: tokio::signal::unix::Signal, reloader: TlsReloader) {
    while hangup.recv().await.is_some() {
        match reloader.reload() {
            Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: TLS certificate not reloaded; keeping the current one")
            }
        }
    }
}

fn connection_builder(limits: &LimitsConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let mut http1 = builder.http1();
    // The header timer also runs while a keep-alive connection waits for its next request, so it
    // closes idle connections and clients that send their head too slowly (slowloris).
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        // Past this, the head is answered 431.
        .max_buf_size(limits.max_header_bytes.max(8192));
    // hyper parses up to 100 headers on the stack; any other limit costs a heap allocation a request.
    if limits.max_headers != 100 {
        http1.max_headers(limits.max_headers);
    }
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        // Pings find peers that vanished without closing the connection.
        .keep_alive_interval(limits.idle_timeout)
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// Waits for a connection slot, then accepts.
async fn accept_within(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> (io::Result<(TcpStream, SocketAddr)>, OwnedSemaphorePermit) {
    let permit = slots
        .clone()
        .acquire_owned()
        .await
        .expect("the connection semaphore is never closed");
    (listener.accept().await, permit)
}

fn io(stream: TcpStream) -> TokioIo<TcpStream> {
    // Proxied requests are small writes that must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    TokioIo::new(stream)
}

/// Accept errors are usually per-connection (a reset before accept) or a full file table; neither
/// may end the server, and the latter must not spin the loop.
async fn accepted_or_pause(
    accepted: io::Result<(TcpStream, SocketAddr)>,
    listener: &'static str,
) -> Option<(TcpStream, SocketAddr)> {
    match accepted {
        Ok(pair) => Some(pair),
        Err(e) => {
            tracing::warn!(listener, error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

/// A connection's task: it ends with the connection, or when the drain deadline cuts it off.
async fn connection_task<F, E>(connection: F, peer: SocketAddr, cut_off: Arc<Signal>)
where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::select! {
        // The connection first: it is what wakes the task, many times a second.
        biased;
        result = connection => {
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        }
        () = cut_off.raised() => tracing::debug!(%peer, "connection cut off at the shutdown timeout"),
    }
}

/// A step of shutdown that every connection watches (draining, then the cut-off): raised once,
/// checked with an atomic load, and awaited by each task registering with it once.
///
/// Its future is polled every time a connection's task wakes, several times per request. A
/// `CancellationToken`'s future locks a mutex shared by every connection on each poll (twice: its
/// flag, then its `Notify`); this one locks only when the task's waker is not the one it registered.
#[derive(Debug, Default)]
pub struct Signal {
    raised: AtomicBool,
    notify: Arc<Notify>,
}

impl Signal {
    pub fn raise(&self) {
        self.raised.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::SeqCst)
    }

    /// Completes once the signal is raised.
    pub fn raised(&self) -> Raised<'_> {
        Raised {
            signal: self,
            notified: Box::pin(self.notify.clone().notified_owned()),
            registered: None,
        }
    }
}

/// The future of [`Signal::raised`].
pub struct Raised<'s> {
    signal: &'s Signal,
    // Created with the future: a `notify_waiters` after that wakes it even before its first poll.
    notified: Pin<Box<tokio::sync::futures::OwnedNotified>>,
    /// The waker the `Notify` holds for this future.
    registered: Option<Waker>,
}

impl Future for Raised<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.is_raised() {
            return Poll::Ready(());
        }
        if self
            .registered
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()))
        {
            // The same task as before: the Notify will wake it.
            return Poll::Pending;
        }
        if self.notified.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        self.registered = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// A bare accept loop for wxgate's helper servers (the sample backend, the mock WeChat): HTTP/1.1 and
/// h2c, each request answered by `handler`. It runs until the returned task is aborted.
pub fn spawn_plain<F, Fut>(listener: TcpListener, handler: F) -> tokio::task::JoinHandle<()>
where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = http::Response<crate::body::Body>> + Send + 'static,
{
    tokio::spawn(async move {
        let builder = auto::Builder::new(TokioExecutor::new());
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let handler = handler.clone();
            let service = service_fn(move |request| {
                let response = handler(request);
                async move { Ok::<_, std::convert::Infallible>(response.await) }
            });
            let connection = builder
                .serve_connection_with_upgrades(io(stream), service)
                .into_owned();
            tokio::spawn(async move {
                let _ = connection.await;
            });
        }
    })
}

/// Completes on SIGINT or SIGTERM (for the helper processes: the mock WeChat, the sample backend).
pub async fn until_signalled() -> io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A waker that counts its wakes.
    struct Counter(AtomicUsize);

    impl futures_util::task::ArcWake for Counter {
        fn wake_by_ref(arc_self: &Arc<Self>) {
            arc_self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting() -> (Arc<Counter>, Waker) {
        let counter = Arc::new(Counter(AtomicUsize::new(0)));
        (counter.clone(), futures_util::task::waker(counter))
    }

    #[test]
    fn a_raised_signal_wakes_the_waker_it_holds_last() {
        let signal = Signal::default();
        let mut raised = std::pin::pin!(signal.raised());
        let (first, first_waker) = counting();
        let (second, second_waker) = counting();
        let mut cx = Context::from_waker(&first_waker);
        assert!(raised.as_mut().poll(&mut cx).is_pending());
        // Polled again by the same task: nothing to register.
        assert!(raised.as_mut().poll(&mut cx).is_pending());
        // Moved to another task: the new waker is the one woken.
        let mut cx = Context::from_waker(&second_waker);
        assert!(raised.as_mut().poll(&mut cx).is_pending());
        signal.raise();
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
        assert!(raised.as_mut().poll(&mut cx).is_ready());
        assert!(signal.is_raised());
    }

    #[test]
    fn a_signal_raised_before_the_first_poll_is_seen() {
        let signal = Signal::default();
        let mut early = std::pin::pin!(signal.raised());
        signal.raise();
        let (_, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        assert!(early.as_mut().poll(&mut cx).is_ready());
        assert!(std::pin::pin!(signal.raised()).poll(&mut cx).is_ready());
    }

    #[tokio::test]
    async fn every_waiting_task_ends_when_the_signal_is_raised() {
        let signal = Arc::new(Signal::default());
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let signal = signal.clone();
                tokio::spawn(async move { signal.raised().await })
            })
            .collect();
        tokio::task::yield_now().await;
        signal.raise();
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("woken in time")
                .unwrap();
        }
    }
}
