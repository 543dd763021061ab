//! List paging (AIP-158): `page_size` (default 50, at most 500) and an opaque `page_token`
//! naming the last row seen in newest-first (created_at, id) order.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};

use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};

use crate::error::AppError;

pub const DEFAULT_PAGE_SIZE: u64 = 50;
pub const MAX_PAGE_SIZE: u64 = 500;

/// Where a page starts: just after this (created_at, id) in newest-first order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: DateTime<Utc>,
    pub id: String,
}

/// The number of rows to return: 0 means the default, larger than the maximum is capped.
pub fn limit(page_size: i32) -> Result<u64, AppError> {
    match page_size {
        s if s < 0 => Err(AppError::invalid_field("page_size", "must not be negative")),
        0 => Ok(DEFAULT_PAGE_SIZE),
        s => Ok((s as u64).min(MAX_PAGE_SIZE)),
    }
}

pub fn encode(c: &Cursor) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}|{}", c.created_at.timestamp_micros(), c.id))
}

pub fn decode(token: &str) -> Result<Cursor, AppError> {
    parse(token)
        .ok_or_else(|| AppError::invalid_field("page_token", "not a token from a previous page"))
}

fn parse(token: &str) -> Option<Cursor> {
    let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (micros, id) = text.split_once('|')?;
    uuid::Uuid::try_parse(id).ok()?;
    Some(Cursor {
        created_at: DateTime::from_timestamp_micros(micros.parse().ok()?)?,
        id: id.to_owned(),
    })
}

/// A row's place in newest-first order.
pub type Key = (DateTime<Utc>, String);

/// One page of `select` in newest-first (created_at, id) order, after `page_token`, and the
/// token of the next page ("" at the end). `convert` gives each row's key and its value.
pub async fn newest_first<E, T, C>(
    db: &C,
    select: sea_orm::Select<E>,
    (created_at, id): (E::Column, E::Column),
    page_size: i32,
    page_token: &str,
    convert: impl Fn(E::Model) -> (Key, Result<T, DbErr>),
) -> Result<(Vec<T>, String), AppError>
where
    E: EntityTrait,
    C: ConnectionTrait,
{
    let limit = limit(page_size)?;
    let mut select = select;
    if !page_token.is_empty() {
        let c = decode(page_token)?;
        select = select.filter(
            Condition::any().add(created_at.lt(c.created_at)).add(
                Condition::all()
                    .add(created_at.eq(c.created_at))
                    .add(id.lt(c.id.as_str())),
            ),
        );
    }
    let rows = select
        .order_by_desc(created_at)
        .order_by_desc(id)
        .limit(limit + 1)
        .all(db)
        .await?;
    let more = rows.len() as u64 > limit;
    let mut items = Vec::with_capacity(rows.len());
    let mut last = None;
    for row in rows.into_iter().take(limit as usize) {
        let (key, item) = convert(row);
        items.push(item?);
        last = Some(key);
    }
    let next = match last {
        Some((created_at, id)) if more => encode(&Cursor { created_at, id }),
        _ => String::new(),
    };
    Ok((items, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_garbage_is_refused() {
        let cursor = Cursor {
            created_at: crate::db::now(),
            id: uuid::Uuid::now_v7().to_string(),
        };
        assert_eq!(decode(&encode(&cursor)).expect("round trip"), cursor);
        for bad in [
            "",
            "!!!",
            "bm90IGEgdG9rZW4",
            &URL_SAFE_NO_PAD.encode("12|not-a-uuid"),
        ] {
            assert!(decode(bad).is_err(), "{bad}");
        }
        assert_eq!(limit(0).expect("default"), 50);
        assert_eq!(limit(10_000).expect("capped"), 500);
        assert!(limit(-1).is_err());
    }
}
