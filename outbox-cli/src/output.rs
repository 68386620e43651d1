//! What commands print: aligned tables and JSON on stdout, progress on stderr, all scrubbed.

use std::io::Write;
use std::time::Duration;

use serde::Serialize;

use crate::redact::scrub;

/// Print `text` and a newline to stdout. A closed stdout (`outbox status | head -3`) is not
/// an error: the rest is not wanted.
pub(crate) fn line(text: &str) {
    raw(&format!("{}\n", scrub(text)));
}

/// Print `text` as it is (it ends with its own newline) to stdout, scrubbed.
pub(crate) fn raw(text: &str) {
    let _ = std::io::stdout().lock().write_all(scrub(text).as_bytes());
}

/// Print `text` and a newline to stderr (progress, notes).
pub(crate) fn note(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{}", scrub(text));
}

/// Print `value` as pretty JSON to stdout.
pub(crate) fn json<T: Serialize>(value: &T) {
    let text = serde_json::to_string_pretty(value).expect("command output serializes");
    line(&text);
}

/// An optional duration as seconds, for JSON.
pub(crate) fn seconds(d: Option<Duration>) -> Option<f64> {
    d.map(|d| (d.as_secs_f64() * 1000.0).round() / 1000.0)
}

/// An optional duration, short, or `-`.
pub(crate) fn show_age(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".to_string(), crate::duration::show)
}

/// A text table with a header row; columns padded to their widest cell.
pub(crate) struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub(crate) fn new(headers: &[&str]) -> Table {
        Table {
            rows: vec![headers.iter().map(|h| (*h).to_string()).collect()],
        }
    }

    /// Add a row.
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Whether only the header is there.
    pub(crate) fn is_empty(&self) -> bool {
        self.rows.len() == 1
    }

    /// Print it, indented by `indent` spaces.
    pub(crate) fn print(&self, indent: usize) {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for row in &self.rows {
            let mut text = " ".repeat(indent);
            for (c, cell) in row.iter().enumerate() {
                if c + 1 < row.len() {
                    let pad = widths[c] - cell.chars().count();
                    text.push_str(cell);
                    text.push_str(&" ".repeat(pad + 2));
                } else {
                    text.push_str(cell);
                }
            }
            line(&text);
        }
    }
}

/// `text` cut to at most `max` characters, with `…` where it was cut; control characters shown
/// as spaces (a table cell is one line).
pub(crate) fn cell(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= max {
        flat
    } else {
        let mut cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_are_one_line_and_cut() {
        assert_eq!(cell("a\nb", 10), "a b");
        assert_eq!(cell("abcdef", 4), "abc…");
        assert_eq!(seconds(Some(Duration::from_millis(1500))), Some(1.5));
        assert_eq!(show_age(None), "-");
    }
}
