use std::path::{Path, PathBuf};

/// A configuration that cannot be used, with where the problem is.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A value is malformed, unknown or out of range.
    #[error("{}{}:{}: {}{}", file.as_ref().map(|f| format!("{}:", f.display())).unwrap_or_default(), line, column, key.as_ref().map(|k| format!("`{k}`: ")).unwrap_or_default(), message)]
    Invalid {
        /// The file, when the text came from one.
        file: Option<PathBuf>,
        /// The key path (`server.max_frame_size`), when known.
        key: Option<String>,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// An environment variable that sets part of the config is malformed.
    #[error("environment variable {variable}: {message}")]
    Environment {
        /// The variable (`RUST_LOG`, `SLUICE_ADMIN`).
        variable: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    pub(super) fn from_toml(text: &str, key: Option<String>, err: &toml::de::Error) -> Self {
        let (line, column) = err
            .span()
            .map(|span| line_column(text, span.start))
            .unwrap_or((1, 1));
        // toml's own message repeats the source excerpt; keep its first
        // line, which says what is wrong.
        let message = err
            .message()
            .lines()
            .next()
            .unwrap_or("invalid value")
            .to_owned();
        let key = key.filter(|k| !k.is_empty() && k != ".");
        Self::Invalid {
            file: None,
            key,
            line,
            column,
            message,
        }
    }

    pub(super) fn at(text: &str, offset: usize, key: String, message: String) -> Self {
        let (line, column) = line_column(text, offset);
        Self::Invalid {
            file: None,
            key: Some(key),
            line,
            column,
            message,
        }
    }

    /// An error about the value at `key` (`upstream.max_connections`,
    /// `routes[2].refuse`), reported where the file writes it: at the
    /// deepest part of the path the text has (the table or array entry of
    /// a value that was left out and defaulted).
    pub(super) fn at_key(text: &str, key: String, message: String) -> Self {
        let offset = value_offset(text, &key).unwrap_or(0);
        Self::at(text, offset, key, message)
    }

    pub(super) fn in_file(self, path: &Path) -> Self {
        match self {
            Self::Invalid {
                key,
                line,
                column,
                message,
                ..
            } => Self::Invalid {
                file: Some(path.to_owned()),
                key,
                line,
                column,
                message,
            },
            other @ (Self::Read { .. } | Self::Environment { .. }) => other,
        }
    }

    /// The key path of the bad value, when the error is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Invalid { key, .. } => key.as_deref(),
            Self::Environment { variable, .. } => Some(variable),
            Self::Read { .. } => None,
        }
    }

    /// The 1-based line and column of the bad value.
    pub fn position(&self) -> Option<(usize, usize)> {
        match self {
            Self::Invalid { line, column, .. } => Some((*line, *column)),
            Self::Read { .. } | Self::Environment { .. } => None,
        }
    }
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, column)
}

/// Where the deepest part of the dotted `path` that `text` writes begins.
fn value_offset(text: &str, path: &str) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let root = DeTable::parse(text).ok()?;
    let mut table = root.get_ref();
    let mut offset = None;
    for segment in path.split('.') {
        let (name, index) = match segment.split_once('[') {
            Some((name, rest)) => (name, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (segment, None),
        };
        let Some((_, mut value)) = table.iter().find(|(k, _)| k.get_ref() == name) else {
            break;
        };
        if let Some(i) = index {
            match value.get_ref() {
                DeValue::Array(items) => match items.get(i) {
                    Some(item) => value = item,
                    None => break,
                },
                _ => break,
            }
        }
        offset = Some(value.span().start);
        match value.get_ref() {
            DeValue::Table(t) => table = t,
            _ => break,
        }
    }
    offset
}
