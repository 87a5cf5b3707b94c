//! Where a field is in a manifest's text: the line and column of each field path
//! (`spec.routes[1].rateLimit.per`) of each YAML document, read from the YAML parser's marks,
//! so that `check` can point at the line as a compiler does.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A position in the text, 1-based.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// The positions of the fields of one document, by path.
#[derive(Debug, Default)]
pub struct Positions(HashMap<String, Position>);

impl Positions {
    /// Where `path` is; for a path the text does not spell out as such (a map key with dots,
    /// a field inside a flow mapping the parser gave no mark for), where its nearest enclosing
    /// field is.
    pub fn find(&self, path: &str) -> Option<Position> {
        let mut p = path;
        loop {
            if let Some(at) = self.0.get(p) {
                return Some(*at);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

/// The positions of every document of `text`, in document order (empty when the text is not
/// YAML: the parser's own error says where).
pub fn positions(text: &str) -> Vec<Positions> {
    let mut walker = Walker::default();
    let mut parser = Parser::new_from_str(text);
    if parser.load(&mut walker, true).is_err() {
        return Vec::new();
    }
    walker.documents
}

enum Frame {
    /// `opened`: whether the mapping's own position was recorded (at its first key, where a
    /// block mapping visibly starts).
    Map {
        key: Option<String>,
        opened: bool,
    },
    Seq {
        index: usize,
    },
}

#[derive(Default)]
struct Walker {
    documents: Vec<Positions>,
    stack: Vec<Frame>,
}

impl Walker {
    /// The path of the value about to come.
    fn path(&self) -> String {
        let mut out = String::new();
        for frame in &self.stack {
            match frame {
                Frame::Map { key: Some(k), .. } => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(k);
                }
                Frame::Map { key: None, .. } => {}
                Frame::Seq { index } => out.push_str(&format!("[{index}]")),
            }
        }
        out
    }

    fn record(&mut self, mark: Marker) {
        let path = self.path();
        if let Some(doc) = self.documents.last_mut() {
            doc.0.entry(path).or_insert(Position { line: mark.line(), column: mark.col() + 1 });
        }
    }

    /// A value (scalar or whole container) ended: its parent moves on.
    fn value_done(&mut self) {
        match self.stack.last_mut() {
            Some(Frame::Map { key, .. }) => *key = None,
            Some(Frame::Seq { index }) => *index += 1,
            None => {}
        }
    }
}

impl MarkedEventReceiver for Walker {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::DocumentStart => {
                self.documents.push(Positions::default());
                self.stack.clear();
            }
            Event::Scalar(value, ..) => {
                if let Some(Frame::Map { key: None, opened }) = self.stack.last_mut() {
                    let first = !std::mem::replace(opened, true);
                    if first {
                        // The mapping's own position: its first key.
                        self.record(mark);
                    }
                    // A key: the field's position is its key's.
                    if let Some(Frame::Map { key, .. }) = self.stack.last_mut() {
                        *key = Some(value.to_string());
                    }
                    self.record(mark);
                } else {
                    self.record(mark);
                    self.value_done();
                }
            }
            Event::MappingStart(..) => {
                self.stack.push(Frame::Map { key: None, opened: false });
            }
            Event::SequenceStart(..) => {
                self.record(mark);
                self.stack.push(Frame::Seq { index: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.value_done();
            }
            Event::Alias(_) => {
                self.record(mark);
                self.value_done();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_found_in_block_and_flow_style() {
        let text = "\
apiVersion: apipolicy.dev/v1alpha1
kind: ApiPolicy
metadata: {name: a}
spec:
  routes:
  - name: list
    match: {path: {prefix: /api}}
    rateLimit:
      per: soon
---
kind: Other
spec:
  x: [1, {y: 2}]
";
        let docs = positions(text);
        assert_eq!(docs.len(), 2);
        let at = |d: usize, p: &str| docs[d].find(p).map(|p| (p.line, p.column));
        assert_eq!(at(0, "kind"), Some((2, 1)));
        assert_eq!(at(0, "metadata.name"), Some((3, 12)));
        assert_eq!(at(0, "spec.routes[0].name"), Some((6, 5)));
        assert_eq!(at(0, "spec.routes[0].match.path.prefix"), Some((7, 20)));
        assert_eq!(at(0, "spec.routes[0].rateLimit.per"), Some((9, 7)));
        // Not in the text: the nearest enclosing field.
        assert_eq!(at(0, "spec.routes[0].rateLimit.burst"), Some((8, 5)));
        assert_eq!(at(0, "spec.routes[0].requestHeaders.set[\"x-a\"]"), Some((6, 5)));
        assert_eq!(at(1, "spec.x[1].y"), Some((13, 11)));
        assert_eq!(positions("a: [").len(), 0);
    }
}
