//! The client for plain `http://` targets reached without a proxy: hyper's HTTP/1.1
//! connection driven inside the delivering task itself, rather than by a connection task of
//! its own that the request and its answer would each cross to, and idle connections pooled
//! per target address. `https://` targets, credentials in the URL and proxies go through
//! reqwest ([`super::post`]); both clients answer alike (redirects are answers, the target
//! rules apply to every address a name resolves to, `user-agent` and `accept` as reqwest's).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper::header::{ACCEPT, HOST, HeaderMap, HeaderValue, USER_AGENT};
use hyper::{Method, Request, Response, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use url::{Host, Position, Url};

use crate::delivery::post::{Answer, BoundedBody, PostResult, error_chain, retry_after};
use crate::delivery::resolver::{ResolveError, resolve_allowed};
use crate::enrollment::target::TargetPolicy;

type Conn = Connection<TokioIo<TcpStream>, Full<Bytes>>;

/// A connection idle longer than this is closed rather than reused (reqwest's default too).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How often the reaper closes expired idle connections and those the target closed.
const REAP_INTERVAL: Duration = Duration::from_secs(30);
/// Idle connections kept per target address; one handed back beyond it is closed.
const MAX_IDLE_PER_TARGET: usize = 256;

/// The process' client for plain-HTTP targets: the target rules, and the idle pools.
pub struct PlainHttp {
    policy: Arc<TargetPolicy>,
    user_agent: HeaderValue,
    /// One pool per `host:port`, shared by every enrollment posting there, so a fleet of
    /// enrollments on one target keeps as many idle connections as it used at once.
    pools: Mutex<HashMap<String, Arc<IdlePool>>>,
}

/// Where one enrollment POSTs, resolved from its URL once.
pub struct PlainTarget {
    pool: Arc<IdlePool>,
    /// A domain name to resolve per new connection, or an IP literal (checked when enrolled).
    host: TargetHost,
    port: u16,
    host_header: HeaderValue,
    /// Origin form (`/path?query`), as an HTTP/1.1 request line to the origin carries it.
    path: Uri,
}

enum TargetHost {
    Name(String),
    Ip(IpAddr),
}

#[derive(Default)]
struct IdlePool {
    idle: Mutex<Vec<IdleConnection>>,
}

struct IdleConnection {
    sender: SendRequest<Full<Bytes>>,
    connection: Conn,
    since: Instant,
}

/// Why no answer came.
#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error("tcp connect error: {0}")]
    Connect(std::io::Error),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

impl PlainHttp {
    pub fn new(policy: TargetPolicy, user_agent: HeaderValue) -> Self {
        Self {
            policy: Arc::new(policy),
            user_agent,
            pools: Mutex::default(),
        }
    }

    /// The target behind `url` when this client can reach it: `http`, no credentials in
    /// the URL (reqwest turns them into basic auth), a host.
    pub fn target(&self, url: &Url) -> Option<PlainTarget> {
        if url.scheme() != "http" || !url.username().is_empty() || url.password().is_some() {
            return None;
        }
        let port = url.port_or_known_default()?;
        let host = match url.host()? {
            Host::Domain(name) => TargetHost::Name(name.to_string()),
            Host::Ipv4(ip) => TargetHost::Ip(ip.into()),
            Host::Ipv6(ip) => TargetHost::Ip(ip.into()),
        };
        let authority = &url[Position::BeforeHost..Position::AfterPort];
        let host_header = HeaderValue::from_str(authority).ok()?;
        let path = Uri::try_from(&url[Position::BeforePath..Position::AfterQuery]).ok()?;
        let pool = Arc::clone(
            lock(&self.pools)
                .entry(format!("{}:{port}", url.host_str()?))
                .or_default(),
        );
        Some(PlainTarget {
            pool,
            host,
            port,
            host_header,
            path,
        })
    }

    /// One POST, bounded by `timeout` from connect to the end of the answer's body, of which
    /// at most `max_body` bytes are read (and, with `keep`, kept): as [`super::post::post`].
    pub async fn post(
        &self,
        target: &PlainTarget,
        headers: HeaderMap,
        body: Bytes,
        (timeout, max_body): (Duration, usize),
        keep: bool,
    ) -> (PostResult, Option<Answer>) {
        // Boxed: hyper's futures would otherwise widen every delivery's.
        let exchange = Box::pin(self.exchange(target, headers, body, max_body, keep));
        match tokio::time::timeout(timeout, exchange).await {
            Err(_) => (PostResult::Timeout, None),
            Ok(Ok(answered)) => answered,
            Ok(Err(ExchangeError::Resolve(ResolveError::Blocked(blocked)))) => {
                (PostResult::Blocked(blocked.to_string()), None)
            }
            Ok(Err(e)) => (PostResult::Network(error_chain(&e)), None),
        }
    }

    async fn exchange(
        &self,
        target: &PlainTarget,
        mut headers: HeaderMap,
        body: Bytes,
        max_body: usize,
        keep: bool,
    ) -> Result<(PostResult, Option<Answer>), ExchangeError> {
        headers.insert(HOST, target.host_header.clone());
        headers
            .entry(USER_AGENT)
            .or_insert_with(|| self.user_agent.clone());
        headers
            .entry(ACCEPT)
            .or_insert_with(|| HeaderValue::from_static("*/*"));
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = target.path.clone();
        *request.headers_mut() = headers;
        // A pooled connection the target has closed since shows it when first polled again
        // (the close is read), or only once written to; a request hyper hands back unsent
        // goes on the next one. Each pass takes one connection out of the pool or dials, so
        // this ends.
        loop {
            let (mut sender, mut connection, pooled) = match target.pool.take() {
                Some(idle) => (idle.sender, idle.connection, true),
                None => {
                    let (sender, connection) = self.dial(target).await?;
                    (sender, connection, false)
                }
            };
            let mut open = true;
            let ready = drive(&mut connection, &mut open, |cx| sender.poll_ready(cx)).await;
            if let Err(e) = ready {
                if pooled {
                    continue;
                }
                return Err(e.into());
            }
            let mut sending = pin!(sender.try_send_request(request));
            let sent = drive(&mut connection, &mut open, |cx| sending.as_mut().poll(cx)).await;
            let response = match sent {
                Ok(response) => response,
                Err(mut e) => match e.take_message() {
                    Some(unsent) if pooled => {
                        request = unsent;
                        continue;
                    }
                    _ => return Err(e.into_error().into()),
                },
            };
            let (answered, reusable) =
                read_answer(&mut connection, &mut open, response, max_body, keep).await;
            if reusable && open {
                target.pool.put(IdleConnection {
                    sender,
                    connection,
                    since: Instant::now(),
                });
            }
            return Ok(answered);
        }
    }

    async fn dial(
        &self,
        target: &PlainTarget,
    ) -> Result<(SendRequest<Full<Bytes>>, Conn), ExchangeError> {
        let addresses = match &target.host {
            TargetHost::Ip(ip) => vec![SocketAddr::new(*ip, target.port)],
            TargetHost::Name(name) => resolve_allowed(&self.policy, name, target.port).await?,
        };
        let mut failed = None;
        for address in addresses {
            match TcpStream::connect(address).await {
                Ok(stream) => {
                    stream.set_nodelay(true).map_err(ExchangeError::Connect)?;
                    return Ok(http1::handshake(TokioIo::new(stream)).await?);
                }
                Err(e) => failed = Some(e),
            }
        }
        Err(ExchangeError::Connect(failed.unwrap_or_else(|| {
            std::io::Error::other("the name resolved to no address")
        })))
    }

    /// Closes idle connections past [`IDLE_TIMEOUT`] or closed by the target, and forgets
    /// the pools no enrollment uses any more, every [`REAP_INTERVAL`] until `stop`.
    pub async fn reap_idle(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(REAP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.reap(Instant::now()),
            }
        }
    }

    fn reap(&self, now: Instant) {
        lock(&self.pools).retain(|_, pool| {
            let left = pool.reap(now);
            left > 0 || Arc::strong_count(pool) > 1
        });
    }
}

impl IdlePool {
    /// The most recently used idle connection not expired: the older ones are the first to
    /// expire, and a pool sized for a burst shrinks back. Whether the target closed it is
    /// seen when the connection is first polled again, before the request is handed to it.
    fn take(&self) -> Option<IdleConnection> {
        loop {
            let idle = lock(&self.idle).pop()?;
            if idle.since.elapsed() < IDLE_TIMEOUT {
                return Some(idle);
            }
        }
    }

    fn put(&self, connection: IdleConnection) {
        let mut idle = lock(&self.idle);
        if idle.len() < MAX_IDLE_PER_TARGET {
            idle.push(connection);
        }
    }

    /// Drops the expired connections and those the target closed; returns how many are left.
    fn reap(&self, now: Instant) -> usize {
        let mut idle = lock(&self.idle);
        idle.retain_mut(|c| now.duration_since(c.since) < IDLE_TIMEOUT && c.still_open());
        idle.len()
    }
}

impl IdleConnection {
    /// Polls the idle connection once, without a waker: it reads the target's close (or an
    /// unasked-for byte, which also ends it) if one came while nobody was polling.
    fn still_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(&mut self.connection).poll(&mut cx).is_pending() && !self.sender.is_closed()
    }
}

/// Polls `step` while driving the connection beside it, as its own task would; `open` turns
/// false once the connection has ended (and `step` then ends with hyper's error).
async fn drive<T>(
    connection: &mut Conn,
    open: &mut bool,
    mut step: impl FnMut(&mut Context<'_>) -> Poll<T>,
) -> T {
    std::future::poll_fn(|cx| {
        if *open && Pin::new(&mut *connection).poll(cx).is_ready() {
            *open = false;
        }
        step(cx)
    })
    .await
}

/// The answer's status and `Retry-After`, its body read to the end (or past `max_body`) and,
/// with `keep`, kept; and whether the connection can carry another request.
async fn read_answer(
    connection: &mut Conn,
    open: &mut bool,
    response: Response<Incoming>,
    max_body: usize,
    keep: bool,
) -> ((PostResult, Option<Answer>), bool) {
    let (parts, mut body) = response.into_parts();
    let code = parts.status.as_u16();
    let retry_after = retry_after(code, &parts.headers);
    let mut bounded = BoundedBody::new(max_body, keep);
    let (truncated, reusable) = loop {
        let mut next = body.frame();
        let frame = drive(connection, open, |cx| Pin::new(&mut next).poll(cx)).await;
        let Some(Ok(frame)) = frame else {
            // The end of the body, or a body cut short: what was read is the answer.
            break (false, frame.is_none());
        };
        if let Ok(chunk) = frame.into_data()
            && !bounded.add(&chunk)
        {
            break (true, false);
        }
    };
    let answer = keep.then(|| Answer {
        status: code,
        headers: parts.headers,
        body: Bytes::from(bounded.kept),
        truncated,
    });
    ((PostResult::Status { code, retry_after }, answer), reusable)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing holding these locks can leave the data half-changed.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// How the test target answers each request on a connection.
    #[derive(Clone, Copy)]
    enum Answering {
        /// 200 and the request's head echoed as the body; the connection kept.
        Echo,
        /// 200, then the connection closed by the target.
        ThenClose,
        /// A body of this many bytes.
        Long(usize),
        /// Nothing, ever.
        Silent,
    }

    struct TestTarget {
        url: Url,
        connections: Arc<AtomicUsize>,
        /// Connections the target has closed.
        closed: Arc<AtomicUsize>,
        server: tokio::task::JoinHandle<()>,
    }

    impl Drop for TestTarget {
        fn drop(&mut self) {
            self.server.abort();
        }
    }

    /// A raw HTTP/1.1 target, so what happens on each connection is the test's to say.
    async fn target(answering: Answering) -> TestTarget {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let connections = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (counted, closing) = (Arc::clone(&connections), Arc::clone(&closed));
        let server = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let closing = Arc::clone(&closing);
                tokio::spawn(async move {
                    while let Some(head) = read_request(&mut stream).await {
                        let answer = match answering {
                            Answering::Echo => head,
                            Answering::ThenClose => String::new(),
                            Answering::Long(n) => "x".repeat(n),
                            Answering::Silent => return std::future::pending().await,
                        };
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{answer}",
                            answer.len()
                        );
                        if stream.write_all(reply.as_bytes()).await.is_err()
                            || matches!(answering, Answering::ThenClose)
                        {
                            break;
                        }
                    }
                    drop(stream);
                    closing.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        TestTarget {
            url: Url::parse(&format!("http://127.0.0.1:{port}/hook?a=1")).expect("url"),
            connections,
            closed,
            server,
        }
    }

    /// One request's head (lower-cased), its body read past and dropped.
    async fn read_request(stream: &mut TcpStream) -> Option<String> {
        let mut seen = Vec::new();
        let mut byte = [0u8; 1];
        while !seen.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).await.ok()? == 0 {
                return None;
            }
            seen.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&seen).to_lowercase();
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|n| n.trim().parse::<usize>().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        stream.read_exact(&mut body).await.ok()?;
        Some(head)
    }

    /// A test target, a client and the client's route to it.
    async fn direct(answering: Answering) -> (TestTarget, PlainHttp, PlainTarget) {
        let server = target(answering).await;
        let client = client();
        let target = client.target(&server.url).expect("direct");
        (server, client, target)
    }

    fn client() -> PlainHttp {
        PlainHttp::new(
            TargetPolicy::default(),
            HeaderValue::from_static("hot-potato/test"),
        )
    }

    const BOUNDS: (Duration, usize) = (Duration::from_secs(5), 1024);

    async fn post(
        client: &PlainHttp,
        target: &PlainTarget,
        bounds: (Duration, usize),
    ) -> (PostResult, Option<Answer>) {
        let mut headers = HeaderMap::new();
        headers.insert("x-test", HeaderValue::from_static("yes"));
        client
            .post(target, headers, Bytes::from_static(b"{}"), bounds, true)
            .await
    }

    fn body_of(answer: Option<Answer>) -> String {
        answer
            .map(|a| String::from_utf8_lossy(&a.body).into_owned())
            .unwrap_or_default()
    }

    #[test]
    fn only_plain_http_without_credentials_goes_direct() {
        let client = client();
        for (url, direct) in [
            ("http://example.com/hook", true),
            ("http://10.0.0.1:8080/a?b=c", true),
            ("http://[::1]/x", true),
            ("https://example.com/hook", false),
            ("http://user:pass@example.com/hook", false),
            ("http://user@example.com/hook", false),
        ] {
            let target = client.target(&Url::parse(url).expect("url"));
            assert_eq!(target.is_some(), direct, "{url}");
        }
        let target = client
            .target(&Url::parse("http://Example.com:8080/p/q?r=s#frag").expect("url"))
            .expect("direct");
        assert_eq!(target.host_header, "example.com:8080");
        assert_eq!(target.path, "/p/q?r=s");
        assert_eq!(target.port, 8080);
    }

    #[tokio::test]
    async fn sequential_posts_share_one_connection_with_the_headers_reqwest_sent() {
        let (server, client, target) = direct(Answering::Echo).await;
        for _ in 0..3 {
            let (result, answer) = post(&client, &target, BOUNDS).await;
            assert_eq!(result.code(), Some(200));
            let head = body_of(answer);
            assert!(head.starts_with("post /hook?a=1 http/1.1\r\n"), "{head}");
            let port = server.url.port().expect("port");
            for line in [
                format!("host: 127.0.0.1:{port}"),
                "user-agent: hot-potato/test".into(),
                "accept: */*".into(),
                "content-length: 2".into(),
                "x-test: yes".into(),
            ] {
                assert!(head.contains(&line), "{line} missing from {head}");
            }
        }
        assert_eq!(server.connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_target_closed_is_not_reused() {
        let (server, client, target) = direct(Answering::ThenClose).await;
        for closes in 1..=3 {
            let (result, _) = post(&client, &target, BOUNDS).await;
            assert_eq!(result.code(), Some(200));
            // The next POST takes the pooled connection only once the target has closed it.
            let deadline = Instant::now() + Duration::from_secs(5);
            while server.closed.load(Ordering::SeqCst) < closes {
                assert!(Instant::now() < deadline, "the target never closed");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        assert_eq!(server.connections.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_answer_longer_than_the_bound_is_cut_and_its_connection_dropped() {
        let (server, client, target) = direct(Answering::Long(5000)).await;
        for _ in 0..2 {
            let (result, answer) = post(&client, &target, BOUNDS).await;
            assert_eq!(result.code(), Some(200));
            let answer = answer.expect("kept");
            assert!(answer.truncated);
            assert_eq!(answer.body.len(), 1024);
        }
        assert_eq!(server.connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_silent_target_times_out_and_a_closed_port_is_unreachable() {
        let (_server, client, target) = direct(Answering::Silent).await;
        let (result, _) = post(&client, &target, (Duration::from_millis(200), 1024)).await;
        assert_eq!(result, PostResult::Timeout);
        let closed = {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            listener.local_addr().expect("addr").port()
        };
        let url = Url::parse(&format!("http://127.0.0.1:{closed}/")).expect("url");
        let target = client.target(&url).expect("direct");
        let (result, _) = post(&client, &target, BOUNDS).await;
        assert!(
            matches!(&result, PostResult::Network(e) if e.contains("tcp connect error")),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn a_name_resolving_only_to_refused_addresses_is_blocked() {
        let strict = PlainHttp::new(
            TargetPolicy {
                deny_private: true,
                ..TargetPolicy::default()
            },
            HeaderValue::from_static("hot-potato/test"),
        );
        let server = target(Answering::Echo).await;
        let port = server.url.port().expect("port");
        let url = Url::parse(&format!("http://localhost:{port}/")).expect("url");
        let target = strict.target(&url).expect("direct");
        let (result, _) = post(&strict, &target, BOUNDS).await;
        assert!(
            matches!(&result, PostResult::Blocked(why) if why.contains("localhost")),
            "{result:?}"
        );
        assert_eq!(server.connections.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn the_reaper_closes_expired_connections_and_forgets_unused_pools() {
        let (_server, client, target) = direct(Answering::Echo).await;
        post(&client, &target, BOUNDS).await;
        client.reap(Instant::now());
        assert_eq!(lock(&target.pool.idle).len(), 1, "a fresh connection stays");
        client.reap(Instant::now() + IDLE_TIMEOUT);
        assert_eq!(lock(&target.pool.idle).len(), 0, "an expired one goes");
        assert_eq!(lock(&client.pools).len(), 1, "a pool in use stays");
        drop(target);
        client.reap(Instant::now());
        assert!(lock(&client.pools).is_empty(), "an unused pool goes");
    }
}
