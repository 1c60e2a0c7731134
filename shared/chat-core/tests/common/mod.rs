//! Test fixtures: a fresh embedded DynamoDB emulator per test, on a loopback port of its own.
#![allow(dead_code)]

use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_dynamodb::Client;
use chat_core::{Clock, Store, StoreOptions};
use dynoxide::Database;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const TABLE: &str = "chat-test";

/// A running server: its stop signal and its task.
type Server = (oneshot::Sender<()>, JoinHandle<Result<(), String>>);

/// One emulator: its data outlives stopping and restarting its HTTP server.
pub struct TestDb {
    db: Database,
    pub addr: SocketAddr,
    server: Option<Server>,
    pub clock: Arc<AtomicU64>,
}

impl TestDb {
    /// Starts an emulator on 127.0.0.1:0 and creates the table.
    pub async fn start() -> TestDb {
        let db = Database::memory().expect("in-memory emulator");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().unwrap();
        let mut test_db =
            TestDb { db, addr, server: None, clock: Arc::new(AtomicU64::new(1_800_000_000_000)) };
        test_db.serve(listener);
        chat_core::table::create_table(&test_db.client(), TABLE).await.expect("create table");
        test_db
    }

    fn serve(&mut self, listener: TcpListener) {
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let handle = tokio::spawn(dynoxide::server::serve_with_shutdown(listener, self.db.clone(), shutdown));
        self.server = Some((stop, handle));
    }

    /// Stops the HTTP server: requests now fail to connect. The data is kept.
    pub async fn stop_server(&mut self) {
        if let Some((stop, handle)) = self.server.take() {
            let _ = stop.send(());
            handle.await.expect("server task").expect("server stopped cleanly");
        }
    }

    /// Serves the same data on the same port again.
    pub async fn restart_server(&mut self) {
        let listener = TcpListener::bind(self.addr).await.expect("rebind the same port");
        self.serve(listener);
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client with the SDK's standard retries (3 attempts, backoff with jitter).
    pub fn client(&self) -> Client {
        client_for(&self.endpoint(), RetryConfig::standard())
    }

    /// A store on the test clock, which starts at a fixed instant and moves only when told.
    pub fn store(&self) -> Store {
        store_on(self.client(), &self.clock)
    }

    pub fn advance_ms(&self, ms: u64) {
        self.clock.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((stop, _)) = self.server.take() {
            let _ = stop.send(());
        }
    }
}

pub fn client_for(endpoint: &str, retry: RetryConfig) -> Client {
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .endpoint_url(endpoint)
        .retry_config(retry)
        .build();
    Client::from_conf(config)
}

pub fn store_on(client: Client, clock: &Arc<AtomicU64>) -> Store {
    Store::new(client, TABLE, StoreOptions::default()).with_clock(Clock::Manual(clock.clone()))
}

/// A loopback TCP proxy that, when armed, forwards a request and then swallows the response
/// and drops the connection: the write happened, the caller cannot know.
pub struct LossyProxy {
    pub addr: SocketAddr,
    drop_next_response: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl LossyProxy {
    pub async fn start(upstream: SocketAddr) -> LossyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let drop_next_response = Arc::new(AtomicBool::new(false));
        let armed = drop_next_response.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let armed = armed.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else { return };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let upstream_copy = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                    });
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match server_read.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if armed.swap(false, Ordering::SeqCst) {
                            break; // the request was served; its response is lost
                        }
                        if client_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    upstream_copy.abort();
                });
            }
        });
        LossyProxy { addr, drop_next_response, task }
    }

    /// The next response to arrive is dropped along with its connection.
    pub fn drop_next_response(&self) {
        self.drop_next_response.store(true, Ordering::SeqCst);
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
