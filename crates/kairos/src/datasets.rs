//! Readers for the public data formats Kairos evaluates and demos on (see `shared/data/README.md`):
//! the sessions split (`train_sessions.csv`, `test_prefixes.csv`) and the event stream
//! (`events.csv`, `items.csv`).

use std::io::{BufRead, BufReader};
use std::path::Path;

/// Splits one CSV line into fields, honouring double quotes (`"a, b"`, `""` for a quote).
pub fn split_csv_line(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            ('"', true) => quoted = false,
            ('"', false) if field.is_empty() => quoted = true,
            (',', false) => fields.push(std::mem::take(&mut field)),
            (c, _) => field.push(c),
        }
    }
    fields.push(field);
    fields
}

/// Reads a CSV file with a header; calls `row` with the header-indexed fields of each line.
pub fn read_csv(
    path: &Path,
    mut row: impl FnMut(&Columns, &[String]) -> Result<(), String>,
) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    let mut lines = BufReader::new(file).lines();
    let header = match lines.next() {
        Some(h) => h.map_err(|e| format!("reading {}: {e}", path.display()))?,
        None => return Err(format!("{} is empty", path.display())),
    };
    let columns = Columns(split_csv_line(header.trim_end_matches('\r')));
    for (n, line) in lines.enumerate() {
        let line = line.map_err(|e| format!("reading {}: {e}", path.display()))?;
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        row(&columns, &split_csv_line(line))
            .map_err(|e| format!("{}:{}: {e}", path.display(), n + 2))?;
    }
    Ok(())
}

/// Header of a CSV file.
pub struct Columns(Vec<String>);

impl Columns {
    pub fn index(&self, name: &str) -> Result<usize, String> {
        self.0
            .iter()
            .position(|c| c == name)
            .ok_or_else(|| format!("missing column {name:?} (have {:?})", self.0))
    }
}

/// One row of `events.csv`.
#[derive(Clone, Debug, PartialEq)]
pub struct EventRow {
    pub timestamp_ms: i64,
    pub user_id: Option<String>,
    pub session_id: Option<String>,
    pub event: String,
    pub item_id: String,
}

pub fn read_events(path: &Path) -> Result<Vec<EventRow>, String> {
    let mut out = Vec::new();
    let mut idx = None;
    read_csv(path, |cols, f| {
        let &mut (ts, user, session, event, item) = match &mut idx {
            Some(i) => i,
            None => idx.insert((
                cols.index("timestamp_ms")?,
                cols.index("user_id")?,
                cols.index("session_id")?,
                cols.index("event")?,
                cols.index("item_id")?,
            )),
        };
        let get = |i: usize| f.get(i).map(String::as_str).unwrap_or("");
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        out.push(EventRow {
            timestamp_ms: get(ts)
                .parse()
                .map_err(|_| format!("bad timestamp_ms {:?}", get(ts)))?,
            user_id: opt(get(user)),
            session_id: opt(get(session)),
            event: get(event).to_owned(),
            item_id: get(item).to_owned(),
        });
        Ok(())
    })?;
    Ok(out)
}

/// One row of `items.csv`.
#[derive(Clone, Debug, PartialEq)]
pub struct ItemRow {
    pub item_id: String,
    pub title: Option<String>,
    pub categories: Vec<String>,
}

pub fn read_items(path: &Path) -> Result<Vec<ItemRow>, String> {
    let mut out = Vec::new();
    read_csv(path, |cols, f| {
        let get = |name: &str| -> Result<String, String> {
            Ok(f.get(cols.index(name)?).cloned().unwrap_or_default())
        };
        let title = get("title")?;
        out.push(ItemRow {
            item_id: get("item_id")?,
            title: (!title.is_empty()).then_some(title),
            categories: get("categories")?
                .split('|')
                .filter(|c| !c.is_empty() && *c != "(no genres listed)")
                .map(str::to_owned)
                .collect(),
        });
        Ok(())
    })?;
    Ok(out)
}

/// One row of `train_sessions.csv`: a training session's items in click order.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionRow {
    pub session_idx: String,
    pub items: Vec<String>,
}

/// Reads `train_sessions.csv` (`session_idx,items`, items space-separated), in file order.
pub fn read_sessions(path: &Path) -> Result<Vec<SessionRow>, String> {
    let mut out = Vec::new();
    read_csv(path, |cols, f| {
        let get = |name: &str| -> Result<&str, String> {
            Ok(f.get(cols.index(name)?).map(String::as_str).unwrap_or(""))
        };
        out.push(SessionRow {
            session_idx: get("session_idx")?.to_owned(),
            items: get("items")?
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
        });
        Ok(())
    })?;
    Ok(out)
}

/// One row of `test_prefixes.csv`: the clicks so far and the item that came next.
#[derive(Clone, Debug, PartialEq)]
pub struct PrefixRow {
    pub idx: String,
    pub prefix: Vec<String>,
    pub label: String,
}

/// Reads `test_prefixes.csv` (`idx,prefix,label`, prefix space-separated), in file order.
pub fn read_prefixes(path: &Path) -> Result<Vec<PrefixRow>, String> {
    let mut out = Vec::new();
    read_csv(path, |cols, f| {
        let get = |name: &str| -> Result<&str, String> {
            Ok(f.get(cols.index(name)?).map(String::as_str).unwrap_or(""))
        };
        let label = get("label")?.trim();
        if label.is_empty() {
            return Err("empty label".into());
        }
        out.push(PrefixRow {
            idx: get("idx")?.to_owned(),
            prefix: get("prefix")?
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            label: label.to_owned(),
        });
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes() {
        assert_eq!(split_csv_line("1,\"A, The\",x|y"), ["1", "A, The", "x|y"]);
        assert_eq!(
            split_csv_line("a,,\"say \"\"hi\"\"\""),
            ["a", "", "say \"hi\""]
        );
        assert_eq!(split_csv_line(""), [""]);
    }

    #[test]
    fn sessions_split_files() {
        let dir = std::env::temp_dir().join(format!("kairos-datasets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let train = dir.join("train_sessions.csv");
        std::fs::write(&train, "session_idx,items\n0,1 2\r\n1,3\n\n").unwrap();
        let sessions = read_sessions(&train).unwrap();
        assert_eq!(sessions.len(), 2);
        assert_eq!(sessions[0].items, ["1", "2"]);
        assert_eq!(sessions[1].session_idx, "1");
        let test = dir.join("test_prefixes.csv");
        std::fs::write(&test, "idx,prefix,label\n7,5 6 5,9\n").unwrap();
        let prefixes = read_prefixes(&test).unwrap();
        assert_eq!(
            prefixes,
            [PrefixRow {
                idx: "7".into(),
                prefix: vec!["5".into(), "6".into(), "5".into()],
                label: "9".into(),
            }]
        );
        std::fs::write(&test, "idx,prefix,label\n7,5,\n").unwrap();
        assert!(read_prefixes(&test)
            .unwrap_err()
            .contains(":2: empty label"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
