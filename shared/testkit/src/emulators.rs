//! The DynamoDB emulator (dynoxide, embedded in this process, atomic under races) and clients
//! for the local emulators.

use chat_core::{Store, StoreOptions};
use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::task::JoinHandle;

/// The emulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// The port is taken, or loopback refused it.
    #[error("port {port} on 127.0.0.1 is not free ({source}); set another port")]
    Port { port: u16, source: std::io::Error },
    /// dynoxide failed to open its database.
    #[error("dynoxide: {0}")]
    Database(String),
    /// Creating the table failed.
    #[error("creating the table: {0}")]
    Table(String),
}

/// Credentials the local emulators accept.
pub fn local_credentials() -> aws_sdk_dynamodb::config::Credentials {
    aws_sdk_dynamodb::config::Credentials::new("local", "local", None, None, "local-stack")
}

/// A DynamoDB client for the local emulator.
pub fn dynamodb_client(endpoint: &str) -> aws_sdk_dynamodb::Client {
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
        .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
        .credentials_provider(local_credentials())
        .endpoint_url(endpoint)
        .build();
    aws_sdk_dynamodb::Client::from_conf(config)
}

/// An SQS client for the local emulator.
pub fn sqs_client(endpoint: &str) -> aws_sdk_sqs::Client {
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
        .region(aws_sdk_sqs::config::Region::new("us-east-1"))
        .credentials_provider(local_credentials())
        .endpoint_url(endpoint)
        .build();
    aws_sdk_sqs::Client::from_conf(config)
}

/// A DynamoDB emulator (dynoxide) in this process on 127.0.0.1 with the table created. Dropping
/// it stops the server and removes its files.
///
/// The database is a file in a private scratch folder (in `/dev/shm` where there is one), not
/// dynoxide's in-memory database, so that [`Upkeep`] can open it a second time: dynoxide 3.2 gives
/// a long-running stack writes that slow down with its age (see [`Upkeep`]).
pub struct LocalDynamo {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    db: dynoxide::Database,
    upkeep: Arc<Upkeep>,
    task: JoinHandle<()>,
}

impl Drop for LocalDynamo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LocalDynamo {
    /// Starts the emulator on `port` (0 picks a free one) and creates `table`.
    pub async fn start(port: u16, table: &str) -> Result<LocalDynamo, EmulatorError> {
        let listener = StdListener::bind(("127.0.0.1", port))
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|source| EmulatorError::Port { port, source })?;
        let port = listener.local_addr().map_err(|source| EmulatorError::Port { port, source })?.port();
        let folder = ScratchFolder::create().map_err(|e| EmulatorError::Database(e.to_string()))?;
        let file = folder.0.join("dynamodb.sqlite");
        let db = dynoxide::Database::new(&file.to_string_lossy())
            .map_err(|e| EmulatorError::Database(e.to_string()))?;
        let served = db.clone();
        let task = tokio::spawn(async move {
            if let Err(e) =
                dynoxide::server::serve_with_shutdown(listener, served, std::future::pending()).await
            {
                tracing::error!(error = %e, "DynamoDB emulator stopped");
            }
        });
        let endpoint = format!("http://127.0.0.1:{port}");
        let created = chat_core::table::create_table(&dynamodb_client(&endpoint), table).await;
        if let Err(e) = created {
            task.abort();
            return Err(EmulatorError::Table(aws_sdk_dynamodb::error::DisplayErrorContext(&e).to_string()));
        }
        let upkeep = Upkeep::open(folder, &file, table).map_err(|e| {
            task.abort();
            EmulatorError::Database(format!("indexing the emulator's file: {e}"))
        })?;
        Ok(LocalDynamo { endpoint, db, upkeep: Arc::new(upkeep), task })
    }

    /// A store on `table` through this emulator.
    pub fn store(&self, table: &str, options: StoreOptions) -> Store {
        Store::new(dynamodb_client(&self.endpoint), table, options)
    }

    /// Removes every item whose TTL has passed (by the wall clock), as DynamoDB's TTL process
    /// does some time after expiry; each removal is on the table's stream, by the TTL service.
    /// Returns how many it removed. Costs one index lookup when nothing has expired (dynoxide's
    /// own sweep reads every item of the table).
    pub fn sweep_ttl(&self) -> Result<usize, EmulatorError> {
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if !self.upkeep.any_expired(now).map_err(|e| EmulatorError::Database(e.to_string()))? {
            return Ok(0);
        }
        self.db.sweep_ttl().map_err(|e| EmulatorError::Database(e.to_string()))
    }

    /// How many stream records the emulator holds (read ones are trimmed).
    pub fn stream_records(&self) -> Result<u64, EmulatorError> {
        self.upkeep.stream_records().map_err(|e| EmulatorError::Database(e.to_string()))
    }

    /// A reader of `table`'s stream from its start. It is the stream's only consumer: what it
    /// has read is trimmed from the emulator (see [`TableStream::next_event`]).
    pub fn stream(&self, table: &str) -> Result<TableStream, EmulatorError> {
        let fail = |e: dynoxide::DynoxideError| EmulatorError::Database(e.to_string());
        let streams = self.db.list_streams(request(serde_json::json!({"TableName": table}))).map_err(fail)?;
        let arn = serde_json::to_value(&streams)
            .ok()
            .and_then(|v| v["Streams"].get(0).and_then(|s| s["StreamArn"].as_str()).map(str::to_owned));
        let arn = arn.ok_or_else(|| EmulatorError::Database(format!("table {table} has no stream")))?;
        let described =
            self.db.describe_stream(request(serde_json::json!({"StreamArn": arn}))).map_err(fail)?;
        let shard = serde_json::to_value(&described).ok().and_then(|v| {
            v["StreamDescription"]["Shards"].get(0).and_then(|s| s["ShardId"].as_str()).map(str::to_owned)
        });
        let shard = shard.ok_or_else(|| EmulatorError::Database(format!("stream {arn} has no shard")))?;
        let iterator = self
            .db
            .get_shard_iterator(request(serde_json::json!({
                "StreamArn": arn, "ShardId": shard, "ShardIteratorType": "TRIM_HORIZON"
            })))
            .map_err(fail)?
            .shard_iterator;
        Ok(TableStream { db: self.db.clone(), upkeep: self.upkeep.clone(), iterator })
    }
}

/// What dynoxide 3.2 leaves undone for a stack that runs for hours, done through a second SQLite
/// connection to the emulator's file (SQLite's locking keeps the two apart; every statement here
/// is short):
/// - every write to a table with a stream computes the next sequence number as the `MAX` over
///   every stream record ever written, unindexed, and records are never trimmed: write cost grew
///   with the stack's age (12–20 ms a `PutItem` after ~1,000 turns). An index on the records'
///   sequence numbers makes that a lookup, and records already read are trimmed;
/// - its TTL sweep reads and parses every item; an index on the TTL attribute answers "has
///   anything expired?" first.
///
/// Both depend on dynoxide's private schema (`_stream_records`, a table per DynamoDB table with
/// `item_json`); `the_emulators_stream_and_ttl_lookups_use_an_index` fails if that changes under us.
struct Upkeep {
    conn: Mutex<rusqlite::Connection>,
    /// The DynamoDB table.
    table: String,
    /// The quoted SQL name of its data.
    data_table: String,
    _folder: ScratchFolder,
}

/// The SQLite expression dynoxide's TTL sweep reads: the TTL attribute as a number.
const TTL_EXPRESSION: &str = "CAST(json_extract(item_json, '$.expires_at.N') AS INTEGER)";

impl Upkeep {
    fn open(folder: ScratchFolder, file: &std::path::Path, table: &str) -> rusqlite::Result<Upkeep> {
        debug_assert_eq!(chat_core::table::TTL_ATTRIBUTE, "expires_at", "TTL_EXPRESSION names it");
        let conn = rusqlite::Connection::open(file)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let data_table = format!("\"{}\"", table.replace('"', "\"\""));
        conn.execute_batch(&format!(
            "CREATE INDEX IF NOT EXISTS chat_stream_by_table ON _stream_records \
               (table_name, CAST(sequence_number AS INTEGER));
             CREATE INDEX IF NOT EXISTS chat_stream_by_shard ON _stream_records \
               (table_name, shard_id, CAST(sequence_number AS INTEGER));
             CREATE INDEX IF NOT EXISTS chat_ttl ON {data_table} ({TTL_EXPRESSION});"
        ))?;
        Ok(Upkeep { conn: Mutex::new(conn), table: table.to_owned(), data_table, _folder: folder })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, rusqlite::Connection> {
        self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether any item's TTL is before `now` (epoch seconds), as dynoxide's sweep decides it.
    fn any_expired(&self, now: u64) -> rusqlite::Result<bool> {
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {} WHERE {TTL_EXPRESSION} >= 0 AND {TTL_EXPRESSION} < ?1)",
            self.data_table
        );
        self.conn().query_row(&sql, [now as i64], |row| row.get(0))
    }

    /// Removes the stream records up to and including the one with `event_id` (the public
    /// sequence numbers are offset from the stored ones; the ids are stored as they are).
    fn trim_stream(&self, event_id: &str) -> rusqlite::Result<usize> {
        self.conn().execute(
            "DELETE FROM _stream_records WHERE table_name = ?1 AND CAST(sequence_number AS INTEGER) <= \
               (SELECT CAST(sequence_number AS INTEGER) FROM _stream_records WHERE event_id = ?2)",
            rusqlite::params![self.table, event_id],
        )
    }

    fn stream_records(&self) -> rusqlite::Result<u64> {
        self.conn().query_row("SELECT COUNT(*) FROM _stream_records", [], |row| row.get(0))
    }
}

/// A private folder for the emulator's files, removed when dropped. Folders left by a process
/// that no longer runs (killed before it could remove its own) are removed when the next opens.
struct ScratchFolder(PathBuf);

impl ScratchFolder {
    fn create() -> std::io::Result<ScratchFolder> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let shm = std::path::Path::new("/dev/shm");
        let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        Self::remove_orphans(&base);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = base.join(format!("chat-dynamodb-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(ScratchFolder(path))
    }

    fn remove_orphans(base: &std::path::Path) {
        let Ok(entries) = std::fs::read_dir(base) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("chat-dynamodb-")) else { continue };
            let pid = pid.split('-').next().unwrap_or_default();
            if !pid.is_empty() && !std::path::Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

impl Drop for ScratchFolder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A dynoxide request from its JSON form (the requests' fields are the API's).
fn request<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("a well-formed stream request")
}

/// Reads a table's stream in order, as Lambda's event source mapping does.
pub struct TableStream {
    db: dynoxide::Database,
    upkeep: Arc<Upkeep>,
    iterator: Option<String>,
}

impl TableStream {
    /// The records written since the last call, as the event Lambda would deliver
    /// (`{"Records": [...]}`); `None` when there are none. The records returned are trimmed
    /// from the emulator, as DynamoDB trims a stream after 24 hours: this reader is the only one.
    pub fn next_event(&mut self) -> Result<Option<serde_json::Value>, EmulatorError> {
        let Some(iterator) = self.iterator.take() else { return Ok(None) };
        let page = self
            .db
            .get_records(request(serde_json::json!({"ShardIterator": iterator, "Limit": 1000})))
            .map_err(|e| EmulatorError::Database(e.to_string()))?;
        self.iterator = page.next_shard_iterator.clone();
        let Some(last) = page.records.last() else { return Ok(None) };
        self.upkeep.trim_stream(&last.event_id).map_err(|e| EmulatorError::Database(e.to_string()))?;
        let records =
            serde_json::to_value(&page.records).map_err(|e| EmulatorError::Database(e.to_string()))?;
        Ok(Some(serde_json::json!({ "Records": records })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_dynamodb::types::AttributeValue;

    const TABLE: &str = "upkeep";

    /// The statements dynoxide 3.2 runs on every write to a table with a stream
    /// (`Storage::next_stream_sequence_number`) and on every `GetRecords`.
    const DYNOXIDE_STREAM_QUERIES: [&str; 2] = [
        "SELECT COALESCE(MAX(CAST(sequence_number AS INTEGER)), 0) + 1 FROM _stream_records WHERE table_name = ?1",
        "SELECT event_name FROM _stream_records WHERE table_name = ?1 AND shard_id = ?2 \
         AND CAST(sequence_number AS INTEGER) > ?3 ORDER BY CAST(sequence_number AS INTEGER) ASC LIMIT ?4",
    ];

    async fn put(dynamo: &LocalDynamo, pk: &str, expires_at: u64) {
        dynamodb_client(&dynamo.endpoint)
            .put_item()
            .table_name(TABLE)
            .item("pk", AttributeValue::S(pk.to_owned()))
            .item("sk", AttributeValue::S("SESSION".to_owned()))
            .item(chat_core::table::TTL_ATTRIBUTE, AttributeValue::N(expires_at.to_string()))
            .send()
            .await
            .expect("put");
    }

    fn plan(upkeep: &Upkeep, sql: &str) -> String {
        let conn = upkeep.conn();
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).expect("the statement prepares");
        let params = (1..=stmt.parameter_count()).map(|_| rusqlite::types::Value::Integer(1));
        let rows = stmt
            .query_map(rusqlite::params_from_iter(params), |row| row.get::<_, String>(3))
            .expect("plan")
            .collect::<Result<Vec<_>, _>>()
            .expect("plan rows");
        rows.join("; ")
    }

    #[tokio::test]
    async fn the_emulators_stream_and_ttl_lookups_use_an_index() {
        let dynamo = LocalDynamo::start(0, TABLE).await.expect("emulator");
        for sql in DYNOXIDE_STREAM_QUERIES {
            let plan = plan(&dynamo.upkeep, sql);
            assert!(plan.contains("INDEX chat_stream_by"), "{sql}: {plan}");
        }
        let ttl = format!("SELECT 1 FROM \"{TABLE}\" WHERE {TTL_EXPRESSION} >= 0 AND {TTL_EXPRESSION} < ?1");
        let plan = plan(&dynamo.upkeep, &ttl);
        assert!(plan.contains("INDEX chat_ttl"), "{plan}");
    }

    #[tokio::test]
    async fn a_ttl_sweep_removes_exactly_the_expired_items() {
        let dynamo = LocalDynamo::start(0, TABLE).await.expect("emulator");
        put(&dynamo, "S#future", u64::MAX / 4).await;
        assert_eq!(dynamo.sweep_ttl().expect("sweep"), 0, "nothing has expired");
        put(&dynamo, "S#past", 1_000).await;
        put(&dynamo, "S#past-too", 2_000).await;
        assert_eq!(dynamo.sweep_ttl().expect("sweep"), 2);
        assert_eq!(dynamo.sweep_ttl().expect("sweep"), 0);
    }

    #[tokio::test]
    async fn stream_records_once_read_are_trimmed_and_later_ones_still_arrive() {
        let dynamo = LocalDynamo::start(0, TABLE).await.expect("emulator");
        let mut stream = dynamo.stream(TABLE).expect("stream");
        for n in 0..3 {
            put(&dynamo, &format!("S#{n}"), u64::MAX / 4).await;
        }
        assert_eq!(dynamo.stream_records().expect("count"), 3);
        let first = stream.next_event().expect("read").expect("records");
        assert_eq!(first["Records"].as_array().map(Vec::len), Some(3));
        assert_eq!(dynamo.stream_records().expect("count"), 0, "read records are trimmed");
        put(&dynamo, "S#3", u64::MAX / 4).await;
        let second = stream.next_event().expect("read").expect("records");
        let keys: Vec<_> = second["Records"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| r["dynamodb"]["Keys"]["pk"]["S"].clone())
            .collect();
        assert_eq!(keys, [serde_json::json!("S#3")]);
        assert_eq!(stream.next_event().expect("read"), None);
    }

    #[tokio::test]
    async fn the_emulators_files_are_removed_when_it_stops() {
        let dynamo = LocalDynamo::start(0, TABLE).await.expect("emulator");
        let folder = dynamo.upkeep._folder.0.clone();
        assert!(folder.join("dynamodb.sqlite").exists());
        drop(dynamo);
        assert!(!folder.exists());
    }
}
