//! All YAML handling lives here, so the YAML library can be swapped in one place: parsing into
//! the raw config structs, and locating a key path (`routes[2].upstream`) in the source text so
//! that errors found after parsing can still name their line.

use std::path::Path;

use serde::de::DeserializeOwned;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

use super::ConfigError;

/// Parses YAML (or JSON, which is YAML) into `T`, naming file, line and key on failure.
pub(crate) fn parse<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    serde_yaml::from_str(text).map_err(|err| {
        let location = err.location();
        // serde_yaml renders "path.to.key: message at line L column C"; split it so the
        // message reads the same way as ours.
        let rendered = err.to_string();
        let without_position = match rendered.rfind(" at line ") {
            Some(at) => rendered[..at].to_owned(),
            None => rendered,
        };
        let (key, message) = match without_position.split_once(": ") {
            Some((key, msg)) if looks_like_key_path(key) => (Some(key.to_owned()), msg.to_owned()),
            _ => (None, without_position),
        };
        ConfigError {
            file: file.to_owned(),
            line: location.as_ref().map(|l| l.line()),
            column: location.as_ref().map(|l| l.column()),
            key,
            message,
        }
    })
}

fn looks_like_key_path(s: &str) -> bool {
    !s.is_empty()
        && !s.contains(' ')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-[]$".contains(&b))
}

/// Where a key path such as `routes[2].upstream` appears in the text: 1-based line and column.
pub(crate) fn locate(text: &str, key_path: &str) -> Option<(usize, usize)> {
    let mut locator = Locator {
        wanted: key_path,
        stack: Vec::new(),
        found: None,
    };
    let mut parser = Parser::new_from_str(text);
    parser.load(&mut locator, false).ok()?;
    locator.found
}

enum Frame {
    Mapping {
        key: Option<String>,
        awaiting_key: bool,
    },
    Sequence {
        index: usize,
    },
}

struct Locator<'a> {
    wanted: &'a str,
    stack: Vec<Frame>,
    found: Option<(usize, usize)>,
}

impl Locator<'_> {
    fn path(&self, extra_key: Option<&str>) -> String {
        let mut path = String::new();
        for frame in &self.stack {
            match frame {
                Frame::Mapping {
                    key: Some(k),
                    awaiting_key: false,
                } => {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(k);
                }
                Frame::Sequence { index } => path.push_str(&format!("[{}]", index)),
                Frame::Mapping { .. } => {}
            }
        }
        if let Some(k) = extra_key {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(k);
        }
        path
    }

    fn record(&mut self, path: String, mark: Marker) {
        if self.found.is_none() && path == self.wanted {
            self.found = Some((mark.line(), mark.col() + 1));
        }
    }

    /// Called when a value (scalar or container) starts at `mark`.
    fn value_started(&mut self, mark: Marker) {
        if let Some(Frame::Sequence { .. }) = self.stack.last() {
            let path = self.path(None);
            self.record(path, mark);
        }
    }

    /// Called when a value has ended, to advance the enclosing container.
    fn value_ended(&mut self) {
        match self.stack.last_mut() {
            Some(Frame::Mapping { awaiting_key, key }) => {
                *awaiting_key = true;
                *key = None;
            }
            Some(Frame::Sequence { index }) => *index += 1,
            None => {}
        }
    }
}

impl MarkedEventReceiver for Locator<'_> {
    fn on_event(&mut self, event: Event, mark: Marker) {
        match event {
            Event::Scalar(value, ..) => {
                if let Some(Frame::Mapping {
                    awaiting_key: true, ..
                }) = self.stack.last()
                {
                    let path = self.path(Some(&value));
                    self.record(path, mark);
                    if let Some(Frame::Mapping { key, awaiting_key }) = self.stack.last_mut() {
                        *key = Some(value);
                        *awaiting_key = false;
                    }
                } else {
                    self.value_started(mark);
                    self.value_ended();
                }
            }
            Event::MappingStart(..) => {
                self.value_started(mark);
                self.stack.push(Frame::Mapping {
                    key: None,
                    awaiting_key: true,
                });
            }
            Event::SequenceStart(..) => {
                self.value_started(mark);
                self.stack.push(Frame::Sequence { index: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.value_ended();
            }
            Event::Alias(_) => {
                self.value_started(mark);
                self.value_ended();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "server:\n  listen: \"127.0.0.1:1\"\nroutes:\n  - { methods: [GET], path: /a, upstream: x }\n  - methods: [GET]\n    path: /b\n    upstream: y\n";

    #[test]
    fn locates_block_and_flow_keys() {
        assert_eq!(locate(TEXT, "server.listen"), Some((2, 3)));
        assert_eq!(locate(TEXT, "routes[0].upstream").map(|l| l.0), Some(4));
        assert_eq!(locate(TEXT, "routes[1].upstream"), Some((7, 5)));
        assert_eq!(locate(TEXT, "routes[1]").map(|l| l.0), Some(5));
        assert_eq!(locate(TEXT, "routes[2]"), None);
    }

    #[test]
    fn locates_in_json() {
        let json = "{\n  \"routes\": [\n    {\"path\": \"/a\"},\n    {\"path\": \"/b\"}\n  ]\n}";
        assert_eq!(locate(json, "routes[1].path").map(|l| l.0), Some(4));
    }
}
