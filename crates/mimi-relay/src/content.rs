//! `mimi-relay content inspect FILE`: show a MIMI content message (draft-ietf-mimi-content-08)
//! or a `MessageDerivedValues`, its message ID, and whether it re-encodes to the same bytes.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use mimi_wire::content::{
    ContentLimits, ExtensionKey, MessageDerivedValues, MessageId, MimiContent, NestedPart,
    PartBody, Timestamp, message_id,
};
use serde_json::{Value as Json, json};

/// `mimi-relay content ...`
#[derive(Debug, clap::Subcommand)]
pub enum ContentCmd {
    /// Decode a MIMI content file (CBOR) and print it readably.
    Inspect {
        /// The CBOR file (a mimiContent message or a MessageDerivedValues).
        file: PathBuf,
        /// Print one JSON object (with `message_id` and `roundtrip`) instead.
        #[arg(long)]
        json: bool,
        /// Sender URI for the message ID; default: the message's senderUri extension (1).
        #[arg(long)]
        sender: Option<String>,
        /// Room URI for the message ID; default: the message's roomUri extension (2).
        #[arg(long)]
        room: Option<String>,
    },
}

/// What `inspect` needs besides the bytes.
#[derive(Debug, Clone, Default)]
pub struct InspectOptions {
    /// Print JSON.
    pub json: bool,
    /// Overrides the senderUri extension.
    pub sender: Option<String>,
    /// Overrides the roomUri extension.
    pub room: Option<String>,
}

/// Run a `content` subcommand, printing to stdout.
pub fn run(cmd: ContentCmd) -> Result<()> {
    match cmd {
        ContentCmd::Inspect {
            file,
            json,
            sender,
            room,
        } => {
            let opts = InspectOptions { json, sender, room };
            print!("{}", inspect_file(&file, &opts)?);
            Ok(())
        }
    }
}

/// Read `path` and describe it.
pub fn inspect_file(path: &Path, opts: &InspectOptions) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    inspect(&bytes, opts).with_context(|| format!("decoding {}", path.display()))
}

/// Describe `bytes`: as JSON (one line) or as text, per `opts`.
pub fn inspect(bytes: &[u8], opts: &InspectOptions) -> Result<String> {
    let report = match MimiContent::decode_with_limits(bytes, &ContentLimits::default()) {
        Ok(d) => content_report(bytes, d.content, d.canonical, opts)?,
        Err(content_err) => match MessageDerivedValues::decode(bytes) {
            Ok((v, canonical)) => derived_report(bytes, &v, canonical)?,
            // Report why it is not a message: that is what the file claims to be.
            Err(_) => return Err(content_err).context("not MIMI content"),
        },
    };
    Ok(if opts.json {
        format!("{}\n", serde_json::to_string(&report)?)
    } else {
        render_text(&report)
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn opt_id(id: Option<&MessageId>) -> Json {
    id.map_or(Json::Null, |i| Json::String(i.to_hex()))
}

fn content_report(
    bytes: &[u8],
    m: MimiContent,
    canonical: bool,
    opts: &InspectOptions,
) -> Result<Json> {
    let roundtrip = m.encode().map(|e| e == bytes).unwrap_or(false);
    // An option wins over the message's own extension.
    let pick = |opt: &Option<String>, ext: Option<&str>| match (opt, ext) {
        (Some(u), _) => Some((u.clone(), "option")),
        (None, Some(u)) => Some((u.to_string(), "extension")),
        (None, None) => None,
    };
    let sender = pick(&opts.sender, m.extensions.sender_uri());
    let room = pick(&opts.room, m.extensions.room_uri());
    let (id, id_note) = match (&sender, &room) {
        (Some((s, _)), Some((r, _))) => match message_id(s, r, bytes) {
            Ok(id) => (Json::String(id.to_hex()), Json::Null),
            Err(e) => (Json::Null, Json::String(format!("not computed: {e}"))),
        },
        _ => (
            Json::Null,
            Json::String(
                "not computed: no sender or room URI (pass --sender and --room, or carry \
                 senderUri/roomUri extensions 1 and 2)"
                    .into(),
            ),
        ),
    };
    let extensions: Vec<Json> = m
        .extensions
        .iter()
        .map(|(k, v)| {
            let name = match k {
                k if *k == ExtensionKey::SENDER_URI => Some("senderUri"),
                k if *k == ExtensionKey::ROOM_URI => Some("roomUri"),
                _ => None,
            };
            json!({ "key": k.to_string(), "name": name, "value": v.to_string() })
        })
        .collect();
    let parts: Vec<Json> = m
        .nested_part
        .parts_depth_first()
        .iter()
        .map(|p| part_json(p.index, p.depth, p.part))
        .collect();
    Ok(json!({
        "kind": "mimiContent",
        "size": bytes.len(),
        "canonical": canonical,
        "roundtrip": roundtrip,
        "message_id": id,
        "message_id_note": id_note,
        "sender_uri": sender.as_ref().map(|s| &s.0),
        "sender_uri_from": sender.as_ref().map(|s| s.1),
        "room_uri": room.as_ref().map(|s| &s.0),
        "room_uri_from": room.as_ref().map(|s| s.1),
        "salt": hex(&m.salt),
        "replaces": opt_id(m.replaces.as_ref()),
        "topic_id": hex(&m.topic_id),
        "expires": m.expires.map(|e| json!({ "relative": e.relative, "time": e.time })),
        "in_reply_to": opt_id(m.in_reply_to.as_ref()),
        "extensions": extensions,
        "parts": parts,
    }))
}

/// Is this media type text we can show as it is?
fn is_text(content_type: &str) -> bool {
    let t = content_type.to_ascii_lowercase();
    t.starts_with("text/") || t.starts_with("application/json")
}

fn part_json(index: usize, depth: usize, p: &NestedPart) -> Json {
    let mut o = json!({
        "index": index,
        "depth": depth,
        "disposition": p.disposition.0,
        "disposition_name": p.disposition.to_string(),
        "language": p.language,
        "cardinality": p.cardinality().name(),
    });
    let extra = match &p.body {
        PartBody::Null => json!({}),
        PartBody::Single {
            content_type,
            content,
        } => {
            let text = is_text(content_type)
                .then(|| std::str::from_utf8(content).ok())
                .flatten();
            json!({
                "content_type": content_type,
                "size": content.len(),
                "text": text,
                "hex": if text.is_none() { Some(hex(content)) } else { None },
            })
        }
        PartBody::External(e) => json!({
            "content_type": e.content_type,
            "url": e.url,
            "expires": e.expires,
            "size": e.size,
            "enc_alg": e.enc_alg,
            "key_len": e.key.len(),
            "nonce_len": e.nonce.len(),
            "aad_len": e.aad.len(),
            "hash_alg": e.hash_alg,
            "content_hash": hex(&e.content_hash),
            "description": e.description,
            "filename": e.filename,
        }),
        PartBody::Multi { semantics, parts } => json!({
            "semantics": semantics.name(),
            "parts": parts.len(),
        }),
    };
    if let (Some(o), Json::Object(extra)) = (o.as_object_mut(), extra) {
        o.extend(extra);
    }
    o
}

fn derived_report(bytes: &[u8], v: &MessageDerivedValues, canonical: bool) -> Result<Json> {
    let roundtrip = v.encode().map(|e| e == bytes).unwrap_or(false);
    Ok(json!({
        "kind": "MessageDerivedValues",
        "size": bytes.len(),
        "canonical": canonical,
        "roundtrip": roundtrip,
        "message_id": v.message_id.to_hex(),
        "message_id_note": "carried in the file, not computed",
        "hub_accepted_timestamp": match &v.hub_accepted_timestamp {
            Timestamp::Millis(ms) => json!(ms),
            Timestamp::Extended(m) => {
                json!(mimi_wire::content::Value::Map(m.clone()).to_string())
            }
        },
        "mls_group_id": hex(&v.mls_group_id),
        "sender_leaf_index": v.sender_leaf_index,
        "sender_client_url": v.sender_client_url,
        "sender_user_url": v.sender_user_url,
        "room_url": v.room_url,
    }))
}

fn s(j: &Json) -> String {
    match j {
        Json::Null => "-".into(),
        Json::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn yes(j: &Json) -> &'static str {
    if j.as_bool() == Some(true) {
        "yes"
    } else {
        "no"
    }
}

/// The text form, built from the same report as the JSON so the two never disagree.
fn render_text(r: &Json) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}, {} bytes; deterministic encoding: {}; re-encodes to the same bytes: {}",
        s(&r["kind"]),
        s(&r["size"]),
        yes(&r["canonical"]),
        yes(&r["roundtrip"])
    );
    let id = match (&r["message_id"], &r["message_id_note"]) {
        (Json::String(id), Json::Null) => id.clone(),
        (Json::String(id), note) => format!("{id} ({})", s(note)),
        (_, note) => s(note),
    };
    let _ = writeln!(out, "message ID    {id}");
    if r["kind"] == "MessageDerivedValues" {
        for k in [
            "hub_accepted_timestamp",
            "mls_group_id",
            "sender_leaf_index",
            "sender_client_url",
            "sender_user_url",
            "room_url",
        ] {
            let _ = writeln!(out, "{k:<24}{}", s(&r[k]));
        }
        return out;
    }
    for (label, key, from) in [
        ("sender URI", "sender_uri", "sender_uri_from"),
        ("room URI", "room_uri", "room_uri_from"),
    ] {
        if !r[key].is_null() {
            let _ = writeln!(out, "{label:<14}{} (from {})", s(&r[key]), s(&r[from]));
        }
    }
    let _ = writeln!(out, "salt          {}", s(&r["salt"]));
    let _ = writeln!(out, "replaces      {}", s(&r["replaces"]));
    let topic = s(&r["topic_id"]);
    let _ = writeln!(
        out,
        "topicId       {}",
        if topic.is_empty() { "(none)" } else { &topic }
    );
    let expires = match &r["expires"] {
        Json::Null => "never".to_string(),
        e if e["relative"] == true => format!("{} s after reading", s(&e["time"])),
        e => format!("at {} (unix seconds)", s(&e["time"])),
    };
    let _ = writeln!(out, "expires       {expires}");
    let _ = writeln!(out, "inReplyTo     {}", s(&r["in_reply_to"]));
    let exts = r["extensions"].as_array().cloned().unwrap_or_default();
    if exts.is_empty() {
        let _ = writeln!(out, "extensions    (none)");
    }
    for (n, e) in exts.iter().enumerate() {
        let label = if n == 0 { "extensions" } else { "" };
        let name = match &e["name"] {
            Json::String(n) => format!(" ({n})"),
            _ => String::new(),
        };
        let _ = writeln!(out, "{label:<14}{}{name}: {}", s(&e["key"]), s(&e["value"]));
    }
    let _ = writeln!(out, "body");
    for p in r["parts"].as_array().cloned().unwrap_or_default() {
        let indent = "  ".repeat(p["depth"].as_u64().unwrap_or(1) as usize);
        let lang = match p["language"].as_str() {
            Some("") | None => String::new(),
            Some(l) => format!(", language {l}"),
        };
        let head = format!(
            "{indent}[{}] {}, {}{lang}",
            s(&p["index"]),
            s(&p["disposition_name"]),
            s(&p["cardinality"])
        );
        let detail = match p["cardinality"].as_str() {
            Some("single") => format!(", {}, {} bytes", s(&p["content_type"]), s(&p["size"])),
            Some("external") => format!(
                ", {}, {} ({} bytes)",
                s(&p["content_type"]),
                s(&p["url"]),
                s(&p["size"])
            ),
            Some("multi") => format!(", {} of {} parts", s(&p["semantics"]), s(&p["parts"])),
            _ => String::new(),
        };
        let _ = writeln!(out, "{head}{detail}");
        if let Some(t) = p["text"].as_str() {
            for line in t.lines() {
                // Control characters could drive the terminal: show U+FFFD instead.
                let shown = line.replace(|c: char| c.is_control(), "\u{fffd}");
                let _ = writeln!(out, "{indent}    | {shown}");
            }
        } else if let Some(h) = p["hex"].as_str() {
            let _ = writeln!(out, "{indent}    h'{h}'");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use mimi_wire::content::ContentError;

    fn vectors() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../interop/mimi-content-examples")
    }

    /// The message ID an `.edn` states in its header comment.
    fn stated_id(name: &str) -> String {
        let edn = std::fs::read_to_string(vectors().join(format!("{name}.edn"))).unwrap();
        let at = edn.find("# message ID = h'").unwrap() + "# message ID = h'".len();
        let end = edn[at..].find('\'').unwrap() + at;
        edn[at..end]
            .chars()
            .filter(|c| c.is_ascii_hexdigit())
            .collect()
    }

    fn json_of(path: &Path, opts: InspectOptions) -> Json {
        let out = inspect_file(path, &InspectOptions { json: true, ..opts }).unwrap();
        assert_eq!(out.lines().count(), 1, "one JSON object on one line");
        serde_json::from_str(&out).unwrap()
    }

    #[test]
    fn json_of_every_vector_has_its_message_id_and_roundtrips() {
        for name in ["original", "reply", "multipart-1", "expiring", "delete"] {
            let j = json_of(
                &vectors().join(format!("{name}.cbor")),
                InspectOptions::default(),
            );
            assert_eq!(j["message_id"], stated_id(name), "{name}");
            assert_eq!(j["roundtrip"], true, "{name}");
            assert_eq!(j["canonical"], true, "{name}");
            assert_eq!(j["sender_uri_from"], "extension");
        }
        let j = json_of(
            &vectors().join("multipart-2.cbor"),
            InspectOptions::default(),
        );
        assert_eq!(j["parts"].as_array().unwrap().len(), 4);
        assert_eq!(j["parts"][3]["text"], "🤞");
        assert_eq!(j["parts"][0]["semantics"], "processAll");
    }

    #[test]
    fn text_form_names_the_fields() {
        let out = inspect_file(&vectors().join("reply.cbor"), &InspectOptions::default()).unwrap();
        assert!(out.contains(&stated_id("reply")));
        assert!(out.contains("inReplyTo     017ce548"));
        assert!(out.contains("| Right on! _Congratulations_ 'all!"), "{out}");
        assert!(out.contains("re-encodes to the same bytes: yes"));
        let out = inspect_file(
            &vectors().join("implied-original.cbor"),
            &InspectOptions::default(),
        )
        .unwrap();
        assert!(out.starts_with("MessageDerivedValues"));
    }

    #[test]
    fn non_canonical_input_is_not_a_roundtrip_and_uris_can_be_given() {
        let dir = tempfile::tempdir().unwrap();
        let orig = std::fs::read(vectors().join("original.cbor")).unwrap();
        // The salt's length in a one-byte argument: valid CBOR, not deterministic.
        let mut bytes = vec![0x87, 0x58, 0x10];
        bytes.extend_from_slice(&orig[2..]);
        let path = dir.path().join("x.cbor");
        std::fs::write(&path, &bytes).unwrap();
        let j = json_of(&path, InspectOptions::default());
        assert_eq!(j["roundtrip"], false);
        assert_eq!(j["canonical"], false);
        // The ID is over the exact bytes, so it is not the original's.
        let id = j["message_id"].as_str().unwrap();
        assert_eq!(id.len(), 64);
        assert_ne!(id, stated_id("original"));

        // Without the URI extensions the ID needs the options.
        let mut m = MimiContent::decode(&orig).unwrap();
        m.extensions = Default::default();
        std::fs::write(&path, m.encode().unwrap()).unwrap();
        let j = json_of(&path, InspectOptions::default());
        assert!(j["message_id"].is_null());
        assert!(j["message_id_note"].as_str().unwrap().contains("--sender"));
        let j = json_of(
            &path,
            InspectOptions {
                sender: Some("mimi://example.com/u/alice-smith".into()),
                room: Some("mimi://example.com/r/engineering_team".into()),
                ..Default::default()
            },
        );
        let want = mimi_wire::content::message_id(
            "mimi://example.com/u/alice-smith",
            "mimi://example.com/r/engineering_team",
            &m.encode().unwrap(),
        )
        .unwrap();
        assert_eq!(j["message_id"], want.to_hex());
        assert_eq!(j["sender_uri_from"], "option");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let err = inspect(&[0x87, 0x50, 0x00], &InspectOptions::default()).unwrap_err();
        let cause = err.root_cause().downcast_ref::<ContentError>().unwrap();
        assert!(matches!(cause, ContentError::Truncated { .. }), "{cause:?}");
    }
}
