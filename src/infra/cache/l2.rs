//! L2 in Redis: the stored format (`<written at>:<format>:<bytes>`), reads (one, or many in a
//! pipeline), and the fill script that writes only while the key's version is unchanged.

use super::*;

pub(super) const VERSION_TTL_MS: u64 = 4 * 3600 * 1000;

pub(super) struct L2Read {
    pub(super) value: Option<Bytes>,
    pub(super) pttl_ms: i64,
    pub(super) version: String,
}

/// An L2 read made ahead of its lookup, and the key's epoch when it was made.
pub struct Prefetched {
    pub(super) l1_key: String,
    pub(super) epoch: (u64, u64),
    pub(super) read: L2Read,
}

/// Reads an entry, its remaining TTL and its fill version. Entries are stored as
/// `<written at, Redis ms>:<format>:<bytes>`; one written before `trusted_since_ms`, or in
/// another format than its namespace's, reads as a miss.
pub(super) async fn read_l2(
    redis: &Redis,
    keys: &KeyRegistry,
    key: &CacheKey,
    trusted_since_ms: u64,
) -> Result<L2Read, RedisFailure> {
    let mut reads = read_l2_many(redis, keys, std::slice::from_ref(key), trusted_since_ms).await?;
    Ok(reads.pop().expect("one read per key"))
}

/// `read_l2` for several keys, in one pipeline.
pub(super) async fn read_l2_many(
    redis: &Redis,
    keys: &KeyRegistry,
    wanted: &[CacheKey],
    trusted_since_ms: u64,
) -> Result<Vec<L2Read>, RedisFailure> {
    let mut pipe = redis::pipe();
    for key in wanted {
        match key.field() {
            Some(field) => pipe.cmd("HGET").arg(key.redis_key()).arg(field),
            None => pipe.cmd("GET").arg(key.redis_key()),
        };
        pipe.cmd("PTTL")
            .arg(key.redis_key())
            .cmd("GET")
            .arg(keys.version_of(key.redis_key()));
    }
    let replies: Vec<redis::Value> = redis
        .call(|mut c| async move { pipe.query_async(&mut c).await })
        .await?;
    let mut replies = replies.into_iter();
    let mut reads = Vec::with_capacity(wanted.len());
    for key in wanted {
        let value: Option<Vec<u8>> = next_reply(&mut replies)?;
        let pttl_ms: i64 = next_reply(&mut replies)?;
        let version: Option<String> = next_reply(&mut replies)?;
        reads.push(L2Read {
            value: value.and_then(|stored| current_payload(stored, key, trusted_since_ms)),
            pttl_ms,
            version: version.unwrap_or_default(),
        });
    }
    Ok(reads)
}

/// The next reply of a pipeline, as `T`.
pub(super) fn next_reply<T: redis::FromRedisValue>(
    replies: &mut impl Iterator<Item = redis::Value>,
) -> Result<T, RedisFailure> {
    let reply = replies.next().unwrap_or(redis::Value::Nil);
    redis::from_redis_value(reply).map_err(|err| RedisFailure::Command(err.into()))
}

/// The payload of a stored entry, if it was written since `trusted_since_ms` in its namespace's
/// current format.
pub(super) fn current_payload(stored: Vec<u8>, key: &CacheKey, trusted_since_ms: u64) -> Option<Bytes> {
    let field = |from: usize| {
        let colon = from + stored[from..].iter().position(|b| *b == b':')?;
        let number: u64 = std::str::from_utf8(&stored[from..colon]).ok()?.parse().ok()?;
        Some((number, colon + 1))
    };
    let (written_ms, format_at) = field(0)?;
    let (format, payload_at) = field(format_at)?;
    let current = written_ms >= trusted_since_ms && format == u64::from(key.namespace.format());
    current.then(|| Bytes::from(stored).slice(payload_at..))
}

/// Writes only if the key's version is still the one read before loading (no invalidation since),
/// and a grouped entry only while its hash holds fewer than `max_fields` other fields.
pub(super) fn fill_script() -> &'static Script {
    static SCRIPT: OnceLock<Script> = OnceLock::new();
    SCRIPT.get_or_init(|| {
        Script::new(
            r"
            local current = redis.call('GET', KEYS[2]) or ''
            if current ~= ARGV[1] then return 0 end
            local now = redis.call('TIME')
            local stamped = (now[1] * 1000 + math.floor(now[2] / 1000)) .. ':' .. ARGV[2]
            if ARGV[4] == '' then
                redis.call('SET', KEYS[1], stamped, 'PX', ARGV[3])
            else
                if redis.call('HEXISTS', KEYS[1], ARGV[4]) == 0
                    and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[5]) then return 0 end
                redis.call('HSET', KEYS[1], ARGV[4], stamped)
                if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
            end
            return 1",
        )
    })
}

pub(super) async fn write_l2(
    redis: &Redis,
    keys: &KeyRegistry,
    key: &CacheKey,
    entry: (&Bytes, Duration),
    version: String,
    max_fields: u32,
) -> Result<(), RedisFailure> {
    let (bytes, ttl) = entry;
    let mut formatted = format!("{}:", key.namespace.format()).into_bytes();
    formatted.extend_from_slice(bytes);
    let mut invocation = fill_script().key(key.redis_key());
    invocation
        .key(keys.version_of(key.redis_key()))
        .arg(version)
        .arg(formatted)
        .arg(ttl.as_millis() as u64)
        .arg(key.field().unwrap_or(""))
        .arg(max_fields);
    redis
        .call(|mut c| async move { invocation.invoke_async::<i64>(&mut c).await.map(|_| ()) })
        .await
}
