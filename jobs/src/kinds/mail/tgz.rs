//! Zimbra / Carbonio mailbox exports (`…/home/<user>/?fmt=tgz`): a tar.gz
//! whose directories are the mailbox's folders (`Inbox`, `Sent`,
//! `Projects/2024`, …) and whose messages are `*.eml` files (RFC 822),
//! each optionally beside a `<name>.eml.meta` file holding the item's
//! metadata as Zimbra serializes it (a bencoded dictionary): `d` the date
//! in milliseconds since the epoch, `f` the flag letters (`u` unread,
//! `f` flagged, `r` replied, `d` draft, `x` deleted), `t`/`tn` tags.
//! Other entries (folder `.meta` files, contacts, calendars) are ignored.
//!
//! The archive is unpacked with the restore's checks (plain files and
//! directories only, nothing outside the target), then read as local
//! folders ([`super::pst::LocalFolder`]). Messages without metadata keep
//! their `Date:` header and no flags.

use std::collections::BTreeMap;
use std::path::Path;

use super::pst::{LocalFolder, describe};

/// A bencoded value, as far as metadata needs.
#[derive(Debug, Clone, PartialEq)]
enum Ben {
    Int(i64),
    Str(String),
    List(Vec<Ben>),
    Dict(BTreeMap<String, Ben>),
}

fn ben(b: &[u8], i: &mut usize, depth: usize) -> Option<Ben> {
    if depth > 32 {
        return None;
    }
    match *b.get(*i)? {
        b'i' => {
            let end = *i + b[*i..].iter().position(|c| *c == b'e')?;
            let n = std::str::from_utf8(&b[*i + 1..end]).ok()?.parse().ok()?;
            *i = end + 1;
            Some(Ben::Int(n))
        }
        b'l' => {
            *i += 1;
            let mut v = Vec::new();
            while *b.get(*i)? != b'e' {
                v.push(ben(b, i, depth + 1)?);
            }
            *i += 1;
            Some(Ben::List(v))
        }
        b'd' => {
            *i += 1;
            let mut m = BTreeMap::new();
            while *b.get(*i)? != b'e' {
                let Ben::Str(k) = ben(b, i, depth + 1)? else {
                    return None;
                };
                let v = ben(b, i, depth + 1)?;
                m.insert(k, v);
            }
            *i += 1;
            Some(Ben::Dict(m))
        }
        b'0'..=b'9' => {
            let colon = *i + b[*i..].iter().position(|c| *c == b':')?;
            let len: usize = std::str::from_utf8(&b[*i..colon]).ok()?.parse().ok()?;
            let start = colon + 1;
            let s = b.get(start..start + len)?;
            *i = start + len;
            Some(Ben::Str(String::from_utf8_lossy(s).into_owned()))
        }
        _ => None,
    }
}

/// Flags and internal date from an item's `.meta` text.
pub fn meta(text: &[u8]) -> (Option<Vec<String>>, Option<String>) {
    let mut i = 0;
    let Some(Ben::Dict(m)) = ben(text, &mut i, 0) else {
        return (None, None);
    };
    let flags = m.get("f").map(|f| {
        let letters = match f {
            Ben::Str(s) => s.clone(),
            _ => String::new(),
        };
        let mut out = Vec::new();
        if !letters.contains('u') {
            out.push("\\Seen".to_string());
        }
        for (c, flag) in [
            ('r', "\\Answered"),
            ('f', "\\Flagged"),
            ('d', "\\Draft"),
            ('x', "\\Deleted"),
        ] {
            if letters.contains(c) {
                out.push(flag.to_string());
            }
        }
        if letters.contains('w') {
            out.push("$Forwarded".to_string());
        }
        out
    });
    let date = match m.get("d") {
        Some(Ben::Int(ms)) => Some(*ms),
        Some(Ben::Str(s)) => s.parse().ok(),
        _ => None,
    }
    .and_then(chrono::DateTime::from_timestamp_millis)
    .map(|d| d.format("%d-%b-%Y %H:%M:%S +0000").to_string());
    (flags, date)
}

/// Unpacks `archive` into `out` (emptied first) and lists its folders.
pub fn extract(archive: &Path, out: &Path) -> Result<Vec<LocalFolder>, String> {
    let _ = std::fs::remove_dir_all(out);
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    crate::archive::unpack_tar_gz(archive, out, true)
        .map_err(|e| format!("the TGZ export cannot be read: {e}"))?;
    let mut by_dir: BTreeMap<Vec<String>, LocalFolder> = BTreeMap::new();
    let mut stack = vec![out.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for p in entries {
            let m = std::fs::symlink_metadata(&p).map_err(|e| e.to_string())?;
            if m.is_dir() {
                stack.push(p);
                continue;
            }
            if !m.is_file() || p.extension().and_then(|x| x.to_str()) != Some("eml") {
                continue;
            }
            let mut msg = describe(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            let meta_path = p.with_file_name(format!(
                "{}.meta",
                p.file_name().and_then(|n| n.to_str()).unwrap_or("")
            ));
            if let Ok(text) = std::fs::read(&meta_path) {
                let (flags, date) = meta(&text);
                if let Some(f) = flags {
                    msg.flags = f;
                }
                if date.is_some() {
                    msg.internal_date = date;
                }
            }
            let rel = dir.strip_prefix(out).unwrap_or(&dir);
            let components: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            by_dir
                .entry(components.clone())
                .or_insert_with(|| LocalFolder {
                    components,
                    messages: Vec::new(),
                })
                .messages
                .push(msg);
        }
    }
    let folders: Vec<LocalFolder> = by_dir.into_values().collect();
    if folders.is_empty() {
        return Err("the TGZ export holds no message (*.eml); nothing was imported".into());
    }
    Ok(folders)
}

#[cfg(test)]
mod tests {
    #[test]
    fn metadata_gives_flags_and_dates() {
        let (f, d) = super::meta(b"d1:di1262304000000e1:f2:rf1:t0:e");
        assert_eq!(f.unwrap(), ["\\Seen", "\\Answered", "\\Flagged"]);
        assert_eq!(d.as_deref(), Some("01-Jan-2010 00:00:00 +0000"));
        let (f, _) = super::meta(b"d1:f1:u1:d13:1262304000000e");
        assert!(f.unwrap().is_empty(), "unread: no \\Seen");
        assert_eq!(super::meta(b"garbage"), (None, None));
        assert_eq!(super::meta(b"d1:fl"), (None, None));
    }
}
