//! Appwrite list queries (`queries[]` as JSON: `{"method","attribute","values"}`) applied to a
//! project's keys, with Appwrite's limits: at most 100 queries of at most 4096 characters.

use std::cmp::Ordering;

use serde::Deserialize;

use crate::error::Rejection;
use crate::keys::KeyRecord;

pub const MAX_QUERIES: usize = 100;
pub const MAX_QUERY_LEN: usize = 4096;
pub const DEFAULT_LIMIT: usize = 25;
pub const MAX_LIMIT: usize = 5000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuery {
    method: String,
    #[serde(default)]
    attribute: Option<String>,
    #[serde(default)]
    values: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq)]
enum Filter {
    Equal(Vec<String>),
    NotEqual(Vec<String>),
    Search(String),
    StartsWith(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OrderBy {
    Id,
    Name,
    CreatedAt,
    UpdatedAt,
    Expire,
    AccessedAt,
}

/// A parsed list request.
#[derive(Debug, Clone, PartialEq)]
pub struct ListQuery {
    filters: Vec<Filter>,
    order: Vec<(OrderBy, bool)>,
    limit: usize,
    offset: usize,
    cursor: Option<(String, bool)>,
    /// `total=false`: report 0 instead of counting.
    pub count_total: bool,
}

impl Default for ListQuery {
    fn default() -> Self {
        ListQuery {
            filters: Vec::new(),
            order: Vec::new(),
            limit: DEFAULT_LIMIT,
            offset: 0,
            cursor: None,
            count_total: true,
        }
    }
}

fn invalid(message: impl Into<String>) -> Rejection {
    Rejection::InvalidQuery(message.into())
}

impl ListQuery {
    /// Parses the URL query string of a list request (`queries[]=…`, `queries[0]=…`, `total=…`).
    pub fn from_url_query(query: Option<&str>) -> Result<ListQuery, Rejection> {
        let mut parsed = ListQuery::default();
        let mut count = 0;
        for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            if name == "total" {
                parsed.count_total = match &*value {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => {
                        return Err(Rejection::InvalidArgument(
                            "total must be true or false".into(),
                        ))
                    }
                };
            } else if name == "queries" || (name.starts_with("queries[") && name.ends_with(']')) {
                count += 1;
                if count > MAX_QUERIES {
                    return Err(invalid(format!(
                        "at most {MAX_QUERIES} queries are allowed"
                    )));
                }
                if value.chars().count() > MAX_QUERY_LEN {
                    return Err(invalid(format!(
                        "a query may be at most {MAX_QUERY_LEN} characters"
                    )));
                }
                parsed.add(&value)?;
            }
        }
        Ok(parsed)
    }

    fn add(&mut self, text: &str) -> Result<(), Rejection> {
        let query: RawQuery = serde_json::from_str(text)
            .map_err(|_| invalid("a query must be Appwrite query JSON"))?;
        let attribute = query.attribute.as_deref();
        let strings = || -> Result<Vec<String>, Rejection> {
            query
                .values
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| invalid(format!("{} takes string values", query.method)))
                })
                .collect()
        };
        let number = || -> Result<usize, Rejection> {
            query
                .values
                .first()
                .and_then(serde_json::Value::as_u64)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| invalid(format!("{} takes one non-negative integer", query.method)))
        };
        let on_name = || -> Result<(), Rejection> {
            match attribute {
                Some("name") => Ok(()),
                Some(other) => Err(invalid(format!(
                    "{} is not supported on attribute `{other}`",
                    query.method
                ))),
                None => Err(invalid(format!("{} needs an attribute", query.method))),
            }
        };
        let single = |values: Vec<String>| -> Result<String, Rejection> {
            match <[String; 1]>::try_from(values) {
                Ok([one]) => Ok(one),
                Err(_) => Err(invalid(format!("{} takes one value", query.method))),
            }
        };
        match query.method.as_str() {
            "limit" => {
                let limit = number()?;
                if limit == 0 || limit > MAX_LIMIT {
                    return Err(invalid(format!("limit must be 1-{MAX_LIMIT}")));
                }
                self.limit = limit;
            }
            "offset" => self.offset = number()?,
            "cursorAfter" | "cursorBefore" => {
                let id = single(strings()?)?;
                self.cursor = Some((id, query.method == "cursorAfter"));
            }
            "equal" => {
                on_name()?;
                self.filters.push(Filter::Equal(strings()?));
            }
            "notEqual" => {
                on_name()?;
                self.filters.push(Filter::NotEqual(strings()?));
            }
            "search" => {
                on_name()?;
                self.filters.push(Filter::Search(single(strings()?)?));
            }
            "startsWith" => {
                on_name()?;
                self.filters.push(Filter::StartsWith(single(strings()?)?));
            }
            "orderAsc" | "orderDesc" => {
                let by = match attribute.unwrap_or("$id") {
                    "" | "$id" => OrderBy::Id,
                    "name" => OrderBy::Name,
                    "$createdAt" => OrderBy::CreatedAt,
                    "$updatedAt" => OrderBy::UpdatedAt,
                    "expire" => OrderBy::Expire,
                    "accessedAt" => OrderBy::AccessedAt,
                    other => return Err(invalid(format!("cannot order by `{other}`"))),
                };
                self.order.push((by, query.method == "orderAsc"));
            }
            other => {
                return Err(invalid(format!(
                    "unknown or unsupported query method `{other}`"
                )))
            }
        }
        Ok(())
    }

    /// Filters, orders and pages `keys`; returns the page and the number of matches.
    pub fn apply(&self, mut keys: Vec<KeyRecord>) -> Result<(Vec<KeyRecord>, usize), Rejection> {
        keys.retain(|key| self.filters.iter().all(|f| matches(f, key)));
        keys.sort_by(|a, b| self.compare(a, b));
        let total = keys.len();
        let (start, end) = match &self.cursor {
            None => (self.offset, keys.len()),
            Some((id, after)) => {
                let at = keys
                    .iter()
                    .position(|k| &k.id == id)
                    .ok_or_else(|| Rejection::CursorNotFound(id.clone()))?;
                if *after {
                    (at + 1 + self.offset, keys.len())
                } else {
                    // Before the cursor: the `limit` keys that immediately precede it.
                    let end = at.saturating_sub(self.offset);
                    (end.saturating_sub(self.limit), end)
                }
            }
        };
        let start = start.min(end);
        let page: Vec<KeyRecord> = keys
            .into_iter()
            .skip(start)
            .take((end - start).min(self.limit))
            .collect();
        Ok((page, if self.count_total { total } else { 0 }))
    }

    fn compare(&self, a: &KeyRecord, b: &KeyRecord) -> Ordering {
        for (by, ascending) in &self.order {
            let ordering = match by {
                OrderBy::Id => a.id.cmp(&b.id),
                OrderBy::Name => a.name.cmp(&b.name),
                OrderBy::CreatedAt => a.created_at.cmp(&b.created_at),
                OrderBy::UpdatedAt => a.updated_at.cmp(&b.updated_at),
                OrderBy::Expire => a.expire.cmp(&b.expire),
                OrderBy::AccessedAt => a.accessed_at.cmp(&b.accessed_at),
            };
            let ordering = if *ascending {
                ordering
            } else {
                ordering.reverse()
            };
            if ordering != Ordering::Equal {
                return ordering;
            }
        }
        // Appwrite's default order: creation, then id, so paging is stable.
        a.created_at
            .cmp(&b.created_at)
            .then_with(|| a.id.cmp(&b.id))
    }
}

fn matches(filter: &Filter, key: &KeyRecord) -> bool {
    match filter {
        Filter::Equal(values) => values.contains(&key.name),
        Filter::NotEqual(values) => values.iter().all(|v| *v != key.name),
        Filter::Search(words) => {
            let name = key.name.to_lowercase();
            words
                .split_whitespace()
                .any(|w| name.contains(&w.to_lowercase()))
        }
        Filter::StartsWith(prefix) => key.name.starts_with(prefix.as_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{Digest, KeyKind};
    use chrono::{Duration, Utc};

    fn keys(names: &[&str]) -> Vec<KeyRecord> {
        let start = Utc::now();
        names
            .iter()
            .enumerate()
            .map(|(i, name)| KeyRecord {
                id: format!("k{i}"),
                project: "p".into(),
                kind: KeyKind::Standard,
                name: (*name).into(),
                description: String::new(),
                scopes: vec![],
                expire: None,
                created_at: start + Duration::seconds(i as i64),
                updated_at: start,
                accessed_at: None,
                sdks: vec![],
                digest: Digest([i as u8; 32]),
                previous: None,
                rate_limit: None,
            })
            .collect()
    }

    fn q(parts: &[&str]) -> Result<ListQuery, Rejection> {
        let query: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(parts.iter().map(|p| ("queries[]", *p)))
            .finish();
        ListQuery::from_url_query(Some(&query))
    }

    fn names(page: &[KeyRecord]) -> Vec<&str> {
        page.iter().map(|k| k.name.as_str()).collect()
    }

    #[test]
    fn filters_order_and_pages() {
        let all = keys(&["alpha", "beta", "alphabet", "gamma"]);
        let (page, total) =
            q(&[r#"{"method":"startsWith","attribute":"name","values":["alpha"]}"#])
                .unwrap()
                .apply(all.clone())
                .unwrap();
        assert_eq!((names(&page), total), (vec!["alpha", "alphabet"], 2));

        let (page, total) = q(&[
            r#"{"method":"orderDesc","attribute":"name"}"#,
            r#"{"method":"limit","values":[2]}"#,
            r#"{"method":"offset","values":[1]}"#,
        ])
        .unwrap()
        .apply(all.clone())
        .unwrap();
        assert_eq!((names(&page), total), (vec!["beta", "alphabet"], 4));

        let (page, _) = q(&[r#"{"method":"cursorAfter","values":["k1"]}"#])
            .unwrap()
            .apply(all.clone())
            .unwrap();
        assert_eq!(names(&page), vec!["alphabet", "gamma"]);
        let (page, _) = q(&[
            r#"{"method":"cursorBefore","values":["k2"]}"#,
            r#"{"method":"limit","values":[1]}"#,
        ])
        .unwrap()
        .apply(all.clone())
        .unwrap();
        assert_eq!(names(&page), vec!["beta"]);
        let (page, _) = q(&[
            r#"{"method":"notEqual","attribute":"name","values":["beta"]}"#,
            r#"{"method":"search","attribute":"name","values":["GAM"]}"#,
        ])
        .unwrap()
        .apply(all.clone())
        .unwrap();
        assert_eq!(names(&page), vec!["gamma"]);
        assert!(matches!(
            q(&[r#"{"method":"cursorAfter","values":["nope"]}"#])
                .unwrap()
                .apply(all),
            Err(Rejection::CursorNotFound(_))
        ));
    }

    #[test]
    fn refuses_unknown_methods_attributes_and_oversize() {
        for bad in [
            r#"{"method":"between","attribute":"name","values":["a","b"]}"#,
            r#"{"method":"equal","attribute":"secret","values":["x"]}"#,
            r#"{"method":"limit","values":[0]}"#,
            r#"{"method":"limit","values":["ten"]}"#,
            r#"{"method":"orderAsc","attribute":"secret"}"#,
            "not json",
        ] {
            assert!(
                matches!(q(&[bad]), Err(Rejection::InvalidQuery(_))),
                "{bad}"
            );
        }
        let many: Vec<&str> = vec![r#"{"method":"limit","values":[1]}"#; 101];
        assert!(matches!(q(&many), Err(Rejection::InvalidQuery(_))));
        let long = format!(
            r#"{{"method":"equal","attribute":"name","values":["{}"]}}"#,
            "x".repeat(4096)
        );
        assert!(matches!(q(&[&long]), Err(Rejection::InvalidQuery(_))));
        assert!(
            !ListQuery::from_url_query(Some("total=false"))
                .unwrap()
                .count_total
        );
    }
}
