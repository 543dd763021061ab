//! The same GCRA in Redis, so replicas share buckets. One Lua script per check reads the
//! bucket's theoretical arrival time (TAT), decides, and writes it back atomically, on Redis's
//! own clock so replicas with skewed clocks still agree.

use std::{num::NonZeroU32, sync::Mutex, time::Duration};

use ::redis::{AsyncConnectionConfig, Client, RedisError, Script, aio::MultiplexedConnection};

use super::{Scope, Subject, Verdict};

/// A check that takes longer than this counts as Redis being unreachable.
const TIMEOUT: Duration = Duration::from_millis(500);

/// KEYS[1] = bucket; ARGV[1] = emission interval T (µs); ARGV[2] = tolerance τ = T·(N−1) (µs).
/// Returns {allowed (1/0), µs until the bucket is full again, µs to wait (0 when allowed)}.
const GCRA: &str = r"
local t = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
if now < tat - tau then
  return {0, tat - now, tat - tau - now}
end
local new_tat = tat + t
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, new_tat - now, 0}
";

pub struct RedisLimiter {
    client: Client,
    connection: Mutex<Option<MultiplexedConnection>>,
    script: Script,
    /// Per scope (indexed by `Scope as usize`): N per minute.
    limits: [NonZeroU32; Scope::ALL.len()],
}

impl RedisLimiter {
    pub fn new(url: &str, per_minute: impl Fn(Scope) -> NonZeroU32) -> Result<Self, RedisError> {
        Ok(Self {
            client: Client::open(url)?,
            connection: Mutex::new(None),
            script: Script::new(GCRA),
            limits: Scope::ALL.map(per_minute),
        })
    }

    /// Opens a fresh connection and proves it answers.
    pub async fn connect(&self) -> Result<(), RedisError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT));
        let mut connection = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        ::redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await?;
        *self.connection.lock().unwrap_or_else(|e| e.into_inner()) = Some(connection);
        Ok(())
    }

    pub async fn check(&self, scope: Scope, subject: &Subject) -> Result<Verdict, RedisError> {
        let connection = self
            .connection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(mut connection) = connection else {
            return Err(RedisError::from((redis::ErrorKind::Io, "not connected")));
        };
        let limit = self.limits[scope as usize].get();
        let t = 60_000_000 / u64::from(limit);
        let tau = t * u64::from(limit - 1);
        let key = format!("crm:ratelimit:{}:{subject}", scope.as_str());
        let (allowed, full_in, wait): (u8, u64, u64) = self
            .script
            .key(key)
            .arg(t)
            .arg(tau)
            .invoke_async(&mut connection)
            .await?;
        Ok(if allowed == 1 {
            Verdict {
                limit,
                // Room left under the tolerance, in whole requests.
                remaining: ((t + tau).saturating_sub(full_in) / t) as u32,
                reset: Duration::from_micros(full_in),
                retry_after: None,
            }
        } else {
            Verdict {
                limit,
                remaining: 0,
                reset: Duration::from_micros(full_in),
                retry_after: Some(Duration::from_micros(wait.max(1))),
            }
        })
    }
}
