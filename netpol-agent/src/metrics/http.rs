//! The HTTP endpoints: `GET /metrics`, `GET /healthz`, `GET /readyz` (HEAD works too).
//!
//! Plain hyper (HTTP/1.1 only): Prometheus and kubelet probes need nothing more, and hyper is
//! already in the dependency tree through kube-client.

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header::{HeaderValue, ALLOW, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use tokio::net::TcpListener;

use super::{Health, Liveness, Metrics, MetricsError};

/// Content type of `/metrics` (the encoder writes OpenMetrics text, ending in `# EOF`).
pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
const CONTENT_TYPE_TEXT: &str = "text/plain; charset=utf-8";

/// A client must send its request headers within this time, so idle or slow connections cannot
/// pile up (the endpoint is reachable from the whole pod network).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// On shutdown, open connections get this long to finish their current request.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again, so the loop
/// does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Binds `addr` and serves until `shutdown` completes. See [`serve_on`].
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Health,
    shutdown: impl Future<Output = ()>,
) -> Result<(), MetricsError> {
    let listener =
        TcpListener::bind(addr).await.map_err(|source| MetricsError::Bind { addr, source })?;
    serve_on(listener, metrics, health, shutdown).await
}

/// Serves on an already bound listener until `shutdown` completes, then stops accepting and
/// gives open connections a few seconds (`DRAIN_TIMEOUT`) to finish. Errors of single
/// connections are logged, never returned: one bad client must not stop the endpoint.
pub async fn serve_on(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Health,
    shutdown: impl Future<Output = ()>,
) -> Result<(), MetricsError> {
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(error) => {
                        tracing::warn!(%error, "metrics endpoint: accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                let metrics = Arc::clone(&metrics);
                let health = health.clone();
                let service = service_fn(move |req: Request<Incoming>| {
                    let response = route(&req, &metrics, &health);
                    async move { Ok::<_, Infallible>(response) }
                });
                let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move {
                    if let Err(error) = conn.await {
                        tracing::debug!(%error, %peer, "metrics endpoint: connection error");
                    }
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await.is_err() {
        tracing::warn!("metrics endpoint: connections still open after {DRAIN_TIMEOUT:?}, closing");
    }
    Ok(())
}

fn response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn route<B>(req: &Request<B>, metrics: &Metrics, health: &Health) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r =
            response(StatusCode::METHOD_NOT_ALLOWED, CONTENT_TYPE_TEXT, "method not allowed\n");
        r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => match metrics.encode() {
            Ok(text) => response(StatusCode::OK, CONTENT_TYPE_OPENMETRICS, text),
            Err(error) => {
                tracing::error!(error = %error, "metrics endpoint: encoding failed");
                response(StatusCode::INTERNAL_SERVER_ERROR, CONTENT_TYPE_TEXT, format!("{error}\n"))
            }
        },
        "/healthz" => match health.liveness() {
            Liveness::Alive { .. } => response(StatusCode::OK, CONTENT_TYPE_TEXT, "ok\n"),
            Liveness::Stale { age, limit } => response(
                StatusCode::SERVICE_UNAVAILABLE,
                CONTENT_TYPE_TEXT,
                format!(
                    "sync loop stalled: last heartbeat {:.1}s ago (limit {:.1}s)\n",
                    age.as_secs_f64(),
                    limit.as_secs_f64()
                ),
            ),
        },
        "/readyz" => {
            if health.is_ready() {
                response(StatusCode::OK, CONTENT_TYPE_TEXT, "ready\n")
            } else {
                response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    CONTENT_TYPE_TEXT,
                    "not ready: first policy snapshot not enforced yet\n",
                )
            }
        }
        _ => response(StatusCode::NOT_FOUND, CONTENT_TYPE_TEXT, "not found\n"),
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
        sync::oneshot,
    };

    use super::*;
    use crate::metrics::{exposition, MetricsOptions};

    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
        }
    }

    /// A minimal HTTP/1.1 client: one request per connection, read until the server closes.
    async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let req =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read");
        let raw = String::from_utf8(raw).expect("utf-8 reply");
        let (head, body) = raw.split_once("\r\n\r\n").expect("header end");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().expect("status line");
        let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status");
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        Reply { status, headers, body: body.to_owned() }
    }

    async fn start(
        health: Health,
        metrics: Arc<Metrics>,
    ) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<Result<(), MetricsError>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_on(listener, metrics, health, async {
            // A dropped sender also stops the server.
            let _ = stopped.await;
        }));
        (addr, stop, task)
    }

    #[tokio::test]
    async fn endpoints_report_metrics_liveness_and_readiness() {
        let metrics = Arc::new(Metrics::new(MetricsOptions::default()));
        metrics.set_source_up(true);
        let health = Health::new(Duration::from_secs(60));
        let (addr, stop, task) = start(health.clone(), Arc::clone(&metrics)).await;

        let r = request(addr, "GET", "/readyz").await;
        assert_eq!(r.status, 503);
        assert!(r.body.contains("not ready"), "{}", r.body);
        let r = request(addr, "GET", "/healthz").await;
        assert_eq!(r.status, 200, "{}", r.body);

        let r = request(addr, "GET", "/metrics").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some(CONTENT_TYPE_OPENMETRICS));
        let samples = exposition::parse(&r.body);
        assert_eq!(exposition::series(&samples, "netpol_source_up").values().next(), Some(&1.0));

        health.set_ready();
        health.beat();
        let r = request(addr, "GET", "/readyz").await;
        assert_eq!(r.status, 200, "{}", r.body);
        let r = request(addr, "HEAD", "/readyz").await;
        assert_eq!(r.status, 200);
        assert!(r.body.is_empty(), "HEAD has no body: {:?}", r.body);

        assert_eq!(request(addr, "GET", "/nope").await.status, 404);
        let r = request(addr, "POST", "/metrics").await;
        assert_eq!(r.status, 405);
        assert_eq!(r.header("allow"), Some("GET, HEAD"));

        stop.send(()).expect("server still running");
        let result = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("server stops after shutdown")
            .expect("server task did not panic");
        assert!(result.is_ok(), "{result:?}");
        assert!(TcpStream::connect(addr).await.is_err(), "listener closed after shutdown");
    }

    #[tokio::test]
    async fn healthz_fails_when_the_loop_stops_beating() {
        let metrics = Arc::new(Metrics::new(MetricsOptions::default()));
        let health = Health::new(Duration::from_millis(1));
        let (addr, stop, task) = start(health.clone(), metrics).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = request(addr, "GET", "/healthz").await;
        assert_eq!(r.status, 503);
        assert!(r.body.contains("stalled"), "{}", r.body);
        drop(stop);
        let result = tokio::time::timeout(Duration::from_secs(10), task).await.expect("stops");
        assert!(matches!(result, Ok(Ok(()))), "{result:?}");
    }

    #[tokio::test]
    async fn serve_reports_a_bind_error() {
        let taken = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = taken.local_addr().expect("local addr");
        let metrics = Arc::new(Metrics::new(MetricsOptions::default()));
        let err = serve(addr, metrics, Health::new(Duration::from_secs(1)), std::future::pending())
            .await
            .expect_err("address in use");
        assert!(matches!(err, MetricsError::Bind { addr: a, .. } if a == addr), "{err:?}");
    }
}
