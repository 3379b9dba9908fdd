//! QMP and guest-agent wire format: one JSON object per line (QEMU ends lines with `\r\n`).
//!
//! Pure functions only. Invariants: a line longer than [`MAX_LINE`] is refused before it is
//! parsed; any byte sequence gives a `Message` or a `String` error, never a panic.

use serde_json::{json, Map, Value};

/// Longest line accepted from a peer. `query-named-block-nodes` on a VM with many disks and
/// snapshots is the largest reply holdfast asks for; a few MiB at most.
pub const MAX_LINE: usize = 64 << 20;

/// One message from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Greeting(QemuVersion),
    Return {
        id: Option<Value>,
        value: Value,
    },
    Error {
        id: Option<Value>,
        class: String,
        desc: String,
    },
    Event(Event),
}

/// An asynchronous QMP event. `seq` is assigned by the client in arrival order (from 1).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub seq: u64,
    pub name: String,
    pub data: Value,
    /// Seconds and microseconds since the epoch, as QEMU stamped it.
    pub timestamp: (i64, i64),
}

impl Event {
    /// `data.<key>` as a string, if present.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.data.get(key).and_then(Value::as_str)
    }
}

/// The QEMU version from the QMP greeting.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QemuVersion {
    pub major: u64,
    pub minor: u64,
    pub micro: u64,
    pub package: String,
    pub capabilities: Vec<String>,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// Parse one line (without its terminator) from QMP or the guest agent.
pub fn parse_message(line: &[u8]) -> Result<Message, String> {
    if line.len() > MAX_LINE {
        return Err(format!("line of {} bytes exceeds {MAX_LINE}", line.len()));
    }
    let v: Value = serde_json::from_slice(line).map_err(|e| {
        let shown = String::from_utf8_lossy(line.get(..80).unwrap_or(line)).into_owned();
        format!("not JSON ({e}): {shown:?}")
    })?;
    let Value::Object(mut obj) = v else {
        return Err("message is not a JSON object".into());
    };
    if let Some(g) = obj.remove("QMP") {
        return parse_greeting(&g).map(Message::Greeting);
    }
    let id = obj.remove("id");
    if let Some(value) = obj.remove("return") {
        return Ok(Message::Return { id, value });
    }
    if let Some(err) = obj.remove("error") {
        let class = err.get("class").and_then(Value::as_str);
        let desc = err.get("desc").and_then(Value::as_str);
        return Ok(Message::Error {
            id,
            class: class.unwrap_or("(no class)").to_string(),
            desc: desc.unwrap_or("(no description)").to_string(),
        });
    }
    if let Some(name) = obj.remove("event") {
        let name = name
            .as_str()
            .ok_or("event name is not a string")?
            .to_string();
        return Ok(Message::Event(Event {
            seq: 0,
            name,
            data: obj.remove("data").unwrap_or(Value::Null),
            timestamp: parse_timestamp(obj.get("timestamp")),
        }));
    }
    Err("message has none of QMP, return, error, event".into())
}

fn parse_timestamp(t: Option<&Value>) -> (i64, i64) {
    let get = |k: &str| {
        t.and_then(|t| t.get(k))
            .and_then(Value::as_i64)
            .unwrap_or(0)
    };
    (get("seconds"), get("microseconds"))
}

fn parse_greeting(g: &Value) -> Result<QemuVersion, String> {
    let v = g.get("version").ok_or("greeting has no version")?;
    let q = v.get("qemu").ok_or("greeting has no version.qemu")?;
    let num = |k: &str| {
        q.get(k)
            .and_then(Value::as_u64)
            .ok_or(format!("greeting version has no {k}"))
    };
    let capabilities = g
        .get("capabilities")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|c| c.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    Ok(QemuVersion {
        major: num("major")?,
        minor: num("minor")?,
        micro: num("micro")?,
        package: v
            .get("package")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        capabilities,
    })
}

/// Encode a command with its `id`, newline-terminated. `args` of `Null` sends no arguments;
/// anything else must be an object.
pub fn encode_command(command: &str, args: &Value, id: Option<u64>) -> Result<Vec<u8>, String> {
    let mut m = Map::new();
    m.insert("execute".into(), json!(command));
    match args {
        Value::Null => {}
        Value::Object(_) => {
            m.insert("arguments".into(), args.clone());
        }
        _ => return Err(format!("arguments of {command} must be a JSON object")),
    }
    if let Some(id) = id {
        m.insert("id".into(), json!(id));
    }
    let mut out = serde_json::to_vec(&Value::Object(m)).map_err(|e| e.to_string())?;
    out.push(b'\n');
    Ok(out)
}

/// Strip a trailing `\n` / `\r\n`.
pub fn trim_line(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_greeting_return_error_event() {
        let g = br#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian"}, "capabilities": ["oob"]}}"#;
        let Message::Greeting(v) = parse_message(g).unwrap() else {
            panic!()
        };
        assert_eq!(v.to_string(), "10.0.2");
        assert_eq!(v.capabilities, vec!["oob"]);
        let r = parse_message(br#"{"return": {}, "id": 7}"#).unwrap();
        assert_eq!(
            r,
            Message::Return {
                id: Some(json!(7)),
                value: json!({})
            }
        );
        let e = parse_message(br#"{"id": 3, "error": {"class": "GenericError", "desc": "x"}}"#);
        assert_eq!(
            e.unwrap(),
            Message::Error {
                id: Some(json!(3)),
                class: "GenericError".into(),
                desc: "x".into()
            }
        );
        let ev = br#"{"timestamp": {"seconds": 5, "microseconds": 6}, "event": "STOP"}"#;
        let Message::Event(ev) = parse_message(ev).unwrap() else {
            panic!()
        };
        assert_eq!((ev.name.as_str(), ev.timestamp), ("STOP", (5, 6)));
    }

    #[test]
    fn malformed_lines_are_errors() {
        let bad: &[&[u8]] = &[
            b"",
            b"garbage",
            b"[1,2]",
            b"{}",
            b"{\"event\": 5}",
            b"{\"QMP\": {}}",
            b"{\"QMP\": {\"version\": {\"qemu\": {\"major\": \"x\"}}}}",
            b"\xff\xfe{",
            b"{\"return\": ",
        ];
        for b in bad {
            assert!(
                parse_message(b).is_err(),
                "{:?}",
                String::from_utf8_lossy(b)
            );
        }
    }

    #[test]
    fn error_without_class_still_parses() {
        let e = parse_message(br#"{"error": 5}"#).unwrap();
        assert!(matches!(e, Message::Error { id: None, .. }));
    }

    #[test]
    fn encodes_commands() {
        let c = encode_command("query-jobs", &Value::Null, Some(1)).unwrap();
        assert_eq!(c.last(), Some(&b'\n'));
        let v: Value = serde_json::from_slice(&c).unwrap();
        assert_eq!(v, json!({"execute": "query-jobs", "id": 1}));
        let c = encode_command("x", &json!({"a": 1}), None).unwrap();
        let v: Value = serde_json::from_slice(&c).unwrap();
        assert_eq!(v, json!({"execute": "x", "arguments": {"a": 1}}));
        assert!(encode_command("x", &json!([1]), None).is_err());
        assert_eq!(trim_line(b"ab\r\n"), b"ab");
    }

    #[test]
    fn any_bytes_never_panic() {
        use proptest::prelude::*;
        proptest!(|(bytes in proptest::collection::vec(any::<u8>(), 0..256))| {
            let _ = parse_message(&bytes);
        });
    }
}
