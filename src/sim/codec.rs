//! XML-RPC as xapi speaks it: parsing `methodCall` requests and emitting responses byte for byte
//! like ocaml-rpc's non-strict serializer.
//!
//! Requests may use typed (`<string>`, `<i4>`, `<int>`, `<i8>`, ...) or untyped values (text
//! directly inside `<value>`). Responses never use `<string>` or `<i8>`: strings and int64 are
//! bare text, exactly what xapi sends. [`Value::Int`] is the one integer that gets a tag (`<i4>`),
//! as xapi's `Int32` does; XenAPI `int` fields are [`Value::Int64`].

use std::collections::BTreeMap;

use quick_xml::Reader;
use quick_xml::events::Event;

pub use xmlrpc::Value;

/// A parsed request.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodCall {
    pub method: String,
    pub params: Vec<Value>,
}

/// Why a request body is not an XML-RPC call; xapi answers these with HTTP 500.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub String);

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseError {}

fn parse_error(expected: &str, found: &str, context: &str) -> ParseError {
    ParseError(format!(
        "Xmlrpc.Parse_error(\"{expected}\", \"{found}\", \"{context}\")"
    ))
}

/// Parses a `methodCall` document.
pub fn parse_call(body: &[u8]) -> Result<MethodCall, ParseError> {
    let root = parse_tree(body)?;
    if root.name != "methodCall" {
        return Err(parse_error("methodCall", &root.name, "document"));
    }
    let mut elements = root.elements();
    let name = elements
        .next()
        .ok_or_else(|| parse_error("methodName", "end of methodCall", "methodCall"))?;
    if name.name != "methodName" {
        return Err(parse_error("methodName", &name.name, "methodCall"));
    }
    let method = name.text();
    let params_element = elements
        .next()
        .ok_or_else(|| parse_error("params", "end of methodCall", "methodCall"))?;
    if params_element.name != "params" {
        return Err(parse_error("params", &params_element.name, "methodCall"));
    }
    if let Some(extra) = elements.next() {
        return Err(parse_error("/methodCall", &extra.name, "methodCall"));
    }
    let mut params = Vec::new();
    for param in params_element.elements() {
        if param.name != "param" {
            return Err(parse_error("param", &param.name, "params"));
        }
        let mut inner = param.elements();
        let value = inner
            .next()
            .ok_or_else(|| parse_error("value", "end of param", "param"))?;
        if inner.next().is_some() {
            return Err(parse_error("/param", "value", "param"));
        }
        params.push(value_of(value)?);
    }
    Ok(MethodCall { method, params })
}

/// Parses a `methodResponse` into its single value (the Status struct for XenAPI calls).
pub fn parse_response(body: &[u8]) -> Result<Value, ParseError> {
    let root = parse_tree(body)?;
    if root.name != "methodResponse" {
        return Err(parse_error("methodResponse", &root.name, "document"));
    }
    let value = root
        .elements()
        .find(|e| e.name == "params")
        .and_then(|params| params.elements().find(|e| e.name == "param"))
        .and_then(|param| param.elements().next())
        .ok_or_else(|| parse_error("params", "nothing", "methodResponse"))?;
    value_of(value)
}

/// Serialises a `methodCall` (values as [`value_fragment`] writes them).
pub fn method_call(method: &str, params: &[Value]) -> Vec<u8> {
    let mut out = String::from(HEADER);
    out.push_str("<methodCall><methodName>");
    escape_into(&mut out, method);
    out.push_str("</methodName><params>");
    for param in params {
        out.push_str("<param>");
        write_value(&mut out, param);
        out.push_str("</param>");
    }
    out.push_str("</params></methodCall>");
    out.into_bytes()
}

/// Parses one `<value>` fragment (as stored in task results).
pub fn parse_value_fragment(text: &str) -> Result<Value, ParseError> {
    value_of(&parse_tree(text.as_bytes())?)
}

/// A minimal element tree: the XML-RPC grammar is small and strictly nested.
#[derive(Debug)]
struct Element {
    name: String,
    children: Vec<Node>,
}

#[derive(Debug)]
enum Node {
    Element(Element),
    Text(String),
}

impl Element {
    fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|node| match node {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    fn text(&self) -> String {
        self.children
            .iter()
            .filter_map(|node| match node {
                Node::Text(t) => Some(t.as_str()),
                Node::Element(_) => None,
            })
            .collect()
    }

    fn has_elements(&self) -> bool {
        self.elements().next().is_some()
    }

    /// Text other than whitespace beside child elements is not XML-RPC.
    fn check_no_text_beside_elements(&self) -> Result<(), ParseError> {
        if self.has_elements() && !self.text().trim().is_empty() {
            return Err(parse_error("element", "text", &self.name));
        }
        Ok(())
    }
}

fn parse_tree(body: &[u8]) -> Result<Element, ParseError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ParseError(format!(
            "Xmlrpc.Parse_error(\"utf-8\", \"{e}\", \"document\")"
        ))
    })?;
    let mut reader = Reader::from_str(text);
    reader.config_mut().check_end_names = true;
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    let xml_error = |e: &dyn std::fmt::Display, pos: u64| {
        ParseError(format!(
            "Xmlrpc.Parse_error(\"xml\", \"{e}\", \"byte {pos}\")"
        ))
    };
    loop {
        let position = reader.buffer_position();
        let event = reader.read_event().map_err(|e| xml_error(&e, position))?;
        match event {
            Event::Start(start) => {
                if root.is_some() {
                    return Err(parse_error("end of document", "element", "document"));
                }
                let name = String::from_utf8_lossy(start.name().as_ref()).into_owned();
                stack.push(Element {
                    name,
                    children: Vec::new(),
                });
            }
            Event::Empty(empty) => {
                let element = Element {
                    name: String::from_utf8_lossy(empty.name().as_ref()).into_owned(),
                    children: Vec::new(),
                };
                match stack.last_mut() {
                    Some(parent) => parent.children.push(Node::Element(element)),
                    None if root.is_none() => root = Some(element),
                    None => return Err(parse_error("end of document", "element", "document")),
                }
            }
            Event::End(_) => {
                let element = stack
                    .pop()
                    .ok_or_else(|| parse_error("element", "end tag", "document"))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(Node::Element(element)),
                    None => root = Some(element),
                }
            }
            Event::Text(t) => {
                let content = t.xml10_content().map_err(|e| xml_error(&e, position))?;
                push_text(&mut stack, &content)?;
            }
            Event::CData(c) => {
                let content = c.decode().map_err(|e| xml_error(&e, position))?;
                push_text(&mut stack, &content)?;
            }
            Event::GeneralRef(r) => {
                let resolved = match r.resolve_char_ref().map_err(|e| xml_error(&e, position))? {
                    Some(c) => c.to_string(),
                    None => {
                        let name = r.decode().map_err(|e| xml_error(&e, position))?;
                        quick_xml::escape::resolve_xml_entity(&name)
                            .ok_or_else(|| parse_error("entity", &name, "text"))?
                            .to_string()
                    }
                };
                push_text(&mut stack, &resolved)?;
            }
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) | Event::DocType(_) => {}
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(parse_error(
            "end tag",
            "end of document",
            &stack[stack.len() - 1].name,
        ));
    }
    root.ok_or_else(|| parse_error("methodCall", "end of document", "document"))
}

fn push_text(stack: &mut [Element], text: &str) -> Result<(), ParseError> {
    match stack.last_mut() {
        Some(parent) => {
            if let Some(Node::Text(previous)) = parent.children.last_mut() {
                previous.push_str(text);
            } else {
                parent.children.push(Node::Text(text.to_string()));
            }
            Ok(())
        }
        None if text.trim().is_empty() => Ok(()),
        None => Err(parse_error("element", "text", "document")),
    }
}

fn value_of(element: &Element) -> Result<Value, ParseError> {
    if element.name != "value" {
        return Err(parse_error("value", &element.name, "value"));
    }
    if !element.has_elements() {
        // Untyped: the text itself, whitespace included, is the string.
        return Ok(Value::String(element.text()));
    }
    element.check_no_text_beside_elements()?;
    let mut typed = element.elements();
    let inner = typed.next().expect("has elements");
    if let Some(extra) = typed.next() {
        return Err(parse_error("/value", &extra.name, "value"));
    }
    if inner.name != "array" && inner.name != "struct" && inner.has_elements() {
        return Err(parse_error("text", "element", &inner.name));
    }
    let text = inner.text();
    match inner.name.as_str() {
        "string" => Ok(Value::String(text)),
        "int" | "i4" | "i8" => {
            let n: i64 = text
                .trim()
                .parse()
                .map_err(|_| parse_error("integer", &text, &inner.name))?;
            if inner.name != "i8"
                && let Ok(small) = i32::try_from(n)
            {
                return Ok(Value::Int(small));
            }
            Ok(Value::Int64(n))
        }
        "boolean" => match text.trim() {
            "1" | "true" => Ok(Value::Bool(true)),
            "0" | "false" => Ok(Value::Bool(false)),
            other => Err(parse_error("boolean", other, "boolean")),
        },
        "double" => parse_double(text.trim())
            .map(Value::Double)
            .ok_or_else(|| parse_error("double", &text, "double")),
        "dateTime.iso8601" => Ok(iso8601::datetime(text.trim())
            .map(Value::DateTime)
            .unwrap_or(Value::String(text))),
        "base64" => decode_base64(&text)
            .map(Value::Base64)
            .ok_or_else(|| parse_error("base64", &text, "base64")),
        "nil" => Ok(Value::Nil),
        "array" => {
            inner.check_no_text_beside_elements()?;
            let mut items = Vec::new();
            for data in inner.elements() {
                if data.name != "data" {
                    return Err(parse_error("data", &data.name, "array"));
                }
                data.check_no_text_beside_elements()?;
                for item in data.elements() {
                    items.push(value_of(item)?);
                }
            }
            Ok(Value::Array(items))
        }
        "struct" => {
            inner.check_no_text_beside_elements()?;
            let mut members = BTreeMap::new();
            for member in inner.elements() {
                if member.name != "member" {
                    return Err(parse_error("member", &member.name, "struct"));
                }
                member.check_no_text_beside_elements()?;
                let mut parts = member.elements();
                let name = parts
                    .next()
                    .filter(|n| n.name == "name")
                    .ok_or_else(|| parse_error("name", "other", "member"))?;
                let value = parts
                    .next()
                    .ok_or_else(|| parse_error("value", "end of member", "member"))?;
                members.insert(name.text(), value_of(value)?);
            }
            Ok(Value::Struct(members))
        }
        other => Err(parse_error("value type", other, "value")),
    }
}

fn parse_double(text: &str) -> Option<f64> {
    match text {
        "inf" | "+inf" | "infinity" => Some(f64::INFINITY),
        "-inf" | "-infinity" => Some(f64::NEG_INFINITY),
        "nan" | "-nan" => Some(f64::NAN),
        other => other.parse().ok(),
    }
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut buffer = 0u32;
    let mut bits = 0;
    for c in text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
    {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        buffer = (buffer << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
            buffer &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn encode_base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

const HEADER: &str = "<?xml version=\"1.0\"?>";

/// The bytes of a successful response.
pub fn success(value: &Value) -> Vec<u8> {
    let mut out = String::with_capacity(256);
    out.push_str(HEADER);
    out.push_str("<methodResponse><params><param><value><struct><member><name>Status</name><value>Success</value></member><member><name>Value</name>");
    write_value(&mut out, value);
    out.push_str("</member></struct></value></param></params></methodResponse>");
    out.into_bytes()
}

/// The bytes of an API failure: `ErrorDescription = [code, params...]`.
pub fn failure(code: &str, params: &[String]) -> Vec<u8> {
    let mut out = String::with_capacity(256);
    out.push_str(HEADER);
    out.push_str("<methodResponse><params><param><value><struct><member><name>Status</name><value>Failure</value></member><member><name>ErrorDescription</name><value><array><data>");
    for part in std::iter::once(code).chain(params.iter().map(String::as_str)) {
        out.push_str("<value>");
        escape_into(&mut out, part);
        out.push_str("</value>");
    }
    out.push_str(
        "</data></array></value></member></struct></value></param></params></methodResponse>",
    );
    out.into_bytes()
}

/// A response without the Status envelope (xapi's `system.listMethods`).
pub fn unwrapped(value: &Value) -> Vec<u8> {
    let mut out = String::with_capacity(256);
    out.push_str(HEADER);
    out.push_str("<methodResponse><params><param>");
    write_value(&mut out, value);
    out.push_str("</param></params></methodResponse>");
    out.into_bytes()
}

/// One `<value>` fragment, as xapi stores task results.
pub fn value_fragment(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value);
    out
}

fn write_value(out: &mut String, value: &Value) {
    out.push_str("<value>");
    match value {
        Value::String(s) => escape_into(out, s),
        Value::Int64(i) => out.push_str(&i.to_string()),
        Value::Int(i) => {
            out.push_str("<i4>");
            out.push_str(&i.to_string());
            out.push_str("</i4>");
        }
        Value::Bool(b) => out.push_str(if *b {
            "<boolean>1</boolean>"
        } else {
            "<boolean>0</boolean>"
        }),
        Value::Double(d) => {
            out.push_str("<double>");
            out.push_str(&format_double(*d));
            out.push_str("</double>");
        }
        Value::DateTime(dt) => {
            out.push_str("<dateTime.iso8601>");
            out.push_str(&format_datetime(dt));
            out.push_str("</dateTime.iso8601>");
        }
        Value::Base64(bytes) => {
            out.push_str("<base64>");
            out.push_str(&encode_base64(bytes));
            out.push_str("</base64>");
        }
        Value::Array(items) => {
            out.push_str("<array><data>");
            for item in items {
                write_value(out, item);
            }
            out.push_str("</data></array>");
        }
        Value::Struct(members) => {
            out.push_str("<struct>");
            for (name, member) in members {
                // ocaml-rpc writes member names unescaped; so does xapi.
                out.push_str("<member><name>");
                out.push_str(name);
                out.push_str("</name>");
                write_value(out, member);
                out.push_str("</member>");
            }
            out.push_str("</struct>");
        }
        Value::Nil => out.push_str("<nil/>"),
    }
    out.push_str("</value>");
}

/// ocaml-rpc's escaping: `< > & "` as entities, TAB/LF/CR and everything from 0x20 up raw,
/// other control characters dropped.
fn escape_into(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 => {}
            c => out.push(c),
        }
    }
}

/// C's `%.16g`, with OCaml's spelling of non-finite numbers.
pub fn format_double(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0".into()
        } else {
            "0".into()
        };
    }
    const PRECISION: i32 = 16;
    let scientific = format!("{:.*e}", (PRECISION - 1) as usize, x);
    let (mantissa, exponent) = scientific.split_once('e').expect("exponent form");
    let exponent: i32 = exponent.parse().expect("integer exponent");
    if !(-4..PRECISION).contains(&exponent) {
        let mantissa = strip_fraction_zeros(mantissa);
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exponent.abs())
    } else {
        let decimals = (PRECISION - 1 - exponent).max(0) as usize;
        strip_fraction_zeros(&format!("{x:.decimals$}")).to_string()
    }
}

fn strip_fraction_zeros(text: &str) -> &str {
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.')
    } else {
        text
    }
}

/// xapi's `Date.to_rfc3339`: basic date, extended time, `Z` for UTC.
pub fn format_datetime(dt: &iso8601::DateTime) -> String {
    let (year, month, day) = match dt.date {
        iso8601::Date::YMD { year, month, day } => (year, month, day),
        // Week and ordinal dates never come out of the simulator; render them as given.
        iso8601::Date::Week { year, ww, d } => (year, ww, d),
        iso8601::Date::Ordinal { year, ddd } => (year, 1, ddd),
    };
    let t = &dt.time;
    let zone = if t.tz_offset_hours == 0 && t.tz_offset_minutes == 0 {
        "Z".to_string()
    } else {
        let sign = if t.tz_offset_hours < 0 || t.tz_offset_minutes < 0 {
            '-'
        } else {
            '+'
        };
        format!(
            "{sign}{:02}:{:02}",
            t.tz_offset_hours.abs(),
            t.tz_offset_minutes.abs()
        )
    };
    format!(
        "{year:04}{month:02}{day:02}T{:02}:{:02}:{:02}{zone}",
        t.hour, t.minute, t.second
    )
}

/// A UTC date from a Unix time in seconds.
pub fn datetime_from_unix(seconds: i64) -> iso8601::DateTime {
    let at = time::OffsetDateTime::from_unix_timestamp(seconds)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    iso8601::DateTime {
        date: iso8601::Date::YMD {
            year: at.year(),
            month: u32::from(u8::from(at.month())),
            day: u32::from(at.day()),
        },
        time: iso8601::Time {
            hour: u32::from(at.hour()),
            minute: u32::from(at.minute()),
            second: u32::from(at.second()),
            millisecond: 0,
            tz_offset_hours: 0,
            tz_offset_minutes: 0,
        },
    }
}

/// The date of "now", as xapi stamps records.
pub fn now() -> Value {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Value::DateTime(datetime_from_unix(seconds))
}

/// The epoch, xapi's "never" for unset dates.
pub fn epoch() -> Value {
    Value::DateTime(datetime_from_unix(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(params: &str) -> Vec<Value> {
        let body = format!(
            "<?xml version=\"1.0\"?><methodCall><methodName>m</methodName><params>{params}</params></methodCall>"
        );
        parse_call(body.as_bytes()).unwrap().params
    }

    #[test]
    fn login_success_is_byte_exact() {
        let bytes = success(&Value::String(
            "OpaqueRef:9e9c4a3c-0000-4000-8000-000000000001".into(),
        ));
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "<?xml version=\"1.0\"?><methodResponse><params><param><value><struct><member><name>Status</name><value>Success</value></member><member><name>Value</name><value>OpaqueRef:9e9c4a3c-0000-4000-8000-000000000001</value></member></struct></value></param></params></methodResponse>"
        );
    }

    #[test]
    fn failure_is_byte_exact() {
        let bytes = failure("HANDLE_INVALID", &["VDI".into(), "OpaqueRef:x".into()]);
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "<?xml version=\"1.0\"?><methodResponse><params><param><value><struct><member><name>Status</name><value>Failure</value></member><member><name>ErrorDescription</name><value><array><data><value>HANDLE_INVALID</value><value>VDI</value><value>OpaqueRef:x</value></data></array></value></member></struct></value></param></params></methodResponse>"
        );
    }

    #[test]
    fn values_are_emitted_like_ocaml_rpc() {
        let record = Value::Struct(BTreeMap::from([
            ("a_size".to_string(), Value::Int64(10737418240)),
            ("b_flag".to_string(), Value::Bool(true)),
            ("c_time".to_string(), Value::DateTime(datetime_from_unix(0))),
            ("d_progress".to_string(), Value::Double(0.5)),
            ("e_empty_map".to_string(), Value::Struct(BTreeMap::new())),
            ("f_empty_set".to_string(), Value::Array(Vec::new())),
            (
                "g_text".to_string(),
                Value::String("a<b>&\"c\"\u{1}".into()),
            ),
            ("h_void".to_string(), Value::String(String::new())),
            ("i_count".to_string(), Value::Int(3)),
        ]));
        assert_eq!(
            value_fragment(&record),
            "<value><struct>\
             <member><name>a_size</name><value>10737418240</value></member>\
             <member><name>b_flag</name><value><boolean>1</boolean></value></member>\
             <member><name>c_time</name><value><dateTime.iso8601>19700101T00:00:00Z</dateTime.iso8601></value></member>\
             <member><name>d_progress</name><value><double>0.5</double></value></member>\
             <member><name>e_empty_map</name><value><struct></struct></value></member>\
             <member><name>f_empty_set</name><value><array><data></data></array></value></member>\
             <member><name>g_text</name><value>a&lt;b&gt;&amp;&quot;c&quot;</value></member>\
             <member><name>h_void</name><value></value></member>\
             <member><name>i_count</name><value><i4>3</i4></value></member>\
             </struct></value>"
        );
    }

    #[test]
    fn doubles_follow_percent_16g() {
        assert_eq!(format_double(1.0), "1");
        assert_eq!(format_double(0.5), "0.5");
        assert_eq!(format_double(1e20), "1e+20");
        assert_eq!(format_double(0.1), "0.1");
        assert_eq!(format_double(1.0 / 3.0), "0.3333333333333333");
        assert_eq!(format_double(123456.789), "123456.789");
        assert_eq!(format_double(1e-5), "1e-05");
        assert_eq!(format_double(0.0001), "0.0001");
        assert_eq!(format_double(1e16), "1e+16");
        assert_eq!(format_double(9999999999999998.0), "9999999999999998");
        assert_eq!(format_double(f64::INFINITY), "inf");
        assert_eq!(format_double(f64::NEG_INFINITY), "-inf");
        assert_eq!(format_double(f64::NAN), "nan");
        assert_eq!(format_double(0.0), "0");
    }

    #[test]
    fn parses_typed_and_untyped_values() {
        let params = call(
            "<param><value>plain</value></param>\
             <param><value><string>typed &amp; escaped</string></value></param>\
             <param><value><i4>7</i4></value></param>\
             <param><value><int>-2</int></value></param>\
             <param><value><i8>1099511627776</i8></value></param>\
             <param><value><boolean>1</boolean></value></param>\
             <param><value><double>0.25</double></value></param>\
             <param><value/></param>\
             <param><value>  </value></param>\
             <param><value><string/></value></param>\
             <param><value><nil/></value></param>\
             <param><value><dateTime.iso8601>20250319T04:16:24Z</dateTime.iso8601></value></param>\
             <param><value><base64>aGk=</base64></value></param>",
        );
        assert_eq!(
            params[..8],
            [
                Value::String("plain".into()),
                Value::String("typed & escaped".into()),
                Value::Int(7),
                Value::Int(-2),
                Value::Int64(1 << 40),
                Value::Bool(true),
                Value::Double(0.25),
                Value::String(String::new()),
            ]
        );
        assert_eq!(params[8], Value::String("  ".into()));
        assert_eq!(params[9], Value::String(String::new()));
        assert_eq!(params[10], Value::Nil);
        assert_eq!(
            format_datetime(&params[11].as_datetime().unwrap()),
            "20250319T04:16:24Z"
        );
        assert_eq!(params[12], Value::Base64(b"hi".to_vec()));
    }

    #[test]
    fn parses_nested_structs_and_arrays_with_whitespace() {
        let params = call(
            "<param>\n  <value>\n    <struct>\n      <member><name>SR</name><value>OpaqueRef:a</value></member>\n      <member><name>tags</name><value><array><data>\n<value>x</value><value><string>y</string></value></data></array></value></member>\n      <member><name>empty</name><value><struct/></value></member>\n    </struct>\n  </value>\n</param>",
        );
        let record = params[0].as_struct().unwrap();
        assert_eq!(record["SR"], Value::String("OpaqueRef:a".into()));
        assert_eq!(
            record["tags"],
            Value::Array(vec![Value::String("x".into()), Value::String("y".into())])
        );
        assert_eq!(record["empty"], Value::Struct(BTreeMap::new()));
    }

    #[test]
    fn large_i4_becomes_int64() {
        assert_eq!(
            call("<param><value><int>4294967296</int></value></param>")[0],
            Value::Int64(1 << 32)
        );
    }

    #[test]
    fn rejects_malformed_documents() {
        for body in [
            "",
            "<methodCall><methodName>x</methodName>",
            "<methodCall><methodName>x</methodName></methodCall>",
            "<methodCall><methodName>x</methodName><params><param><value><bogus>1</bogus></value></param></params></methodCall>",
            "<methodCall><methodName>x</methodName><params><param><value><i4>one</i4></value></param></params></methodCall>",
            "<methodCall><methodName>x</methodName><params></param></params></methodCall>",
            "<methodResponse/>",
            "not xml at all",
        ] {
            assert!(
                parse_call(body.as_bytes()).is_err(),
                "{body:?} should not parse"
            );
        }
    }

    #[test]
    fn calls_and_responses_round_trip() {
        let params = vec![
            Value::String("a&b".into()),
            Value::Int64(5),
            Value::Bool(false),
        ];
        let call = parse_call(&method_call("VDI.resize", &params)).unwrap();
        assert_eq!(call.method, "VDI.resize");
        assert_eq!(call.params[0], Value::String("a&b".into()));
        assert_eq!(
            call.params[1],
            Value::String("5".into()),
            "int64 travels as bare digits"
        );
        let response = parse_response(&failure("X", &["p".into()])).unwrap();
        assert_eq!(response["Status"], Value::String("Failure".into()));
    }

    #[test]
    fn task_result_fragment_round_trips() {
        let fragment = value_fragment(&Value::String("OpaqueRef:abc".into()));
        assert_eq!(fragment, "<value>OpaqueRef:abc</value>");
        assert_eq!(
            parse_value_fragment(&fragment).unwrap(),
            Value::String("OpaqueRef:abc".into())
        );
    }
}
