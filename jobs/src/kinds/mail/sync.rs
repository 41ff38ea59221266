//! Copying one mailbox, folder by folder, and verifying it.
//!
//! A message is identified by its key ([`super::imap::message_key`]): the
//! Message-Id, or a hash of its headers. Copies are decided on multisets of
//! keys — a key present n times at the source is copied until the
//! destination has it n times — so a re-run, a delta, or a run after a
//! crash between an APPEND and the saved state copies nothing twice, and
//! true duplicates at the source arrive as duplicates.
//!
//! A delta looks only at UIDs above the last one copied, while the
//! folder's UIDVALIDITY is unchanged; a new UIDVALIDITY falls back to
//! comparing the whole folder by key. Flags (system flags and keywords)
//! and INTERNALDATE go with each APPEND. Every folder ends verified: the
//! number of source messages whose key is found at the destination.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::db::{FolderState, Mailbox};
use super::folders;
use super::imap::{ImapError, Session, Summary};
use super::pst::LocalFolder;
use crate::queue::Db;
use crate::queue::progress::Progress;

/// What a run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    /// Everything, compared by key.
    Full,
    /// Only UIDs above the saved state (whole folder after a UIDVALIDITY change).
    Delta,
    /// Copy nothing: count and compare.
    Verify,
}

/// Shared by every mailbox of a job's run.
pub struct Limits {
    pub max_message_bytes: u64,
    pub errors_max: u32,
    pub bytes_per_sec: u64,
    pub errors: AtomicU32,
    pub bytes: AtomicU64,
    /// Messages copied by the run, across reconnects and mailboxes.
    pub copied: AtomicU64,
    pub started: Instant,
}

impl Limits {
    /// Waits as long as the copy is ahead of `bytes_per_sec`.
    async fn throttle(&self, added: u64) {
        let total = self.bytes.fetch_add(added, Ordering::Relaxed) + added;
        if self.bytes_per_sec > 0 {
            let due = Duration::from_secs_f64(total as f64 / self.bytes_per_sec as f64);
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Imap(#[from] ImapError),
    #[error("{0}")]
    Db(String),
    #[error("too many messages failed ({0}); last: {1}")]
    TooManyErrors(u32, String),
    #[error("cancelled")]
    Cancelled,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct FolderReport {
    pub source: String,
    pub destination: String,
    pub source_count: u64,
    pub dest_count: u64,
    pub verified: u64,
    pub copied: u64,
    pub bytes: u64,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct MailboxReport {
    pub mailbox: String,
    pub folders: Vec<FolderReport>,
    pub copied: u64,
    pub bytes: u64,
    pub errors: Vec<String>,
}

impl FolderReport {
    /// The folder's verification from the key counts of both sides: every
    /// source message whose key the destination holds (as often).
    fn verify(&mut self, want: &HashMap<String, u64>, have: &HashMap<String, u64>) {
        self.source_count = want.values().sum();
        self.dest_count = have.values().sum();
        self.verified = want
            .iter()
            .map(|(k, n)| (*n).min(have.get(k).copied().unwrap_or(0)))
            .sum();
    }
}

impl MailboxReport {
    fn add(&mut self, f: FolderReport) {
        self.copied += f.copied;
        self.bytes += f.bytes;
        self.folders.push(f);
    }

    pub fn expected(&self) -> u64 {
        self.folders.iter().map(|f| f.source_count).sum()
    }
    pub fn verified(&self) -> u64 {
        self.folders.iter().map(|f| f.verified).sum()
    }
}

fn counts(keys: impl Iterator<Item = String>) -> HashMap<String, u64> {
    let mut m = HashMap::new();
    for k in keys {
        *m.entry(k).or_insert(0) += 1;
    }
    m
}

/// The key counts of a destination folder. The folder is left unselected:
/// APPENDs to a selected folder bring untagged EXISTS that a client must
/// not mistake for the APPEND's continuation.
async fn dest_counts(dst: &mut Session, folder: &str) -> Result<HashMap<String, u64>, SyncError> {
    dst.select(folder).await?;
    let have = counts(dst.summaries(1).await?.into_iter().map(|m| m.key));
    dst.unselect().await?;
    Ok(have)
}

/// Syncs (or verifies) one mailbox between two open sessions.
#[allow(clippy::too_many_arguments)]
pub async fn mailbox(
    db: &Db,
    mb: &Mailbox,
    src: &mut Session,
    dst: &mut Session,
    kind: RunKind,
    limits: &Limits,
    progress: &Arc<Progress>,
) -> Result<MailboxReport, SyncError> {
    let mut report = MailboxReport {
        mailbox: mb.source_login.clone(),
        ..Default::default()
    };
    let saved: BTreeMap<String, FolderState> = db
        .folder_states(mb.id)
        .await
        .map_err(|e| SyncError::Db(e.to_string()))?
        .into_iter()
        .map(|f| (f.source_folder.clone(), f))
        .collect();
    let overrides: BTreeMap<String, String> =
        serde_json::from_value(mb.folder_map.clone()).unwrap_or_default();
    let dest_folders = dst.folders().await?;
    let mut existing: std::collections::HashSet<String> =
        dest_folders.iter().map(|f| f.raw.clone()).collect();
    let (dest_delim, dest_prefix) = (dst.delimiter.clone(), dst.prefix.clone());
    for folder in src.folders().await?.into_iter().filter(|f| f.selectable) {
        if progress.meter.cancelled.load(Ordering::Acquire) {
            return Err(SyncError::Cancelled);
        }
        let target = folders::map(&folder, &dest_folders, &dest_delim, &dest_prefix, &overrides);
        let (uidvalidity, _) = src.examine(&folder.raw).await?;
        let all = src.summaries(1).await?;
        // Known folder by folder: the ETA firms up as the run goes.
        if kind != RunKind::Verify {
            let folder_bytes: u64 = all.iter().filter(|m| m.uid >= 1).map(|m| u64::from(m.size)).sum();
            progress.add_total(folder_bytes);
        }
        let state = saved.get(&folder.raw);
        let from = match (kind, state) {
            (RunKind::Delta, Some(s)) if s.uidvalidity == i64::from(uidvalidity) => s.last_uid as u32 + 1,
            _ => 1,
        };
        let want = counts(all.iter().map(|m| m.key.clone()));
        // SELECT only what exists: a refused SELECT closes the selected
        // folder with an untagged response not every parser expects.
        if existing.insert(target.clone()) {
            dst.create(&target).await?;
        }
        let mut have = dest_counts(dst, &target).await?;
        progress.line(&format!(
            "{}: {} → {} ({} messages)",
            mb.source_login,
            folders::decode(&folder.raw),
            folders::decode(&target),
            all.len()
        ));
        let mut fr = FolderReport {
            source: folders::decode(&folder.raw),
            destination: folders::decode(&target),
            ..Default::default()
        };
        let mut st = FolderState {
            source_folder: folder.raw.clone(),
            dest_folder: target.clone(),
            uidvalidity: i64::from(uidvalidity),
            last_uid: state
                .filter(|s| s.uidvalidity == i64::from(uidvalidity))
                .map_or(0, |s| s.last_uid),
            source_count: 0,
            dest_count: 0,
            verified: 0,
        };
        if kind != RunKind::Verify {
            let mut since_save = 0;
            for m in all.iter().filter(|m| m.uid >= from) {
                if progress.meter.cancelled.load(Ordering::Acquire) {
                    return Err(SyncError::Cancelled);
                }
                let need = want.get(&m.key).copied().unwrap_or(0);
                let got = have.get(&m.key).copied().unwrap_or(0);
                if got < need {
                    let copy = async {
                        if u64::from(m.size) > limits.max_message_bytes {
                            return Err(format!(
                                "{} uid {}: {} bytes, larger than jobs.mail.max_message_bytes",
                                fr.source, m.uid, m.size
                            ));
                        }
                        let body = src.message(m.uid).await.map_err(|e| e.to_string())?;
                        dst.append(&target, m, &body).await.map_err(|e| e.to_string())?;
                        Ok(body.len() as u64)
                    };
                    match copy.await {
                        Ok(n) => {
                            *have.entry(m.key.clone()).or_insert(0) += 1;
                            fr.copied += 1;
                            limits.copied.fetch_add(1, Ordering::Relaxed);
                            fr.bytes += n;
                            progress.meter.bytes.fetch_add(n, Ordering::Relaxed);
                            limits.throttle(n).await;
                        }
                        Err(e) => {
                            let n = limits.errors.fetch_add(1, Ordering::AcqRel) + 1;
                            report.errors.push(e.clone());
                            progress.line(&format!("error: {e}"));
                            if n > limits.errors_max {
                                return Err(SyncError::TooManyErrors(n, e));
                            }
                        }
                    }
                }
                st.last_uid = st.last_uid.max(i64::from(m.uid));
                since_save += 1;
                if since_save >= 50 {
                    since_save = 0;
                    db.save_folder(mb.id, &st)
                        .await
                        .map_err(|e| SyncError::Db(e.to_string()))?;
                }
            }
        }
        // Verify: every source key counted at the destination (a fresh
        // listing after the copies).
        let have = if kind == RunKind::Verify || fr.copied > 0 {
            dest_counts(dst, &target).await?
        } else {
            have
        };
        fr.verify(&want, &have);
        st.source_count = fr.source_count as i64;
        st.dest_count = fr.dest_count as i64;
        st.verified = fr.verified as i64;
        if let Some(max) = all.iter().map(|m| m.uid).max()
            && kind != RunKind::Verify
        {
            st.last_uid = st.last_uid.max(i64::from(max));
        }
        db.save_folder(mb.id, &st)
            .await
            .map_err(|e| SyncError::Db(e.to_string()))?;
        report.add(fr);
    }
    Ok(report)
}

/// Appends local folders (from a PST) to the destination, by the same key
/// multisets as an IMAP copy; messages the destination refuses go to the
/// `quarantine` mbox, counted. Verified per folder like any run.
pub async fn import_local(
    db: &Db,
    mb: &Mailbox,
    local: &[LocalFolder],
    dst: &mut Session,
    limits: &Limits,
    progress: &Arc<Progress>,
    quarantine: &std::path::Path,
) -> Result<MailboxReport, SyncError> {
    let mut report = MailboxReport {
        mailbox: mb.source_login.clone(),
        ..Default::default()
    };
    let overrides: BTreeMap<String, String> =
        serde_json::from_value(mb.folder_map.clone()).unwrap_or_default();
    let dest_folders = dst.folders().await?;
    let mut existing: std::collections::HashSet<String> =
        dest_folders.iter().map(|f| f.raw.clone()).collect();
    let (dest_delim, dest_prefix) = (dst.delimiter.clone(), dst.prefix.clone());
    for lf in local {
        let name = lf.components.join("/");
        let src = folders::Folder {
            raw: if lf.components.is_empty() || name.eq_ignore_ascii_case("inbox") {
                "INBOX".into()
            } else {
                folders::encode(&name)
            },
            delimiter: Some("/".into()),
            role: None,
            selectable: true,
        };
        let target = folders::map(&src, &dest_folders, &dest_delim, &dest_prefix, &overrides);
        if existing.insert(target.clone()) {
            dst.create(&target).await?;
        }
        let mut have = dest_counts(dst, &target).await?;
        let want = counts(lf.messages.iter().map(|m| m.key.clone()));
        let mut fr = FolderReport {
            source: if name.is_empty() {
                "(root)".into()
            } else {
                name.clone()
            },
            destination: folders::decode(&target),
            ..Default::default()
        };
        progress.line(&format!(
            "{}: {} → {} ({} messages)",
            mb.source_login,
            fr.source,
            fr.destination,
            lf.messages.len()
        ));
        for m in &lf.messages {
            if progress.meter.cancelled.load(Ordering::Acquire) {
                return Err(SyncError::Cancelled);
            }
            if have.get(&m.key).copied().unwrap_or(0) >= want.get(&m.key).copied().unwrap_or(0) {
                continue;
            }
            let path = m.path.clone();
            let body = tokio::task::spawn_blocking(move || std::fs::read(path).map(|b| super::pst::crlf(&b)))
                .await
                .map_err(|e| SyncError::Db(e.to_string()))?
                .map_err(|e| SyncError::Db(format!("{}: {e}", m.path.display())))?;
            let summary = Summary {
                uid: 0,
                key: m.key.clone(),
                flags: m.flags.clone(),
                internal_date: m.internal_date.clone(),
                size: body.len() as u32,
            };
            let r = if body.len() as u64 > limits.max_message_bytes {
                Err(format!(
                    "{}: {} bytes, larger than jobs.mail.max_message_bytes",
                    m.path.display(),
                    body.len()
                ))
            } else {
                dst.append(&target, &summary, &body)
                    .await
                    .map_err(|e| e.to_string())
            };
            match r {
                Ok(()) => {
                    *have.entry(m.key.clone()).or_insert(0) += 1;
                    fr.copied += 1;
                    fr.bytes += body.len() as u64;
                    limits.copied.fetch_add(1, Ordering::Relaxed);
                    progress
                        .meter
                        .bytes
                        .fetch_add(body.len() as u64, Ordering::Relaxed);
                    limits.throttle(body.len() as u64).await;
                }
                Err(e) => {
                    quarantine_append(quarantine, &body).await;
                    let n = limits.errors.fetch_add(1, Ordering::AcqRel) + 1;
                    progress.line(&format!("quarantined: {e}"));
                    report.errors.push(e.clone());
                    if n > limits.errors_max {
                        return Err(SyncError::TooManyErrors(n, e));
                    }
                }
            }
        }
        if fr.copied > 0 {
            have = dest_counts(dst, &target).await?;
        }
        fr.verify(&want, &have);
        db.save_folder(
            mb.id,
            &FolderState {
                source_folder: fr.source.clone(),
                dest_folder: target.clone(),
                uidvalidity: 0,
                last_uid: 0,
                source_count: fr.source_count as i64,
                dest_count: fr.dest_count as i64,
                verified: fr.verified as i64,
            },
        )
        .await
        .map_err(|e| SyncError::Db(e.to_string()))?;
        report.add(fr);
    }
    Ok(report)
}

/// Appends a message to an mbox file (">From " quoting), mode 600.
async fn quarantine_append(path: &std::path::Path, body: &[u8]) {
    let mut out = format!(
        "From portico-quarantine {}\n",
        chrono::Utc::now().format("%a %b %e %H:%M:%S %Y")
    )
    .into_bytes();
    for line in body.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        // mboxrd: `From ` behind any number of `>` gains one more.
        let quotes = line.iter().take_while(|b| **b == b'>').count();
        if line[quotes..].starts_with(b"From ") {
            out.push(b'>');
        }
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.push(b'\n');
    let path = path.to_path_buf();
    let _ = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)?
            .write_all(&out)
    })
    .await;
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn quarantine_quotes_from_lines_the_mboxrd_way() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("q.mbox");
        super::quarantine_append(
            &p,
            b"Subject: s\r\n\r\nFrom here\r\n>From there\r\n>>From far\r\nok\r\n",
        )
        .await;
        let text = std::fs::read_to_string(&p).unwrap();
        let body: Vec<&str> = text.lines().skip(1).collect();
        assert_eq!(
            body,
            [
                "Subject: s",
                "",
                ">From here",
                ">>From there",
                ">>>From far",
                "ok",
                "",
                ""
            ][..body.len()]
        );
        assert!(text.starts_with("From portico-quarantine "));
    }
}
