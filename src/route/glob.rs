//! Method patterns: `*` matches any run of characters.

/// A `*` pattern: literal pieces that must appear in order, the first at
/// the start and the last at the end.
#[derive(Debug)]
pub(super) struct Glob {
    pieces: Vec<String>,
}

/// What the index can do with a pattern.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Shape<'a> {
    /// No `*`: one method exactly.
    Exact(&'a str),
    /// `/package.Service/*`: every method of one service (the argument
    /// keeps its trailing `/`).
    Service(&'a str),
    /// Anything else: tried for every call.
    Other,
}

impl Glob {
    pub(super) fn new(pattern: &str) -> Self {
        Self {
            pieces: pattern.split('*').map(str::to_owned).collect(),
        }
    }

    pub(super) fn matches(&self, text: &str) -> bool {
        let [first, middle @ .., last] = self.pieces.as_slice() else {
            // One piece: no `*`, an exact match.
            return self.pieces.first().is_some_and(|p| p == text);
        };
        let Some(mut rest) = text.strip_prefix(first.as_str()) else {
            return false;
        };
        for piece in middle {
            match rest.find(piece.as_str()) {
                Some(at) => rest = &rest[at + piece.len()..],
                None => return false,
            }
        }
        rest.len() >= last.len() && rest.ends_with(last.as_str())
    }

    pub(super) fn shape(&self) -> Shape<'_> {
        match self.pieces.as_slice() {
            [exact] => Shape::Exact(exact),
            [service, rest] if rest.is_empty() && service_of(service) == Some(service) => {
                Shape::Service(service)
            }
            _ => Shape::Other,
        }
    }
}

/// The `/package.Service/` part of a gRPC path (`/pkg.Svc/Get`), with
/// both slashes; `None` for a path not of that form.
pub(super) fn service_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix('/')?;
    let slash = rest.find('/')?;
    (slash > 0).then(|| &path[..slash + 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_shell_stars() {
        let g = |p: &str, t: &str| Glob::new(p).matches(t);
        assert!(g("/pkg.Svc/Get", "/pkg.Svc/Get"));
        assert!(!g("/pkg.Svc/Get", "/pkg.Svc/GetAll"));
        assert!(g("/pkg.Svc/*", "/pkg.Svc/Get"));
        assert!(!g("/pkg.Svc/*", "/pkg.Other/Get"));
        assert!(g("/pkg.*", "/pkg.Svc/Get"));
        assert!(g("*", "/anything"));
        assert!(g("/*/Get", "/a.B/Get"));
        assert!(!g("/*/Get", "/a.B/Put"));
        assert!(g("/a*b*c", "/axxbyyc"));
        assert!(!g("/a*b*c", "/axxcyyb"));
        assert!(!g("/ab*ba", "/aba"), "pieces may not overlap");
    }

    #[test]
    fn shapes_are_what_an_index_can_use() {
        assert_eq!(Glob::new("/p.S/Get").shape(), Shape::Exact("/p.S/Get"));
        assert_eq!(Glob::new("/p.S/*").shape(), Shape::Service("/p.S/"));
        assert_eq!(Glob::new("/p.*").shape(), Shape::Other);
        assert_eq!(Glob::new("/p.S/G*").shape(), Shape::Other);
        assert_eq!(Glob::new("/p.S/x/*").shape(), Shape::Other);
        assert_eq!(Glob::new("//*").shape(), Shape::Other);
        assert_eq!(service_of("/p.S/Get"), Some("/p.S/"));
        assert_eq!(service_of("/p.S"), None);
        assert_eq!(service_of("//Get"), None);
    }
}
