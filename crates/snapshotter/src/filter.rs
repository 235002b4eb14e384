//! containerd's filter expressions (containerd 1.6 `filters` package), as
//! `List` / `Walk` receive them:
//!
//! ```text
//! selectors := selector ("," selector)*        all must match
//! selector  := fieldpath [operator value]      no operator: the field is present
//! fieldpath := field ("." field)*
//! field     := quoted | [A-Za-z0-9_]+
//! operator  := "==" | "!=" | "~="              "~=" is a regular expression
//! value     := quoted | [^\s,]+
//! quoted    := "..." (Go escapes); for "~=" also /.../ and |...|
//! ```
//!
//! Several filter strings: any may match. For snapshots the fields are
//! `name`, `parent`, `kind` (`active`, `view`, `committed`) and
//! `labels.<key>` (a key with dots or odd characters quoted: `labels."a.b"`).

use regex::Regex;

use crate::error::Error;

/// Something filters can look at: the value of a field path, if present.
pub trait Fields {
    /// The value at `path`, `None` if absent.
    fn field(&self, path: &[String]) -> Option<String>;
}

#[derive(Debug)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

#[derive(Debug)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

impl Selector {
    fn matches(&self, f: &dyn Fields) -> bool {
        let v = f.field(&self.path);
        match &self.op {
            Op::Present => v.is_some(),
            Op::Equal(want) => v.as_deref() == Some(want.as_str()),
            Op::NotEqual(want) => v.as_deref().unwrap_or("") != want,
            Op::Matches(re) => re.is_match(v.as_deref().unwrap_or("")),
        }
    }
}

/// A parsed set of filters: matches if any filter matches (no filters: all).
#[derive(Debug, Default)]
pub struct Filter {
    any: Vec<Vec<Selector>>,
}

impl Filter {
    /// Parses each string; an empty string matches everything.
    pub fn parse_all<S: AsRef<str>>(filters: &[S]) -> Result<Filter, Error> {
        let mut any = Vec::new();
        for s in filters {
            let s = s.as_ref();
            if s.is_empty() {
                any.push(Vec::new());
                continue;
            }
            let all = Parser::new(s).selectors().map_err(|e| {
                Error::InvalidArgument(format!(
                    "filters: parse error at byte {} of [{s}]: {}",
                    e.0, e.1
                ))
            })?;
            any.push(all);
        }
        Ok(Filter { any })
    }

    /// Whether `f` passes.
    pub fn matches(&self, f: &dyn Fields) -> bool {
        self.any.is_empty() || self.any.iter().any(|all| all.iter().all(|s| s.matches(f)))
    }
}

#[derive(Debug, PartialEq)]
enum Tok {
    Eof,
    Quoted(String),
    Sep(char),
    Operator(String),
    Field(String),
    Value(String),
    Illegal(String),
}

struct Parser<'a> {
    input: &'a str,
    pos: usize,
    value: bool,
}

type PErr = (usize, String);

fn is_field_char(c: char) -> bool {
    c == '_' || c.is_ascii_alphanumeric()
}

fn is_quote(c: char) -> bool {
    matches!(c, '/' | '|' | '"')
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Parser {
            input,
            pos: 0,
            value: false,
        }
    }

    fn peek_char(&self) -> Option<char> {
        self.input[self.pos..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek_char()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn scan(&mut self) -> (usize, Tok) {
        while self.peek_char().is_some_and(char::is_whitespace) {
            self.bump();
        }
        let start = self.pos;
        let Some(c) = self.bump() else {
            return (start, Tok::Eof);
        };
        if is_quote(c) {
            loop {
                match self.bump() {
                    None | Some('\n') => {
                        return (start, Tok::Illegal("quoted literal not terminated".into()))
                    }
                    Some('\\') => {
                        if self.bump().is_none() {
                            return (start, Tok::Illegal("quoted literal not terminated".into()));
                        }
                    }
                    Some(q) if q == c => break,
                    Some(_) => {}
                }
            }
            return (start, Tok::Quoted(self.input[start..self.pos].to_string()));
        }
        if c == ',' || c == '.' {
            self.value = false;
            return (start, Tok::Sep(c));
        }
        if matches!(c, '=' | '!' | '~') {
            while self
                .peek_char()
                .is_some_and(|c| matches!(c, '=' | '!' | '~'))
            {
                self.bump();
            }
            self.value = true;
            return (
                start,
                Tok::Operator(self.input[start..self.pos].to_string()),
            );
        }
        if self.value {
            while self
                .peek_char()
                .is_some_and(|c| c != ',' && !c.is_whitespace())
            {
                self.bump();
            }
            self.value = false;
            return (start, Tok::Value(self.input[start..self.pos].to_string()));
        }
        if is_field_char(c) {
            while self.peek_char().is_some_and(is_field_char) {
                self.bump();
            }
            return (start, Tok::Field(self.input[start..self.pos].to_string()));
        }
        (start, Tok::Illegal(format!("unexpected input: {c:?}")))
    }

    fn selectors(&mut self) -> Result<Vec<Selector>, PErr> {
        let mut all = vec![self.selector()?];
        loop {
            match self.peek_char() {
                None => return Ok(all),
                Some(',') => {
                    self.bump();
                    self.value = false;
                    all.push(self.selector()?);
                }
                Some(c) => return Err((self.pos, format!("unexpected input: {c:?}"))),
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, PErr> {
        let path = self.fieldpath()?;
        match self.peek_char() {
            None | Some(',') => {
                return Ok(Selector {
                    path,
                    op: Op::Present,
                })
            }
            _ => {}
        }
        let (pos, tok) = self.scan();
        let op = match tok {
            Tok::Operator(o) if o == "==" || o == "!=" || o == "~=" => o,
            Tok::Operator(o) => return Err((pos, format!("unsupported operator {o:?}"))),
            Tok::Illegal(m) => return Err((pos, m)),
            _ => return Err((pos, "expected an operator (\"==\"|\"!=\"|\"~=\")".into())),
        };
        let (pos, tok) = self.scan();
        let value = match tok {
            Tok::Value(v) | Tok::Field(v) => v,
            Tok::Quoted(q) => {
                if op != "~=" && !q.starts_with('"') {
                    return Err((pos, "invalid quote encountered".into()));
                }
                unquote(&q).map_err(|m| (pos, m))?
            }
            Tok::Illegal(m) => return Err((pos, m)),
            Tok::Eof => return Err((pos, "unexpected end of input: expected a value".into())),
            _ => return Err((pos, "expected value or quoted".into())),
        };
        let op = match op.as_str() {
            "==" => Op::Equal(value),
            "!=" => Op::NotEqual(value),
            _ => Op::Matches(
                Regex::new(&value)
                    .map_err(|e| (pos, format!("bad regular expression {value:?}: {e}")))?,
            ),
        };
        Ok(Selector { path, op })
    }

    fn fieldpath(&mut self) -> Result<Vec<String>, PErr> {
        let mut path = vec![self.field()?];
        while self.peek_char() == Some('.') {
            self.bump();
            path.push(self.field()?);
        }
        Ok(path)
    }

    fn field(&mut self) -> Result<String, PErr> {
        let (pos, tok) = self.scan();
        match tok {
            Tok::Field(f) => Ok(f),
            Tok::Quoted(q) if q.starts_with('"') => unquote(&q).map_err(|m| (pos, m)),
            Tok::Quoted(_) => Err((pos, "invalid quote encountered".into())),
            Tok::Illegal(m) => Err((pos, m)),
            _ => Err((pos, "expected field or quoted".into())),
        }
    }
}

/// Unquotes a `"..."`, `/.../` or `|...|` literal with Go's escapes.
fn unquote(q: &str) -> Result<String, String> {
    let quote = q.chars().next().ok_or("empty quoted literal")?;
    let inner = q
        .strip_prefix(quote)
        .and_then(|s| s.strip_suffix(quote))
        .ok_or_else(|| format!("unterminated quoted literal {q}"))?;
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let e = chars.next().ok_or("trailing backslash")?;
        let hex = |chars: &mut std::str::Chars, n: usize| -> Result<char, String> {
            let s: String = chars.take(n).collect();
            if s.len() != n {
                return Err("short numeric escape".into());
            }
            u32::from_str_radix(&s, 16)
                .ok()
                .and_then(char::from_u32)
                .ok_or_else(|| format!("bad escape \\{e}{s}"))
        };
        match e {
            'a' => out.push('\x07'),
            'b' => out.push('\x08'),
            'f' => out.push('\x0c'),
            'n' => out.push('\n'),
            'r' => out.push('\r'),
            't' => out.push('\t'),
            'v' => out.push('\x0b'),
            '\\' => out.push('\\'),
            'x' => out.push(hex(&mut chars, 2)?),
            'u' => out.push(hex(&mut chars, 4)?),
            'U' => out.push(hex(&mut chars, 8)?),
            '0'..='7' => {
                let rest: String = chars.by_ref().take(2).collect();
                let s = format!("{e}{rest}");
                let v =
                    u32::from_str_radix(&s, 8).map_err(|_| format!("bad octal escape \\{s}"))?;
                out.push(char::from_u32(v).ok_or_else(|| format!("bad octal escape \\{s}"))?);
            }
            c if c == quote || c == '"' || c == '\'' => out.push(c),
            c => return Err(format!("illegal escape sequence \\{c}")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Obj(
        HashMap<&'static str, &'static str>,
        HashMap<&'static str, &'static str>,
    );

    impl Fields for Obj {
        fn field(&self, path: &[String]) -> Option<String> {
            match path.first()?.as_str() {
                "labels" => {
                    if self.1.is_empty() {
                        return None;
                    }
                    self.1
                        .get(path[1..].join(".").as_str())
                        .map(|s| s.to_string())
                }
                f => self.0.get(f).map(|s| s.to_string()),
            }
        }
    }

    fn obj() -> Obj {
        Obj(
            [("name", "a/b"), ("kind", "active"), ("parent", "")].into(),
            [("x", "1"), ("a.b", "dotted"), ("gc", "root")].into(),
        )
    }

    fn m(fs: &[&str]) -> bool {
        Filter::parse_all(fs).unwrap().matches(&obj())
    }

    #[test]
    fn selectors() {
        assert!(m(&[]));
        assert!(m(&[""]));
        assert!(m(&["name==a/b"]));
        assert!(!m(&["name==a"]));
        assert!(m(&["name!=a"]));
        assert!(m(&["kind==active,labels.x==1"]));
        assert!(!m(&["kind==active,labels.x==2"]));
        assert!(m(&["kind==view", "labels.x==1"]), "several filters: OR");
        assert!(m(&["labels.x"]), "presence");
        assert!(!m(&["labels.y"]));
        assert!(m(&["labels.\"a.b\"==dotted"]));
        assert!(m(&["name~=^a/"]));
        assert!(m(&["name~=/^a.b$/"]));
        assert!(!m(&["name~=^b"]));
        assert!(m(&["name==\"a/b\""]));
        assert!(m(&[" kind == active,labels.gc"]));
        assert!(m(&["labels.y!=z"]), "!= on an absent field");
        assert!(
            m(&["parent==\"\",labels.\"gc\"==root"]),
            "quoted value, then a quoted field"
        );
        assert!(m(&["name==\"a/b\",kind==active"]));
    }

    #[test]
    fn errors_are_invalid_argument() {
        for bad in [
            "name=",
            "name==",
            "name=a",
            "name<>a",
            ",",
            "labels.\"x",
            "name~=(",
            "a b",
            "kind==active ,name==x",
        ] {
            match Filter::parse_all(&[bad]) {
                Err(Error::InvalidArgument(msg)) => assert!(msg.contains(bad), "{msg}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
