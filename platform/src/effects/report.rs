//! The rejected rows of a batch as CSV, safe to open in a spreadsheet.
//!
//! Every cell that a spreadsheet would read as a formula (starting with `=`, `+`, `-`, `@`,
//! tab or carriage return — OWASP's list) is prefixed with `'`, so a row error that quotes a
//! malicious input cannot run when an operator opens the report.

use std::borrow::Cow;

use dataflow_contracts::http::{BatchReport, BatchView, RecordErrorView};

use crate::Result;
use crate::ledger::Db;

pub const HEADER: [&str; 5] = ["line", "field", "code", "detail", "value"];

/// CSV text for `rows`, with the header row first when `header` is set.
pub fn rejected_rows_csv(rows: &[RecordErrorView], header: bool) -> Vec<u8> {
    let mut w = csv::Writer::from_writer(Vec::with_capacity(rows.len() * 64 + 32));
    // Writing into a Vec cannot fail.
    if header {
        let _ = w.write_record(HEADER);
    }
    for r in rows {
        let line = r.line.to_string();
        let field = r.field.as_deref().unwrap_or("");
        let _ = w.write_record([
            line.as_str(),
            &safe_cell(field),
            &safe_cell(&r.code),
            &safe_cell(&r.detail),
            &safe_cell(r.value.as_deref().unwrap_or("")),
        ]);
    }
    w.into_inner().unwrap_or_default()
}

/// Rows fetched per page when a whole CSV is built in memory.
const PAGE: u32 = 5_000;

/// The summary of a batch the caller has already loaded.
pub async fn summary(db: &Db, batch: BatchView) -> Result<BatchReport> {
    // A rejected record is counted in the transaction that stores its error, so a batch
    // without rejects has no error rows to count: most batches, and no query for them.
    let errors_by_code = if batch.records_failed == 0 {
        Default::default()
    } else {
        db.record_error_counts(&batch.id)
            .await?
            .into_iter()
            .collect()
    };
    Ok(BatchReport {
        errors_by_code,
        rejected_rows_csv: format!("/v1/batches/{}/report.csv", batch.id),
        batch,
    })
}

/// The rejected rows as CSV, whole when it fits in `max_bytes`; `None` otherwise (the
/// caller streams it instead of holding it).
pub async fn rejected_csv_within(
    db: &Db,
    batch: &BatchView,
    max_bytes: usize,
) -> Result<Option<Vec<u8>>> {
    if batch.records_failed == 0 {
        return Ok(Some(rejected_rows_csv(&[], true)));
    }
    let batch = &batch.id;
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = db
            .list_record_errors(batch, after.unwrap_or_default(), PAGE)
            .await?;
        out.extend(rejected_rows_csv(&page.items, after.is_none()));
        if out.len() > max_bytes {
            return Ok(None);
        }
        match page.next_cursor.and_then(|c| c.parse().ok()) {
            Some(next) => after = Some(next),
            None => return Ok(Some(out)),
        }
    }
}

/// The cell, defused if a spreadsheet would evaluate it. A number (`-1.5`) is left as it
/// is: a spreadsheet reads it as the number it is, and defused it would not be one.
pub fn safe_cell(s: &str) -> Cow<'_, str> {
    if s.starts_with(['=', '+', '-', '@', '\t', '\r'])
        && serde_json::from_str::<serde_json::Number>(s).is_err()
    {
        Cow::Owned(format!("'{s}"))
    } else {
        Cow::Borrowed(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formulas_are_defused_and_quoting_is_kept() {
        let rows = [RecordErrorView {
            line: 7,
            field: Some("=HYPERLINK(\"x\")".into()),
            code: "missing_key".into(),
            detail: "@SUM(1,2), \"quoted\"".into(),
            value: Some("+cmd|' /C calc'!A0".into()),
        }];
        let text = String::from_utf8(rejected_rows_csv(&rows, true)).unwrap();
        assert_eq!(
            text,
            "line,field,code,detail,value\n7,\"'=HYPERLINK(\"\"x\"\")\",missing_key,\"'@SUM(1,2), \"\"quoted\"\"\",'+cmd|' /C calc'!A0\n"
        );
        assert_eq!(safe_cell("plain"), "plain");
        assert_eq!(safe_cell("-1.5e3"), "-1.5e3");
        assert_eq!(safe_cell("-1+2"), "'-1+2");
        assert_eq!(safe_cell("+1"), "'+1");
    }
}
