//! The `WHERE` clause of a listing with optional filters: only the conditions a caller
//! gave, numbered from `$1`.
//!
//! A filter written `($n IS NULL OR column = $n)` costs the listing its indexes: SQLite
//! plans a statement before it sees the parameters, so it cannot tell that the filter is
//! set and scans the table (and a paged listing scans it again from the start on every
//! page); a PostgreSQL generic plan is no better. Leaving unset filters out keeps each
//! listing on the index that fits the filters it has.

use sqlx::Any;
use sqlx::any::AnyArguments;
use sqlx::query::{Query, QueryAs};

/// A value for one placeholder.
pub(crate) enum Bind<'a> {
    Text(&'a str),
    Int(i64),
}

/// The conditions given, in order, each with its value.
#[derive(Default)]
pub(crate) struct Conditions<'a> {
    given: Vec<(&'static str, Bind<'a>)>,
}

impl<'a> Conditions<'a> {
    /// Adds `condition`, written up to its placeholder (`"status ="`), when `value` is set.
    pub(crate) fn and(&mut self, condition: &'static str, value: Option<Bind<'a>>) -> &mut Self {
        if let Some(value) = value {
            self.given.push((condition, value));
        }
        self
    }

    /// ` WHERE a = $1 AND b < $2`, or nothing when no condition was given.
    pub(crate) fn clause(&self) -> String {
        let parts: Vec<String> = self
            .given
            .iter()
            .enumerate()
            .map(|(n, (condition, _))| format!("{condition} ${}", n + 1))
            .collect();
        if parts.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", parts.join(" AND "))
        }
    }

    /// The number of the placeholder after the conditions' (for a `LIMIT`, say).
    pub(crate) fn next(&self) -> usize {
        self.given.len() + 1
    }

    /// Binds the conditions' values to `query`, in order.
    pub(crate) fn bind<Q: Binds<'a>>(self, query: Q) -> Q {
        self.given
            .into_iter()
            .fold(query, |query, (_, value)| query.value(value))
    }
}

/// A statement the values of [`Conditions`] can be bound to: rows as they come, or typed.
pub(crate) trait Binds<'a> {
    fn value(self, value: Bind<'a>) -> Self;
}

impl<'a> Binds<'a> for Query<'a, Any, AnyArguments> {
    fn value(self, value: Bind<'a>) -> Self {
        match value {
            Bind::Text(t) => self.bind(t),
            Bind::Int(i) => self.bind(i),
        }
    }
}

impl<'a, O> Binds<'a> for QueryAs<'a, Any, O, AnyArguments> {
    fn value(self, value: Bind<'a>) -> Self {
        match value {
            Bind::Text(t) => self.bind(t),
            Bind::Int(i) => self.bind(i),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_conditions_given_are_written_and_numbered() {
        let mut none = Conditions::default();
        none.and("status =", None);
        assert_eq!(none.clause(), "");
        assert_eq!(none.next(), 1);

        let mut some = Conditions::default();
        some.and("client_id =", None)
            .and("status =", Some(Bind::Text("dead")))
            .and("id <", Some(Bind::Text("bat_x")))
            .and("created_at >=", Some(Bind::Int(5)));
        assert_eq!(
            some.clause(),
            " WHERE status = $1 AND id < $2 AND created_at >= $3"
        );
        assert_eq!(some.next(), 4);
    }
}
