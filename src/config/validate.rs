//! Rules across keys, checked after a file parsed: every route names a
//! group that exists and does one thing, metadata keys and values are
//! valid, the upstream windows fit each other, the log filter parses.
//! Each error carries the key and its line and column.

use super::{Config, ConfigError, EnrichConfig, RouteConfig, UpstreamConfig, value::MAX_WINDOW};

impl Config {
    /// Checks what one value alone cannot: every route names a group that
    /// exists, and does exactly one thing.
    pub(super) fn validate(&self, text: &str) -> Result<(), ConfigError> {
        let group_exists = |group: &toml::Spanned<String>, key: String| {
            let name = group.get_ref();
            if self.group_defined(name) {
                return Ok(());
            }
            Err(ConfigError::at(
                text,
                group.span().start,
                key,
                format!("no upstream group named {name:?} (define [upstreams.{name}])"),
            ))
        };
        let header_name = |name: &str, key: String| {
            http::HeaderName::try_from(name.to_ascii_lowercase())
                .map(drop)
                .map_err(|_| {
                    ConfigError::at_key(
                        text,
                        key,
                        format!(
                            "{name:?} is not a valid metadata key (a lowercase HTTP header name)"
                        ),
                    )
                })
        };
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(ConfigError::at_key(
                text,
                "log.level".to_owned(),
                format!(
                    "{:?} is not a log filter ({e}); use a level (info, debug…) or \
                     directives like \"sluice=debug,h2=info\"",
                    self.log.level
                ),
            ));
        }
        for (i, route) in self.routes.iter().enumerate() {
            let key = format!("routes[{i}]");
            let actions = [
                route.upstream.is_some(),
                route.refuse.is_some(),
                route.fanout.is_some(),
                route.mirror.is_some(),
            ];
            if actions.iter().filter(|a| **a).count() != 1 {
                return Err(ConfigError::at_key(
                    text,
                    key,
                    "a route needs exactly one of `upstream`, `refuse`, `fanout` or `mirror`"
                        .to_owned(),
                ));
            }
            if let Some(group) = &route.upstream {
                group_exists(group, format!("{key}.upstream"))?;
            }
            if let Some(f) = &route.field {
                let conditions = [
                    f.equals.is_some(),
                    f.prefix.is_some(),
                    f.int.is_some(),
                    f.present.is_some(),
                ];
                if conditions.iter().filter(|c| **c).count() > 1 {
                    return Err(ConfigError::at_key(
                        text,
                        format!("{key}.field"),
                        "a field condition takes one of `equals`, `prefix`, `int` or `present`"
                            .to_owned(),
                    ));
                }
            }
            if let Some(f) = &route.fanout {
                group_exists(&f.group, format!("{key}.fanout.group"))?;
                if let Some(k) = &f.key {
                    header_name(k, format!("{key}.fanout.key"))?;
                }
            }
            if let Some(m) = &route.mirror {
                group_exists(&m.primary, format!("{key}.mirror.primary"))?;
                for (j, s) in m.secondaries.iter().enumerate() {
                    let name = s.upstream();
                    if !self.group_defined(name) {
                        return Err(ConfigError::at_key(
                            text,
                            format!("{key}.mirror.secondaries[{j}]"),
                            format!("no upstream group named {name:?} (define [upstreams.{name}])"),
                        ));
                    }
                }
            }
            for name in route.metadata.keys() {
                header_name(name, format!("{key}.metadata.{name}"))?;
            }
            self.check_policy(text, route, &key)?;
            if let Some(e) = &route.enrich {
                if !e.strip.is_empty()
                    || !e.strip_prefixes.is_empty()
                    || e.forwarded
                    || e.x_forwarded_for
                    || e.request_id
                    || e.client_id.is_some()
                {
                    return Err(ConfigError::at_key(
                        text,
                        format!("{key}.enrich"),
                        "a route's enrich takes only remove, set and append (strip, forwarded, x_forwarded_for and request_id and client_id are [enrich] settings)".to_owned(),
                    ));
                }
                self.check_edits(text, e, &format!("{key}.enrich"))?;
            }
        }
        self.check_edits(text, &self.enrich, "enrich")?;
        self.check_tls(text)?;
        self.check_tunnel(text)?;
        if self.fanout.metadata_field == 0 || self.fanout.metadata_field >= 1 << 29 {
            return Err(ConfigError::at_key(
                text,
                "fanout.metadata_field".to_owned(),
                "a protobuf field number is 1 to 536870911".to_owned(),
            ));
        }
        for (name, group) in &self.upstreams {
            header_name(
                &group.dest_host_key,
                format!("upstreams.{name}.dest_host_key"),
            )?;
            let agents_join = self.tunnel.hub.as_ref().is_some_and(|h| h.group == *name);
            if let Some(od) = &group.outlier_detection
                && od.max_ejection_time < od.base_ejection_time
            {
                return Err(ConfigError::at_key(
                    text,
                    format!("upstreams.{name}.outlier_detection.max_ejection_time"),
                    "must be at least base_ejection_time".to_owned(),
                ));
            }
            if let Some(t) = &group.retry_throttling
                && !(1..=1000).contains(&t.max_tokens)
            {
                return Err(ConfigError::at_key(
                    text,
                    format!("upstreams.{name}.retry_throttling.max_tokens"),
                    format!("must be 1 to 1000, got {}", t.max_tokens),
                ));
            }
            if group.endpoints.is_empty() && !agents_join {
                return Err(ConfigError::at_key(
                    text,
                    format!("upstreams.{name}.endpoints"),
                    "a group needs at least one endpoint".to_owned(),
                ));
            }
        }
        self.upstream.validate(text)
    }

    /// A route's per-call policies: on a route that forwards to one group,
    /// retry or hedge but not both, a fault that does something, a
    /// rate-limit key that is a metadata key or `identity`.
    fn check_policy(&self, text: &str, route: &RouteConfig, key: &str) -> Result<(), ConfigError> {
        if !route.has_policy() {
            return Ok(());
        }
        let error = |at: &str, message: &str| {
            Err(ConfigError::at_key(
                text,
                format!("{key}{at}"),
                message.to_owned(),
            ))
        };
        if route.upstream.is_none() {
            return error(
                "",
                "retry, hedge, fault, rate_limit, max_in_flight and max_stream_age apply to a \
                 route with `upstream` (a fan-out's or mirror's destinations are not retried)",
            );
        }
        if route.retry.is_some() && route.hedge.is_some() {
            return error(".hedge", "a route takes `retry` or `hedge`, not both");
        }
        if let Some(r) = &route.retry
            && r.max_backoff < r.initial_backoff
        {
            return error(".retry.max_backoff", "must be at least initial_backoff");
        }
        if let Some(f) = &route.fault
            && f.delay.is_none()
            && f.abort_code.is_none()
            && !f.headers
        {
            return error(
                ".fault",
                "a fault needs `delay`, `abort_code` or `headers = true`",
            );
        }
        if let Some(f) = &route.fault
            && f.abort_code == Some(sluice_layers::grpc::status::Code::Ok)
        {
            return error(".fault.abort_code", "an abort needs a code other than OK");
        }
        if let Some(per) = route.rate_limit.as_ref().and_then(|r| r.per.as_deref())
            && per != "identity"
            && http::HeaderName::try_from(per.to_ascii_lowercase()).is_err()
        {
            return error(
                ".rate_limit.per",
                "must be a metadata key (a lowercase HTTP header name) or \"identity\"",
            );
        }
        Ok(())
    }

    /// Every key and value of an `[enrich]` table (`at` is its key) is a
    /// valid header name and value.
    fn check_edits(&self, text: &str, e: &EnrichConfig, at: &str) -> Result<(), ConfigError> {
        let bad_name = |k: &str, key: String| {
            ConfigError::at_key(
                text,
                key,
                format!("{k:?} is not a valid metadata key (a lowercase HTTP header name)"),
            )
        };
        for (what, keys) in [("strip", &e.strip), ("remove", &e.remove)] {
            for (i, k) in keys.iter().enumerate() {
                if http::HeaderName::try_from(k.to_ascii_lowercase()).is_err() {
                    return Err(bad_name(k, format!("{at}.{what}[{i}]")));
                }
            }
        }
        for (what, map) in [("set", &e.set), ("append", &e.append)] {
            for (k, v) in map {
                if http::HeaderName::try_from(k.to_ascii_lowercase()).is_err() {
                    return Err(bad_name(k, format!("{at}.{what}.{k}")));
                }
                if http::HeaderValue::try_from(v.as_str()).is_err() {
                    return Err(ConfigError::at_key(
                        text,
                        format!("{at}.{what}.{k}"),
                        format!("{v:?} is not a valid metadata value"),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl UpstreamConfig {
    /// Checks the windows: a full connection's stream windows must fit its
    /// connection window, or stalled readers could block the connection.
    pub(super) fn validate(&self, text: &str) -> Result<(), ConfigError> {
        let isolating = self.isolating_connection_window();
        match self.initial_connection_window {
            None if isolating > MAX_WINDOW => Err(ConfigError::at_key(
                text,
                "upstream.initial_stream_window".to_owned(),
                format!(
                    "max_streams_per_connection × initial_stream_window is {isolating}, above the \
                     largest HTTP/2 window ({MAX_WINDOW}); lower either"
                ),
            )),
            Some(w) if u64::from(w.0) < isolating => Err(ConfigError::at_key(
                text,
                "upstream.initial_connection_window".to_owned(),
                format!(
                    "{} is below max_streams_per_connection × initial_stream_window ({isolating}): \
                     calls whose clients stop reading could hold the whole connection window",
                    w.0
                ),
            )),
            _ => Ok(()),
        }
    }
}
