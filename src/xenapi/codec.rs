//! XML-RPC encoding and decoding of XenAPI calls, on top of the `xmlrpc` crate.
//!
//! xapi wraps every result in a struct `{Status, Value}` or `{Status, ErrorDescription}` instead of
//! using XML-RPC faults, sends int64 as bare strings, and stores task results as an XML-RPC
//! `<value>` inside a string. This module is the only place that knows the XML.

use std::collections::BTreeMap;
use std::io::Cursor;

pub use xmlrpc::Value;

use super::error::ApiFailure;

/// What a response body decodes to, before the method name is attached.
#[derive(Debug)]
pub enum Decoded {
    Success(Value),
    Failure(ApiFailure),
}

/// Serialises a method call.
pub fn encode_call(method: &str, params: &[Value]) -> Vec<u8> {
    let request = params
        .iter()
        .fold(xmlrpc::Request::new(method), |request, param| {
            request.arg(param.clone())
        });
    let mut body = Vec::with_capacity(256);
    request
        .write_as_xml(&mut body)
        .expect("writing XML into a Vec cannot fail");
    body
}

/// Decodes a `methodResponse` body into xapi's success or failure.
pub fn decode_response(body: &[u8]) -> Result<Decoded, String> {
    let envelope = parse_method_response(body)?;
    let fields = envelope
        .as_struct()
        .ok_or_else(|| "response is not a Status struct".to_string())?;
    match fields.get("Status").and_then(Value::as_str) {
        Some("Success") => Ok(Decoded::Success(
            fields
                .get("Value")
                .cloned()
                .unwrap_or(Value::String(String::new())),
        )),
        Some("Failure") => {
            let description = fields
                .get("ErrorDescription")
                .and_then(Value::as_array)
                .ok_or_else(|| "Failure without ErrorDescription".to_string())?;
            let mut parts = description.iter().map(value_to_text);
            let code = parts
                .next()
                .filter(|code| !code.is_empty())
                .ok_or_else(|| "Failure with an empty ErrorDescription".to_string())?;
            Ok(Decoded::Failure(ApiFailure {
                code,
                params: parts.collect(),
            }))
        }
        Some(other) => Err(format!("unknown Status {other:?}")),
        None => Err("response has no Status".to_string()),
    }
}

/// Decodes a task result: an XML-RPC `<value>` fragment stored as a string.
pub fn decode_task_result(result: &str) -> Result<Value, String> {
    let trimmed = result.trim();
    if trimmed.is_empty() {
        return Ok(Value::String(String::new()));
    }
    let wrapped = format!(
        "<?xml version=\"1.0\"?><methodResponse><params><param>{trimmed}</param></params></methodResponse>"
    );
    parse_method_response(wrapped.as_bytes())
}

/// Text form of a scalar, as xapi's error parameters and untyped values are meant to be read.
pub fn value_to_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Int64(i) => i.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Double(d) => d.to_string(),
        Value::DateTime(d) => d.to_string(),
        Value::Nil => String::new(),
        other => format!("{other:?}"),
    }
}

/// A string map, as XenAPI `(string -> string) map` parameters are sent.
pub fn string_map<'a>(entries: impl IntoIterator<Item = (&'a str, &'a str)>) -> Value {
    Value::Struct(
        entries
            .into_iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect::<BTreeMap<_, _>>(),
    )
}

/// An int64 parameter: xapi takes decimal strings, and `xmlrpc` would otherwise send `<i8>`.
pub fn int64(value: i64) -> Value {
    Value::String(value.to_string())
}

/// Deepest element nesting accepted in a response. xapi's deepest (a map inside a record inside
/// `get_all_records`) is 16; the `xmlrpc` parser, `Value`'s `Drop` and `Debug` all recurse per
/// level, so an unbounded depth would overflow a worker thread's stack and abort the daemon.
const MAX_XML_DEPTH: usize = 64;

/// Refuses bodies nested deeper than [`MAX_XML_DEPTH`] (and bodies that are not well-formed
/// enough to tell), without recursion, before the recursive parser sees them.
fn check_depth(body: &[u8]) -> Result<(), String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_reader(body);
    let mut depth = 0usize;
    loop {
        match reader.read_event() {
            Ok(Event::Start(_)) => {
                depth += 1;
                if depth > MAX_XML_DEPTH {
                    return Err(format!(
                        "response is nested deeper than {MAX_XML_DEPTH} elements"
                    ));
                }
            }
            Ok(Event::End(_)) => depth = depth.saturating_sub(1),
            Ok(Event::Eof) => return Ok(()),
            Ok(_) => {}
            Err(e) => {
                return Err(format!(
                    "response is not well-formed XML at byte {}: {e}",
                    reader.error_position()
                ));
            }
        }
    }
}

fn parse_method_response(body: &[u8]) -> Result<Value, String> {
    check_depth(body)?;
    // `xmlrpc` only parses responses through a transport; hand it the body we already have.
    struct Received<'a>(&'a [u8]);
    impl<'a> xmlrpc::Transport for Received<'a> {
        type Stream = Cursor<&'a [u8]>;
        fn transmit(
            self,
            _: &xmlrpc::Request<'_>,
        ) -> Result<Self::Stream, Box<dyn std::error::Error + Send + Sync>> {
            Ok(Cursor::new(self.0))
        }
    }
    xmlrpc::Request::new("")
        .call(Received(body))
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOGIN_OK: &str = r#"<?xml version="1.0"?><methodResponse><params><param><value><struct><member><name>Status</name><value>Success</value></member><member><name>Value</name><value>OpaqueRef:9e9c4a3c-0000-4000-8000-000000000001</value></member></struct></value></param></params></methodResponse>"#;

    #[test]
    fn decodes_xapi_success_with_untyped_string() {
        match decode_response(LOGIN_OK.as_bytes()).unwrap() {
            Decoded::Success(Value::String(s)) => {
                assert_eq!(s, "OpaqueRef:9e9c4a3c-0000-4000-8000-000000000001")
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn decodes_failure_code_and_params() {
        let body = r#"<?xml version="1.0"?><methodResponse><params><param><value><struct><member><name>Status</name><value>Failure</value></member><member><name>ErrorDescription</name><value><array><data><value>HANDLE_INVALID</value><value>VDI</value><value>OpaqueRef:x</value></data></array></value></member></struct></value></param></params></methodResponse>"#;
        match decode_response(body.as_bytes()).unwrap() {
            Decoded::Failure(f) => {
                assert_eq!(f.code, "HANDLE_INVALID");
                assert_eq!(f.params, vec!["VDI", "OpaqueRef:x"]);
                assert_eq!(f.to_string(), "HANDLE_INVALID [VDI; OpaqueRef:x]");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn decodes_record_with_dates_doubles_and_empty_values() {
        let body = r#"<?xml version="1.0"?><methodResponse><params><param><value><struct><member><name>Status</name><value>Success</value></member><member><name>Value</name><value><struct><member><name>virtual_size</name><value>10737418240</value></member><member><name>snapshot_time</name><value><dateTime.iso8601>19700101T00:00:00Z</dateTime.iso8601></value></member><member><name>progress</name><value><double>inf</double></value></member><member><name>name_description</name><value></value></member><member><name>other_config</name><value><struct></struct></value></member><member><name>VBDs</name><value><array><data></data></array></value></member></struct></value></member></struct></value></param></params></methodResponse>"#;
        let Decoded::Success(record) = decode_response(body.as_bytes()).unwrap() else {
            panic!("expected success")
        };
        assert_eq!(record["virtual_size"].as_str(), Some("10737418240"));
        assert_eq!(record["name_description"].as_str(), Some(""));
        assert!(record["progress"].as_f64().unwrap().is_infinite());
        assert!(record["VBDs"].as_array().unwrap().is_empty());
    }

    #[test]
    fn decodes_task_result_inside_a_string() {
        let value = decode_task_result("<value>OpaqueRef:abc</value>").unwrap();
        assert_eq!(value.as_str(), Some("OpaqueRef:abc"));
        assert_eq!(decode_task_result("").unwrap().as_str(), Some(""));
    }

    #[test]
    fn rejects_garbage_and_wrong_shapes() {
        assert!(decode_response(b"<html>502 Bad Gateway</html>").is_err());
        let no_status = r#"<?xml version="1.0"?><methodResponse><params><param><value>x</value></param></params></methodResponse>"#;
        assert!(decode_response(no_status.as_bytes()).is_err());
    }

    #[test]
    fn refuses_deep_nesting_before_the_recursive_parser() {
        let deep = format!(
            "<?xml version=\"1.0\"?><methodResponse><params><param>{}<value>x</value>{}</param></params></methodResponse>",
            "<value><array><data>".repeat(5000),
            "</data></array></value>".repeat(5000)
        );
        let err = decode_response(deep.as_bytes()).unwrap_err();
        assert!(err.contains("nested deeper"), "{err}");
        assert!(decode_task_result(&"<value><array><data>".repeat(5000)).is_err());
    }

    #[test]
    fn encodes_int64_as_string_and_maps_as_structs() {
        let body = encode_call(
            "VDI.resize",
            &[
                Value::String("OpaqueRef:s".into()),
                int64(1 << 40),
                string_map([("server", "nfs")]),
            ],
        );
        let text = String::from_utf8(body).unwrap();
        assert!(text.contains("<methodName>VDI.resize</methodName>"));
        assert!(text.contains("<string>1099511627776</string>"));
        assert!(text.contains("<name>server</name>"));
    }
}
