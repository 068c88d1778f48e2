//! The routes a call could match, found without trying every route.
//!
//! Each route is filed under one condition that every call it matches
//! must meet: its exact method, its service (`/pkg.Svc/*`), or an exact
//! metadata value; routes with none of these are tried for every call. A
//! call looks up its path, its service and its values of the indexed keys,
//! and walks the union of the lists found in route order, so the first
//! route that matches is the one a scan of every route would find.

use std::collections::HashMap;

use http::{HeaderName, request::Parts};

use super::{
    compile::Compiled,
    glob::{Shape, service_of},
};
use crate::config::TextMatch;

/// At most this many metadata keys are indexed (those most routes test
/// with `equals`); a call looks each one up. RouteTable keyed otherwise are
/// tried for every call.
const MAX_INDEXED_KEYS: usize = 4;

/// The lists a call's candidates are merged from: exact method, service,
/// one per indexed key, and the routes tried for every call.
const LISTS: usize = 3 + MAX_INDEXED_KEYS;

#[derive(Debug, Default)]
pub(super) struct Index {
    exact: HashMap<Box<str>, Box<[u32]>>,
    services: HashMap<Box<str>, Box<[u32]>>,
    metadata: Vec<(HeaderName, HashMap<Box<[u8]>, Box<[u32]>>)>,
    always: Box<[u32]>,
}

/// The indexes of the routes a call could match, in ascending order.
pub(super) struct Candidates<'a> {
    /// The lists with routes left, in `lists[..n]`.
    lists: [&'a [u32]; LISTS],
    n: usize,
}

impl Index {
    pub(super) fn build(routes: &[Compiled]) -> Self {
        // The keys most routes without an indexable method test for equality.
        let mut counts: HashMap<&HeaderName, usize> = HashMap::new();
        for r in routes.iter().filter(|r| method_key(r).is_none()) {
            for (key, _) in equals(r) {
                *counts.entry(key).or_default() += 1;
            }
        }
        let mut keys: Vec<(&HeaderName, usize)> = counts.into_iter().collect();
        keys.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.as_str().cmp(b.0.as_str())));
        keys.truncate(MAX_INDEXED_KEYS);

        let mut exact: HashMap<Box<str>, Vec<u32>> = HashMap::new();
        let mut services: HashMap<Box<str>, Vec<u32>> = HashMap::new();
        let mut metadata: Vec<(HeaderName, HashMap<Box<[u8]>, Vec<u32>>)> = keys
            .iter()
            .map(|(k, _)| ((*k).clone(), HashMap::new()))
            .collect();
        let mut always = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            let i = u32::try_from(i).expect("fewer than 2^32 routes");
            match method_key(r) {
                Some(Shape::Exact(m)) => exact.entry(m.into()).or_default().push(i),
                Some(Shape::Service(s)) => services.entry(s.into()).or_default().push(i),
                _ => {
                    let filed = metadata.iter_mut().find_map(|(key, map)| {
                        let value = equals(r).find(|(k, _)| *k == key).map(|(_, v)| v)?;
                        map.entry(value.as_bytes().into()).or_default().push(i);
                        Some(())
                    });
                    if filed.is_none() {
                        always.push(i);
                    }
                }
            }
        }
        let done = |m: HashMap<Box<str>, Vec<u32>>| -> HashMap<Box<str>, Box<[u32]>> {
            m.into_iter().map(|(k, v)| (k, v.into())).collect()
        };
        Self {
            exact: done(exact),
            services: done(services),
            metadata: metadata
                .into_iter()
                .map(|(k, m)| (k, m.into_iter().map(|(v, l)| (v, l.into())).collect()))
                .collect(),
            always: always.into(),
        }
    }

    pub(super) fn candidates(&self, parts: &Parts) -> Candidates<'_> {
        let mut lists: [&[u32]; LISTS] = [&[]; LISTS];
        let path = parts.uri.path();
        if !self.exact.is_empty() {
            lists[0] = self.exact.get(path).map_or(&[], |l| l);
        }
        if !self.services.is_empty()
            && let Some(service) = service_of(path)
        {
            lists[1] = self.services.get(service).map_or(&[], |l| l);
        }
        lists[2] = &self.always;
        for (slot, (key, map)) in lists[3..].iter_mut().zip(&self.metadata) {
            if let Some(value) = parts.headers.get(key) {
                *slot = map.get(value.as_bytes()).map_or(&[], |l| l);
            }
        }
        let mut n = 0;
        for i in 0..LISTS {
            if !lists[i].is_empty() {
                lists.swap(n, i);
                n += 1;
            }
        }
        Candidates { lists, n }
    }
}

/// The route's method, when the index can file it by it.
fn method_key(r: &Compiled) -> Option<Shape<'_>> {
    r.method
        .as_ref()
        .map(super::glob::Glob::shape)
        .filter(|s| *s != Shape::Other)
}

fn equals(r: &Compiled) -> impl Iterator<Item = (&HeaderName, &String)> {
    r.metadata.iter().filter_map(|(k, m)| match m {
        TextMatch::Equals(v) => Some((k, v)),
        _ => None,
    })
}

impl Iterator for Candidates<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let lists = &mut self.lists[..self.n];
        // Usually one list has routes for the call: no merge.
        let i = match lists {
            [] => return None,
            [_] => 0,
            _ => {
                let mut best = 0;
                for (i, list) in lists.iter().enumerate().skip(1) {
                    if list[0] < lists[best][0] {
                        best = i;
                    }
                }
                best
            }
        };
        let (&head, rest) = lists[i].split_first()?;
        lists[i] = rest;
        if rest.is_empty() {
            // Keep the lists in use at the front.
            lists.swap(i, self.n - 1);
            self.n -= 1;
        }
        Some(head as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Config, route::compile::compile};

    /// The first route the index finds is the first a scan of every route
    /// finds, over routes of every shape and calls that hit and miss each.
    #[test]
    fn the_index_finds_the_route_a_scan_finds() {
        let mut text = String::new();
        let methods = [
            None,
            Some("/a.S/Get"),
            Some("/a.S/*"),
            Some("/a.*"),
            Some("/b.T/Put"),
            Some("/b.T/*"),
            Some("*"),
        ];
        let metadata = [
            "",
            "metadata = { x-tenant = { equals = \"t1\" } }",
            "metadata = { x-tenant = { equals = \"t2\" }, x-env = { equals = \"prod\" } }",
            "metadata = { x-env = { prefix = \"pr\" } }",
            "metadata = { x-env = { equals = \"dev\" } }",
            "metadata = { x-tenant = { present = false } }",
        ];
        for (i, m) in methods.iter().enumerate() {
            for (j, md) in metadata.iter().enumerate() {
                text.push_str("[[routes]]\n");
                if let Some(m) = m {
                    text.push_str(&format!("method = \"{m}\"\n"));
                }
                text.push_str(&format!(
                    "{md}\nrefuse = {{ code = \"INTERNAL\", message = \"{i}.{j}\" }}\n"
                ));
            }
        }
        let config = Config::from_toml_str(&text).expect("config");
        let routes: Vec<Compiled> = config.routes.iter().enumerate().map(compile).collect();
        let index = Index::build(&routes);
        let paths = [
            "/a.S/Get",
            "/a.S/List",
            "/a.X/Get",
            "/b.T/Put",
            "/b.T/Get",
            "/c.U/Get",
        ];
        let heads: [&[(&str, &str)]; 6] = [
            &[],
            &[("x-tenant", "t1")],
            &[("x-tenant", "t2"), ("x-env", "prod")],
            &[("x-tenant", "t2"), ("x-env", "dev")],
            &[("x-env", "preview")],
            &[("x-tenant", "t3")],
        ];
        let mut found = 0;
        for path in paths {
            for head in heads {
                let mut req = http::Request::post(format!("http://x{path}"));
                for (k, v) in head {
                    req = req.header(*k, *v);
                }
                let (parts, ()) = req.body(()).expect("request").into_parts();
                let scan = routes.iter().position(|r| r.matches(&parts, &[]));
                let indexed = index
                    .candidates(&parts)
                    .find(|&i| routes[i].matches(&parts, &[]));
                assert_eq!(indexed, scan, "{path} {head:?}");
                found += usize::from(scan.is_some());
                // Candidates come in route order, each once.
                let all: Vec<usize> = index.candidates(&parts).collect();
                assert!(all.windows(2).all(|w| w[0] < w[1]), "{all:?}");
            }
        }
        assert!(found > 20, "the calls must hit routes: {found}");
    }
}
