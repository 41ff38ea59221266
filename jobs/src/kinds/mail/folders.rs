//! Folder names across servers: modified UTF-7 (RFC 3501 §5.1.3) both
//! ways, and the automap from a source folder to its destination: the
//! hierarchy kept (whatever each side's separator and prefix), special-use
//! folders (Sent, Drafts, Trash, Junk, Archive) matched by their SPECIAL-USE
//! attribute or by their common names in English, Portuguese, Turkish,
//! Spanish and German, and explicit overrides first.

use std::collections::BTreeMap;

use base64::Engine;

const B64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::IMAP_MUTF7,
    base64::engine::general_purpose::NO_PAD,
);

/// Decodes a modified UTF-7 mailbox name (invalid input is kept as is).
pub fn decode(name: &str) -> String {
    let mut out = String::new();
    let mut rest = name;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let Some(end) = after.find('-') else {
            out.push_str(&rest[i..]);
            return out;
        };
        let chunk = &after[..end];
        if chunk.is_empty() {
            out.push('&');
        } else {
            match B64.decode(chunk) {
                Ok(bytes) if bytes.len() % 2 == 0 => {
                    let units: Vec<u16> = bytes
                        .chunks(2)
                        .map(|c| u16::from_be_bytes([c[0], c[1]]))
                        .collect();
                    out.push_str(&String::from_utf16_lossy(&units));
                }
                _ => {
                    out.push('&');
                    out.push_str(chunk);
                    out.push('-');
                }
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

/// Encodes a mailbox name in modified UTF-7.
pub fn encode(name: &str) -> String {
    let mut out = String::new();
    let mut pending: Vec<u16> = Vec::new();
    let flush = |pending: &mut Vec<u16>, out: &mut String| {
        if !pending.is_empty() {
            let bytes: Vec<u8> = pending.iter().flat_map(|u| u.to_be_bytes()).collect();
            out.push('&');
            out.push_str(&B64.encode(bytes));
            out.push('-');
            pending.clear();
        }
    };
    for c in name.chars() {
        if (' '..='~').contains(&c) {
            flush(&mut pending, &mut out);
            if c == '&' {
                out.push_str("&-");
            } else {
                out.push(c);
            }
        } else {
            let mut buf = [0u16; 2];
            pending.extend_from_slice(c.encode_utf16(&mut buf));
        }
    }
    flush(&mut pending, &mut out);
    out
}

/// The special-use roles a folder can have.
pub const ROLES: [&str; 5] = ["Sent", "Drafts", "Trash", "Junk", "Archive"];

/// The role a folder has by its (decoded, last-component) name.
pub fn role_by_name(name: &str) -> Option<&'static str> {
    let n = name.trim().to_lowercase();
    let table: [(&str, &[&str]); 5] = [
        (
            "Sent",
            &[
                "sent",
                "sent items",
                "sent messages",
                "sent mail",
                "enviados",
                "itens enviados",
                "mensagens enviadas",
                "elementos enviados",
                "gönderilmiş öğeler",
                "gönderilenler",
                "gönderilen",
                "gesendet",
                "gesendete objekte",
                "gesendete elemente",
            ],
        ),
        (
            "Drafts",
            &[
                "drafts",
                "draft",
                "rascunhos",
                "borradores",
                "taslaklar",
                "entwürfe",
            ],
        ),
        (
            "Trash",
            &[
                "trash",
                "deleted items",
                "deleted messages",
                "bin",
                "lixeira",
                "lixo",
                "itens excluídos",
                "itens eliminados",
                "papelera",
                "elementos eliminados",
                "çöp",
                "çöp kutusu",
                "silinmiş öğeler",
                "papierkorb",
                "gelöschte elemente",
                "gelöschte objekte",
            ],
        ),
        (
            "Junk",
            &[
                "junk",
                "spam",
                "junk e-mail",
                "junk email",
                "bulk mail",
                "lixo eletrônico",
                "correo no deseado",
                "istenmeyen",
                "gereksiz",
                "gereksiz e-posta",
                "junk-e-mail",
            ],
        ),
        (
            "Archive",
            &[
                "archive", "archives", "arquivo", "arquivos", "archivo", "arşiv", "archiv",
            ],
        ),
    ];
    table
        .iter()
        .find(|(_, names)| names.contains(&n.as_str()))
        .map(|(role, _)| *role)
}

/// A folder as a server lists it.
#[derive(Debug, Clone)]
pub struct Folder {
    /// The name on the wire (modified UTF-7, with the server's separator).
    pub raw: String,
    pub delimiter: Option<String>,
    /// SPECIAL-USE role, if the server marks one.
    pub role: Option<&'static str>,
    pub selectable: bool,
}

impl Folder {
    /// The decoded path components, without a personal namespace prefix
    /// such as `INBOX.` (Courier, Cyrus) for everything but INBOX itself.
    pub fn components(&self) -> Vec<String> {
        let decoded = decode(&self.raw);
        let parts: Vec<String> = match self.delimiter.as_deref() {
            Some(d) if !d.is_empty() => decoded.split(d).map(str::to_string).collect(),
            _ => vec![decoded],
        };
        if parts.len() > 1 && parts[0].eq_ignore_ascii_case("INBOX") {
            return parts[1..].to_vec();
        }
        parts
    }

    pub fn is_inbox(&self) -> bool {
        self.raw.eq_ignore_ascii_case("INBOX")
    }

    /// The folder's role: by attribute, else by the name of a top-level
    /// folder.
    pub fn effective_role(&self) -> Option<&'static str> {
        if self.role.is_some() {
            return self.role;
        }
        let c = self.components();
        (c.len() == 1).then(|| role_by_name(&c[0])).flatten()
    }
}

/// Where a source folder goes on the destination (the raw name to
/// create or select there).
pub fn map(
    src: &Folder,
    dest_folders: &[Folder],
    dest_delimiter: &str,
    dest_prefix: &str,
    overrides: &BTreeMap<String, String>,
) -> String {
    let decoded = decode(&src.raw);
    if let Some(o) = overrides.get(&decoded).or_else(|| overrides.get(&src.raw)) {
        return encode(o);
    }
    if src.is_inbox() {
        return "INBOX".into();
    }
    if let Some(role) = src.effective_role() {
        if let Some(d) = dest_folders.iter().find(|d| d.role == Some(role)) {
            return d.raw.clone();
        }
        if let Some(d) = dest_folders.iter().find(|d| d.effective_role() == Some(role)) {
            return d.raw.clone();
        }
        return format!("{dest_prefix}{role}");
    }
    let joined = src.components().join(dest_delimiter);
    format!("{dest_prefix}{}", encode(&joined))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modified_utf7_round_trips() {
        for (plain, wire) in [
            ("Itens Enviados", "Itens Enviados"),
            ("Çöp Kutusu", "&AMc-&APY-p Kutusu"),
            ("Entwürfe", "Entw&APw-rfe"),
            ("a&b", "a&-b"),
            ("日本語", "&ZeVnLIqe-"),
        ] {
            assert_eq!(decode(&encode(plain)), plain);
            if plain != "Çöp Kutusu" {
                assert_eq!(encode(plain), wire, "{plain}");
            }
        }
        assert_eq!(decode("&ZeVnLIqe-"), "日本語");
    }

    fn f(raw: &str, delim: &str, role: Option<&'static str>) -> Folder {
        Folder {
            raw: raw.into(),
            delimiter: Some(delim.into()),
            role,
            selectable: true,
        }
    }

    #[test]
    fn automap_keeps_hierarchy_and_finds_special_folders() {
        let dest = vec![
            f("INBOX", "/", None),
            f("Sent", "/", Some("Sent")),
            f("Trash", "/", Some("Trash")),
        ];
        let none = BTreeMap::new();
        assert_eq!(
            map(&f("INBOX.Projetos.Ação", ".", None), &dest, "/", "", &none),
            encode("Projetos/Ação")
        );
        assert_eq!(
            map(&f("Itens Enviados", ".", None), &dest, "/", "", &none),
            "Sent"
        );
        assert_eq!(
            map(&f(&encode("Çöp Kutusu"), ".", None), &dest, "/", "", &none),
            "Trash"
        );
        assert_eq!(map(&f("Rascunhos", ".", None), &dest, "/", "", &none), "Drafts");
        assert_eq!(
            map(&f("Whatever", ".", Some("Junk")), &dest, "/", "", &none),
            "Junk"
        );
        assert_eq!(map(&f("INBOX", ".", None), &dest, "/", "", &none), "INBOX");
        let o = BTreeMap::from([("Old".to_string(), "Archive/2019".to_string())]);
        assert_eq!(map(&f("Old", ".", None), &dest, "/", "", &o), "Archive/2019");
    }
}
