//! Path normalisation and route policy: which rule a request falls under, and so whether it may pass
//! without an identity. Matching looks at the normalised path only — never the query, never the raw
//! bytes — and the normalised path is also what gets forwarded, so the backend serves exactly the
//! resource whose policy was checked.

use std::sync::Arc;

use http::Method;

/// What a route demands of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Forwarded without identity headers, whatever the client sends.
    Public,
    /// Forwarded with identity headers when the client proves one, without them otherwise.
    Optional,
    /// Answered with 401 unless the client proves an identity.
    Required,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Public => "public",
            Policy::Optional => "optional",
            Policy::Required => "required",
        }
    }
}

/// One `[[routes]]` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Label for metrics and logs (bounded: it comes from the config, never from a request).
    pub name: Arc<str>,
    /// Normalised path prefix, matched segment-wise (see [`has_prefix`]).
    pub prefix: String,
    /// `None`: every method.
    pub methods: Option<Vec<Method>>,
    pub policy: Policy,
    /// `routes[].browser_login`: the path of a browser app's login start (`/auth/oauth/NAME/start`),
    /// where refused page requests are redirected.
    pub browser_login: Option<Arc<str>>,
}

impl Route {
    fn matches(&self, method: &Method, path: &str) -> bool {
        has_prefix(path, &self.prefix) && self.methods.as_ref().is_none_or(|m| m.contains(method))
    }
}

/// The ordered rules; the first that matches wins, and a path that matches none is `required`.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<Route>,
    fallback: Route,
}

impl RouteTable {
    pub fn new(routes: Vec<Route>) -> Self {
        RouteTable {
            routes,
            fallback: Route {
                name: Arc::from("default"),
                prefix: "/".to_owned(),
                methods: None,
                policy: Policy::Required,
                browser_login: None,
            },
        }
    }

    /// The rule for a request; `path` must be normalised (see [`normalize_path`]).
    pub fn matching(&self, method: &Method, path: &str) -> &Route {
        self.routes
            .iter()
            .find(|r| r.matches(method, path))
            .unwrap_or(&self.fallback)
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

/// Segment-wise prefix test on normalised paths. A prefix ending in `/` matches what lies below it;
/// otherwise it matches the path itself and what lies below it: `/api/public` matches `/api/public`
/// and `/api/public/x`, but not `/api/publicity`.
pub fn has_prefix(path: &str, prefix: &str) -> bool {
    if prefix.ends_with('/') {
        path.starts_with(prefix)
    } else {
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }
}

/// Why a path cannot be normalised. Such a request is answered with 400 and never forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path does not start with /")]
    NotAbsolute,
    #[error("the path has a % that is not followed by two hex digits")]
    BadPercentEncoding,
    #[error("the path has an encoded slash or backslash (%2F, %5C) or a raw backslash")]
    EncodedSlash,
    #[error(
        "the path has a dot segment with parameters (like \"..;\"), which backends resolve differently"
    )]
    AmbiguousDotSegment,
}

/// Normalises a request path (RFC 3986 §6.2.2): percent-encoded unreserved characters are decoded,
/// other percent-encodings get upper-case hex, dot segments are resolved (encoded ones too: `%2e%2e`
/// is `..`), empty segments (`//`) are dropped, and a trailing slash is kept. `..` never climbs above
/// the root.
///
/// Rejected, because backends disagree on what they mean and that disagreement is how route rules are
/// bypassed: broken `%` escapes; `%2F`, `%5C` and raw `\` unless `allow_encoded_slashes` (then they
/// stay encoded and are ordinary characters of their segment); dot segments carrying `;` parameters,
/// like Tomcat's `..;`.
pub fn normalize_path(raw: &str, allow_encoded_slashes: bool) -> Result<String, PathError> {
    if is_normal(raw) {
        return Ok(raw.to_owned());
    }
    normalize_segments(raw, allow_encoded_slashes)
}

/// Whether `raw` is already what normalising makes of it, as most request paths are: absolute, with
/// no `%`, `\` or `;`, and no empty segment (but a trailing slash) nor dot segment. It is then taken
/// as it is, without taking it apart.
fn is_normal(raw: &str) -> bool {
    let Some(rest) = raw.as_bytes().strip_prefix(b"/") else {
        return false;
    };
    if rest.iter().any(|&b| matches!(b, b'%' | b'\\' | b';')) {
        return false;
    }
    let mut segments = rest.split(|&b| b == b'/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if (segment.is_empty() && !last) || segment == b"." || segment == b".." {
            return false;
        }
    }
    true
}

/// [`normalize_path`] segment by segment.
fn normalize_segments(raw: &str, allow_encoded_slashes: bool) -> Result<String, PathError> {
    let rest = raw.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
    // Output segments; a segment may borrow from `raw` when it needs no rewriting.
    let mut segments: Vec<std::borrow::Cow<'_, str>> = Vec::new();
    let mut trailing_slash = false;
    let mut parts = rest.split('/').peekable();
    while let Some(part) = parts.next() {
        let last = parts.peek().is_none();
        let segment = decode_segment(part, allow_encoded_slashes)?;
        match segment.as_ref() {
            "" => {
                trailing_slash = last;
            }
            "." => {
                trailing_slash = last;
            }
            ".." => {
                segments.pop();
                trailing_slash = last;
            }
            s => {
                let before_params = s.split(';').next().unwrap_or(s);
                let before_params = before_params.split("%3B").next().unwrap_or(before_params);
                if before_params == "." || before_params == ".." {
                    return Err(PathError::AmbiguousDotSegment);
                }
                segments.push(segment);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(raw.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// Decodes percent-encoded unreserved characters of one segment and upper-cases the rest.
fn decode_segment(
    part: &str,
    allow_encoded_slashes: bool,
) -> Result<std::borrow::Cow<'_, str>, PathError> {
    let bytes = part.as_bytes();
    if !bytes.iter().any(|&b| b == b'%' || b == b'\\') {
        return Ok(std::borrow::Cow::Borrowed(part));
    }
    let mut out = String::with_capacity(part.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .ok_or(PathError::BadPercentEncoding)?;
                let (hi, lo) = (hex_value(hex[0]), hex_value(hex[1]));
                let (Some(hi), Some(lo)) = (hi, lo) else {
                    return Err(PathError::BadPercentEncoding);
                };
                let byte = hi << 4 | lo;
                if is_unreserved(byte) {
                    out.push(byte as char);
                } else if byte == b'/' || byte == b'\\' {
                    if !allow_encoded_slashes {
                        return Err(PathError::EncodedSlash);
                    }
                    out.push_str(if byte == b'/' { "%2F" } else { "%5C" });
                } else {
                    out.push('%');
                    out.push(hex[0].to_ascii_uppercase() as char);
                    out.push(hex[1].to_ascii_uppercase() as char);
                }
                i += 3;
            }
            b'\\' => {
                if !allow_encoded_slashes {
                    return Err(PathError::EncodedSlash);
                }
                out.push_str("%5C");
                i += 1;
            }
            _ => {
                // Copy the run up to the next special byte in one go (ASCII-only boundaries, so the
                // slice is valid UTF-8).
                let start = i;
                while i < bytes.len() && bytes[i] != b'%' && bytes[i] != b'\\' {
                    i += 1;
                }
                out.push_str(&part[start..i]);
            }
        }
    }
    Ok(std::borrow::Cow::Owned(out))
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 §2.3.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn norm(p: &str) -> Result<String, PathError> {
        normalize_path(p, false)
    }

    #[test]
    fn plain_paths_are_unchanged() {
        for p in [
            "/",
            "/api",
            "/api/",
            "/api/public/x",
            "/a%20b",
            "/caf%C3%A9",
            "/a;b=c",
            "/~user",
        ] {
            assert_eq!(norm(p).unwrap(), p, "{p}");
        }
    }

    #[test]
    fn dot_segments_are_resolved_including_encoded_ones() {
        assert_eq!(norm("/api/public/../private").unwrap(), "/api/private");
        assert_eq!(norm("/api/public/%2e%2e/private").unwrap(), "/api/private");
        assert_eq!(norm("/api/public/%2E%2e/private").unwrap(), "/api/private");
        assert_eq!(norm("/api/public/.%2e/private").unwrap(), "/api/private");
        assert_eq!(norm("/api/./public/./x").unwrap(), "/api/public/x");
        assert_eq!(norm("/api/%2e/x").unwrap(), "/api/x");
        assert_eq!(norm("/a/b/..").unwrap(), "/a/");
        assert_eq!(norm("/a/b/.").unwrap(), "/a/b/");
        assert_eq!(norm("/../../etc").unwrap(), "/etc");
        assert_eq!(norm("/..").unwrap(), "/");
    }

    #[test]
    fn duplicate_slashes_are_merged_and_trailing_slash_kept() {
        assert_eq!(norm("//api///public//x").unwrap(), "/api/public/x");
        assert_eq!(norm("/api//").unwrap(), "/api/");
        assert_eq!(norm("//").unwrap(), "/");
    }

    #[test]
    fn unreserved_escapes_are_decoded_others_upper_cased() {
        assert_eq!(norm("/%61pi/%7Euser").unwrap(), "/api/~user");
        assert_eq!(norm("/a%2db").unwrap(), "/a-b");
        assert_eq!(norm("/caf%c3%a9").unwrap(), "/caf%C3%A9");
        assert_eq!(norm("/a%3fb").unwrap(), "/a%3Fb");
    }

    #[test]
    fn bad_escapes_are_rejected() {
        for p in ["/a%", "/a%2", "/a%zz", "/%g0/x", "/a%2/b"] {
            assert_eq!(norm(p), Err(PathError::BadPercentEncoding), "{p}");
        }
    }

    #[test]
    fn encoded_slashes_are_rejected_by_default_and_kept_encoded_when_allowed() {
        for p in [
            "/api/public%2F..%2Fprivate",
            "/a%2fb",
            "/a%5Cb",
            "/a%5cb",
            "/a\\b",
        ] {
            assert_eq!(norm(p), Err(PathError::EncodedSlash), "{p}");
        }
        assert_eq!(normalize_path("/a%2fb", true).unwrap(), "/a%2Fb");
        assert_eq!(normalize_path("/a\\b", true).unwrap(), "/a%5Cb");
        // An encoded slash is an ordinary character then: it cannot climb out of a segment.
        assert_eq!(
            normalize_path("/api/public/..%2Fprivate", true).unwrap(),
            "/api/public/..%2Fprivate"
        );
    }

    #[test]
    fn dot_segments_with_parameters_are_rejected() {
        for p in [
            "/public/..;/admin",
            "/public/.;/x",
            "/public/..;jsessionid=1/admin",
            "/p/..%3B/a",
            "/p/%2e%2e;/a",
        ] {
            assert_eq!(norm(p), Err(PathError::AmbiguousDotSegment), "{p}");
        }
        assert_eq!(norm("/a/...;x").unwrap(), "/a/...;x");
    }

    #[test]
    fn relative_paths_are_rejected() {
        assert_eq!(norm("api"), Err(PathError::NotAbsolute));
        assert_eq!(norm("*"), Err(PathError::NotAbsolute));
        assert_eq!(norm(""), Err(PathError::NotAbsolute));
    }

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(has_prefix("/api/public", "/api/public"));
        assert!(has_prefix("/api/public/x", "/api/public"));
        assert!(!has_prefix("/api/publicity", "/api/public"));
        assert!(has_prefix("/api/public/x", "/api/public/"));
        assert!(!has_prefix("/api/public", "/api/public/"));
        assert!(has_prefix("/anything", "/"));
    }

    fn route(prefix: &str, methods: Option<Vec<Method>>, policy: Policy) -> Route {
        Route {
            name: Arc::from(prefix),
            prefix: prefix.to_owned(),
            methods,
            policy,
            browser_login: None,
        }
    }

    #[test]
    fn first_match_wins_and_no_match_is_required() {
        let table = RouteTable::new(vec![
            route(
                "/api/public/",
                Some(vec![Method::GET, Method::HEAD]),
                Policy::Public,
            ),
            route("/api/public/", None, Policy::Optional),
            route("/static", None, Policy::Public),
        ]);
        assert_eq!(
            table.matching(&Method::GET, "/api/public/x").policy,
            Policy::Public
        );
        assert_eq!(
            table.matching(&Method::POST, "/api/public/x").policy,
            Policy::Optional
        );
        assert_eq!(
            table.matching(&Method::GET, "/static").policy,
            Policy::Public
        );
        let fallback = table.matching(&Method::GET, "/api/private");
        assert_eq!(
            (fallback.policy, &*fallback.name),
            (Policy::Required, "default")
        );
    }

    proptest! {
        /// Paths taken as they are come out exactly as taking them apart would make them.
        #[test]
        fn the_shortcut_for_normal_paths_agrees_with_the_segment_walk(
            absolute in any::<bool>(),
            segments in prop::collection::vec(
                prop_oneof![
                    "[a-zA-Z0-9%.;~_\\\\-]{0,6}",
                    prop::sample::select(vec!["", ".", "..", "...", ".a", "%2e", "..;x", "%2F"])
                        .prop_map(str::to_owned),
                ],
                0..6,
            ),
            allow_encoded_slashes in any::<bool>(),
        ) {
            let path = format!("{}{}", if absolute { "/" } else { "" }, segments.join("/"));
            prop_assert_eq!(
                normalize_path(&path, allow_encoded_slashes),
                normalize_segments(&path, allow_encoded_slashes)
            );
        }

        /// Normalising twice changes nothing, and the result is absolute with no dot or empty segments.
        #[test]
        fn normalisation_is_idempotent(path in "/[a-zA-Z0-9%./;~_-]{0,40}") {
            if let Ok(once) = norm(&path) {
                prop_assert_eq!(norm(&once), Ok(once.clone()));
                prop_assert!(once.starts_with('/'));
                prop_assert!(!once.contains("//"));
                for seg in once.split('/') {
                    prop_assert!(seg != "." && seg != "..");
                }
            }
        }
    }
}
