//! Who may send events, and from which web pages: write keys per source, allowed origins, CORS.
//!
//! A browser tracker's write key is public (it is in every page's HTML), so it names a source
//! rather than proving anything, and it grants ingest only. What a lifted key is good for is limited
//! by its source's `allowed_origins`: browsers send `Origin` with every cross-origin POST and pages
//! cannot forge it, so another site cannot make its visitors' browsers send events with the key.
//! (A non-browser client can send any header; keys are not secrets and this is not authentication.)
//!
//! Keys arrive as Segment's do: HTTP Basic auth with the key as the user name, or `writeKey` in the
//! JSON body. The body form exists because `navigator.sendBeacon` cannot set headers, and because
//! the tracker sends `text/plain` bodies without custom headers so that its requests are CORS
//! "simple requests" that need no preflight round trip.
//!
//! Without a key, ingest is accepted only while `ingest.require_write_key` is false (the default,
//! so that curl and server-side integrations work out of the box); a key that is given is always
//! checked: unknown is 401 `invalid_write_key`, a foreign origin is 403 `origin_not_allowed`.
//!
//! CORS ([`cors`]): the ingest routes answer preflights and echo `Access-Control-Allow-Origin` for
//! origins that some source allows (the handler then checks the origin against the request's own
//! key); the read routes the widget uses (`GET /v1/recommendations`, `GET /v1/items`) are open to
//! the same origins. Same-origin requests (the demo shop, a site serving Kairos under its own
//! domain) are always allowed. `Retry-After` is exposed so the tracker can honour it cross-origin.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ALLOW, AUTHORIZATION, HOST, ORIGIN,
    VARY,
};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use kairos_types::Code;

use crate::config::IngestConfig;
use crate::error::HttpError;
use crate::AppState;

/// An entry of `allowed_origins`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OriginPattern {
    /// `*`: any origin.
    Any,
    /// `https://shop.example`: exactly this origin.
    Exact(String),
    /// `http://localhost:*`: this scheme and host with any port, or none.
    AnyPort(String),
    /// `https://*.example.com`: this scheme and any subdomain (not the domain itself).
    Subdomains { scheme: String, suffix: String },
}

impl OriginPattern {
    /// Parses a pattern; origins are `scheme://host[:port]`, without path or trailing slash.
    pub fn parse(pattern: &str) -> Result<OriginPattern, String> {
        let p = pattern.trim().to_ascii_lowercase();
        if p == "*" {
            return Ok(OriginPattern::Any);
        }
        let bad = |why: &str| Err(format!("allowed origin {pattern:?}: {why}"));
        let Some((scheme, rest)) = p.split_once("://") else {
            return bad("expected scheme://host[:port], e.g. https://shop.example");
        };
        if scheme != "http" && scheme != "https" {
            return bad("the scheme must be http or https");
        }
        if rest.is_empty() || rest.contains('/') {
            return bad("an origin has no path (not even a trailing slash)");
        }
        if let Some(host) = rest.strip_suffix(":*") {
            if host.contains('*') {
                return bad("use either a wildcard subdomain or a wildcard port");
            }
            return Ok(OriginPattern::AnyPort(format!("{scheme}://{host}")));
        }
        if let Some(suffix) = rest.strip_prefix('*') {
            if !suffix.starts_with('.') || suffix.contains('*') {
                return bad("a wildcard subdomain is written https://*.example.com");
            }
            return Ok(OriginPattern::Subdomains {
                scheme: scheme.to_owned(),
                suffix: suffix.to_owned(),
            });
        }
        if rest.contains('*') {
            return bad("`*` is allowed only as the whole pattern, a subdomain or a port");
        }
        Ok(OriginPattern::Exact(p))
    }

    /// Whether `origin` (lowercase, as browsers send it) matches.
    pub fn matches(&self, origin: &str) -> bool {
        match self {
            OriginPattern::Any => true,
            OriginPattern::Exact(o) => o == origin,
            OriginPattern::AnyPort(base) => {
                origin.strip_prefix(base.as_str()).is_some_and(|rest| {
                    rest.is_empty()
                        || rest.strip_prefix(':').is_some_and(|port| {
                            !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())
                        })
                })
            }
            OriginPattern::Subdomains { scheme, suffix } => origin
                .strip_prefix(scheme.as_str())
                .and_then(|r| r.strip_prefix("://"))
                .and_then(|host| host.strip_suffix(suffix.as_str()))
                .is_some_and(|sub| !sub.is_empty() && !sub.contains(['/', ':'])),
        }
    }
}

struct Source {
    write_key: String,
    origins: Vec<OriginPattern>,
}

impl Source {
    fn allows(&self, origin: &str) -> bool {
        self.origins.iter().any(|p| p.matches(origin))
    }
}

/// The sources of `[[ingest.sources]]`, ready for checking requests.
pub struct Access {
    require_key: bool,
    sources: Vec<Source>,
}

impl Access {
    /// Builds the checker; invalid origin patterns (rejected by [`IngestConfig::validate`] when
    /// the configuration is loaded) are skipped.
    pub fn new(config: &IngestConfig) -> Access {
        Access {
            require_key: config.require_write_key,
            sources: config
                .sources
                .iter()
                .map(|s| Source {
                    write_key: s.write_key.clone(),
                    origins: s
                        .allowed_origins
                        .iter()
                        .filter_map(|o| OriginPattern::parse(o).ok())
                        .collect(),
                })
                .collect(),
        }
    }

    /// Checks an ingest request's write key (header, else `body_key`) and its origin.
    pub fn authorize(&self, headers: &HeaderMap, body_key: Option<&str>) -> Result<(), HttpError> {
        let key = match header_key(headers)? {
            Some(k) => Some(k),
            None => body_key.filter(|k| !k.is_empty()).map(str::to_owned),
        };
        let Some(key) = key else {
            if self.require_key {
                return Err(HttpError::new(
                    Code::InvalidWriteKey,
                    "this node requires a write key: HTTP Basic auth with the key as user name, or `writeKey` in the body",
                ));
            }
            return Ok(());
        };
        let source = self
            .sources
            .iter()
            .find(|s| s.write_key == key)
            .ok_or_else(|| HttpError::new(Code::InvalidWriteKey, "unknown write key"))?;
        match cross_origin(headers) {
            Some(origin) if !source.allows(&origin) => Err(HttpError::new(
                Code::OriginNotAllowed,
                format!("origin {origin} is not allowed for this write key (`allowed_origins` of its source)"),
            )),
            _ => Ok(()),
        }
    }

    /// Whether any source allows `origin` (for CORS, where the key is not known yet).
    fn any_source_allows(&self, origin: &str) -> bool {
        self.sources.iter().any(|s| s.allows(origin))
    }
}

/// The write key of `Authorization: Basic base64(key:)`; other schemes are ignored.
fn header_key(headers: &HeaderMap) -> Result<Option<String>, HttpError> {
    let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let Some((scheme, encoded)) = value.trim().split_once(' ') else {
        return Ok(None);
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Ok(None);
    }
    let malformed = || HttpError::new(Code::InvalidWriteKey, "malformed HTTP Basic credentials");
    let decoded = base64_decode(encoded.trim()).ok_or_else(malformed)?;
    let text = String::from_utf8(decoded).map_err(|_| malformed())?;
    let user = text.split_once(':').map_or(text.as_str(), |(u, _)| u);
    if user.is_empty() {
        return Err(malformed());
    }
    Ok(Some(user.to_owned()))
}

/// Standard base64 with optional padding.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // A single leftover character carries fewer than 8 bits: not valid base64.
    (bits < 6).then_some(out)
}

/// The request's `Origin` (lowercased) when it is not the node's own origin (`Host`).
fn cross_origin(headers: &HeaderMap) -> Option<String> {
    let origin = headers.get(ORIGIN)?.to_str().ok()?.to_ascii_lowercase();
    let host = headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_ascii_lowercase);
    let authority = origin.split_once("://").map(|(_, a)| a);
    match (authority, host) {
        (Some(a), Some(h)) if a == h => None,
        _ => Some(origin),
    }
}

/// Which CORS policy a path falls under.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Ingest,
    Read,
}

fn route_of(path: &str) -> Option<Route> {
    match path {
        "/v1/batch" | "/v1/track" | "/v1/page" | "/v1/identify" | "/v1/alias" | "/v1/validate" => {
            Some(Route::Ingest)
        }
        "/v1/recommendations" | "/v1/items" => Some(Route::Read),
        p if p.starts_with("/v1/items/") => Some(Route::Read),
        _ => None,
    }
}

/// CORS middleware for the ingest and read routes (see the module docs).
pub async fn cors(State(app): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(route) = route_of(req.uri().path()) else {
        return next.run(req).await;
    };
    let origin = req
        .headers()
        .get(ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let allowed = origin.as_ref().and_then(|o| {
        let foreign = cross_origin(req.headers());
        let ok = foreign.is_none_or(|f| app.access.any_source_allows(&f));
        ok.then(|| HeaderValue::from_str(o).ok()).flatten()
    });
    let methods = match route {
        Route::Ingest => "POST, OPTIONS",
        Route::Read => "GET, OPTIONS",
    };
    if req.method() == Method::OPTIONS {
        let mut resp = match (&origin, &allowed) {
            (Some(o), None) => HttpError::new(
                Code::OriginNotAllowed,
                format!("origin {o} is not in the allowed_origins of any source"),
            )
            .into_response(),
            (_, Some(_)) => {
                let mut r = StatusCode::NO_CONTENT.into_response();
                let h = r.headers_mut();
                h.insert(
                    ACCESS_CONTROL_ALLOW_METHODS,
                    HeaderValue::from_static(methods),
                );
                h.insert(
                    ACCESS_CONTROL_ALLOW_HEADERS,
                    HeaderValue::from_static("Authorization, Content-Type"),
                );
                h.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("86400"));
                r
            }
            (None, None) => {
                let mut r = StatusCode::NO_CONTENT.into_response();
                r.headers_mut()
                    .insert(ALLOW, HeaderValue::from_static(methods));
                r
            }
        };
        decorate(resp.headers_mut(), allowed);
        return resp;
    }
    let mut resp = next.run(req).await;
    decorate(resp.headers_mut(), allowed);
    resp
}

fn decorate(h: &mut HeaderMap, allowed: Option<HeaderValue>) {
    h.append(VARY, HeaderValue::from_static("Origin"));
    if let Some(origin) = allowed {
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(
            ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("Retry-After"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_patterns() {
        let p = |s: &str| OriginPattern::parse(s).unwrap();
        assert!(p("*").matches("https://anything.example"));
        assert!(p("https://Shop.example").matches("https://shop.example"));
        assert!(!p("https://shop.example").matches("http://shop.example"));
        assert!(!p("https://shop.example").matches("https://shop.example:8443"));
        let local = p("http://localhost:*");
        assert!(local.matches("http://localhost:3000"));
        assert!(local.matches("http://localhost"));
        assert!(!local.matches("http://localhost.evil.example"));
        assert!(!local.matches("http://localhost:"));
        let sub = p("https://*.example.com");
        assert!(sub.matches("https://www.example.com"));
        assert!(sub.matches("https://a.b.example.com"));
        assert!(!sub.matches("https://example.com"));
        assert!(!sub.matches("https://evilexample.com"));
        assert!(!sub.matches("http://www.example.com"));
        for bad in [
            "shop.example",
            "ftp://x",
            "https://shop.example/",
            "https://*example.com",
            "https://a*.example.com",
            "https://*.example.com:*",
        ] {
            assert!(OriginPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn basic_auth_and_base64() {
        assert_eq!(base64_decode("ZGVtbzo=").unwrap(), b"demo:");
        assert_eq!(base64_decode("ZGVtbzo").unwrap(), b"demo:");
        assert_eq!(base64_decode("YQ==").unwrap(), b"a");
        assert!(base64_decode("Y").is_none());
        assert!(base64_decode("ZG!t").is_none());
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic ZGVtbzo="));
        assert_eq!(header_key(&h).unwrap().as_deref(), Some("demo"));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer xyz"));
        assert_eq!(header_key(&h).unwrap(), None);
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic %%%"));
        assert!(header_key(&h).is_err());
    }

    #[test]
    fn same_origin_is_not_cross_origin() {
        let mut h = HeaderMap::new();
        h.insert(HOST, HeaderValue::from_static("127.0.0.1:7080"));
        h.insert(ORIGIN, HeaderValue::from_static("http://127.0.0.1:7080"));
        assert_eq!(cross_origin(&h), None);
        h.insert(ORIGIN, HeaderValue::from_static("http://localhost:7080"));
        assert_eq!(cross_origin(&h).as_deref(), Some("http://localhost:7080"));
    }
}
