//! Header hygiene: the only place identity headers are written. Every rule is a small function so that
//! each can be tested alone, and [`HeaderRules::prepare_request`] applies them in a fixed order:
//! hop-by-hop headers out, forgeable headers out, then ours in.
//!
//! This runs on every proxied request, so it is written to cost little when there is little to do:
//! one pass over the header names decides what must go (most requests lose only `Authorization`),
//! removals touch only those names, and the `X-Forwarded-For` value of a connection is formatted once,
//! when it is accepted.
//!
//! The rules are written once, as the [`Fate`] of one header given a [`Survey`] of the request's
//! headers, and applied in two forms: to a `HeaderMap` ([`HeaderRules::prepare_request`], for requests
//! hyper parsed) and as HTTP/1.1 text ([`HeaderRules::write_request_headers`], for the fast lane,
//! which forwards the client's headers without building a map: the lines that pass unchanged are
//! copied as they arrived, a run of adjacent ones at a time).

use std::borrow::Cow;
use std::net::IpAddr;

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};
use ipnet::IpNet;
use smallvec::SmallVec;

use crate::auth::Identity;
use crate::config::Config;
use crate::error::Error;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The hop-by-hop headers (RFC 9110 §7.6.1) and the non-standard ones that act as such.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

/// Whether `name` (in any case) is a hop-by-hop header. They describe one connection and must not be
/// forwarded in either direction.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|hop| hop.len() == name.len() && hop.as_bytes().eq_ignore_ascii_case(name))
}

/// Where a part of a request head is in its bytes: (start, end).
pub type Span = (u32, u32);

/// A request's headers as they arrived in an HTTP/1.1 head: its bytes, and where each header's
/// name and value are in them (as httparse found them: the value without surrounding whitespace).
#[derive(Clone, Copy)]
pub struct HeadLines<'h> {
    pub text: &'h [u8],
    pub spans: &'h [(Span, Span)],
}

impl<'h> HeadLines<'h> {
    fn part(&self, (start, end): Span) -> &'h [u8] {
        &self.text[start as usize..end as usize]
    }

    /// Header `i` as (name, value).
    pub fn get(&self, i: usize) -> (&'h [u8], &'h [u8]) {
        let (name, value) = self.spans[i];
        (self.part(name), self.part(value))
    }

    /// Every header as (name, value), in order.
    pub fn iter(&self) -> impl Iterator<Item = (&'h [u8], &'h [u8])> + '_ {
        (0..self.spans.len()).map(|i| self.get(i))
    }
}

/// What happens to one client header on its way to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Pass,
    Drop,
    /// A `Cookie` header that names one of wxgate's cookies: passed with them cut out.
    CutOwnCookies,
}

/// What one look at all of a request's headers found, which the fate of each depends on.
#[derive(Debug, Default)]
pub struct Survey<'h> {
    /// Headers the `Connection` header names (besides `keep-alive` and `close`).
    named: SmallVec<[&'h [u8]; 4]>,
    /// An `Authorization: Bearer` value: wxgate's credential, so every `Authorization` goes.
    bearer: bool,
    /// A `Cookie` value that mentions one of wxgate's cookies.
    own_cookies: bool,
}

impl<'h> Survey<'h> {
    pub fn new() -> Self {
        Survey::default()
    }

    /// Takes one header into account. Only `Connection`, `Authorization` and `Cookie` headers
    /// change a survey; a caller that knows which headers those are may show it only them, with
    /// [`Survey::connection`], [`Survey::authorization`] and [`Survey::cookie`].
    pub fn look(&mut self, name: &[u8], value: &'h [u8]) {
        if name.eq_ignore_ascii_case(b"connection") {
            self.connection(value);
        } else if name.eq_ignore_ascii_case(b"authorization") {
            self.authorization(value);
        } else if name.eq_ignore_ascii_case(b"cookie") {
            self.cookie(value);
        }
    }

    /// A `Connection` header's value.
    pub fn connection(&mut self, value: &'h [u8]) {
        for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            if !token.is_empty()
                && !token.eq_ignore_ascii_case(b"keep-alive")
                && !token.eq_ignore_ascii_case(b"close")
            {
                self.named.push(token);
            }
        }
    }

    /// An `Authorization` header's value.
    pub fn authorization(&mut self, value: &[u8]) {
        self.bearer |= value
            .get(..7)
            .is_some_and(|s| s.eq_ignore_ascii_case(b"bearer "));
    }

    /// A `Cookie` header's value.
    pub fn cookie(&mut self, value: &[u8]) {
        self.own_cookies |= mentions_own_cookie(value);
    }

    /// A survey of every header of `headers`.
    pub fn of_map(headers: &'h HeaderMap) -> Self {
        let mut survey = Survey::new();
        for (name, value) in headers {
            survey.look(name.as_str().as_bytes(), value.as_bytes());
        }
        survey
    }
}

/// Headers that say where a request came from. Believed only from trusted proxies.
const FORWARDING: [&str; 5] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
    "x-real-ip",
];

/// Whether two header names are the same once case is ignored and `_` and `.` are read as `-`:
/// the way common backends (CGI, WSGI, Rack, PHP, some Java frameworks) fold them.
pub fn same_header(name: &[u8], canonical: &str) -> bool {
    name.len() == canonical.len()
        && name.iter().zip(canonical.bytes()).all(|(&a, b)| {
            let a = match a {
                b'_' | b'.' => b'-',
                a => a.to_ascii_lowercase(),
            };
            a == b.to_ascii_lowercase()
        })
}

/// Whether `name` has an `_`, looked for eight bytes at a time: this runs for nearly every header
/// of every request, and a byte loop was the larger part of deciding a header's fate.
fn has_underscore(name: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    const UNDERSCORES: u64 = u64::from_ne_bytes([b'_'; 8]);
    // A word has a zero byte exactly when this is not zero; XOR makes `_` bytes the zero ones.
    let any_underscore = |word: u64| {
        let x = word ^ UNDERSCORES;
        x.wrapping_sub(ONES) & !x & HIGHS != 0
    };
    let word = |bytes: &[u8]| u64::from_ne_bytes(bytes.try_into().expect("8 bytes"));
    if name.len() < 8 {
        return name.iter().fold(false, |found, &b| found | (b == b'_'));
    }
    let mut words = name.chunks_exact(8);
    // Then the last eight bytes, overlapping the words before (only whether there is an `_`
    // matters): no byte-sized copy, whose store the word's load would wait on.
    words.by_ref().any(|w| any_underscore(word(w))) || any_underscore(word(&name[name.len() - 8..]))
}

/// A rule's name (lower case with `-` as its only separator, shorter than [`SPECIAL_LENGTHS`])
/// eight bytes to a word, zero-padded, for [`spelling_of`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NameWords([u64; SPECIAL_LENGTHS / 8]);

impl NameWords {
    fn of(name: &[u8]) -> NameWords {
        let mut words = [0; SPECIAL_LENGTHS / 8];
        for (word, bytes) in words.iter_mut().zip(name.chunks(8)) {
            *word = bytes
                .iter()
                .rev()
                .fold(0u64, |word, &b| word << 8 | u64::from(b));
        }
        NameWords(words)
    }
}

/// Which separators a name that folds to a rule's name is spelled with.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Spelling {
    underscore: bool,
    dot: bool,
}

/// How `name` is spelled when it folds (see [`same_header`]) to `canonical`, a rule's name of the
/// same length; `None` when it does not. Eight bytes at a time, held in registers: comparing a
/// name byte by byte was most of the cost of deciding the fate of the headers that have rules.
fn spelling_of(name: &[u8], canonical: &NameWords) -> Option<Spelling> {
    let le = |bytes: &[u8]| u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
    let mut spelling = Spelling::default();
    let mut same = |i: usize, word: u64| {
        let (word, underscore, dot) = fold_word(word);
        spelling.underscore |= underscore;
        spelling.dot |= dot;
        word == canonical.0[i]
    };
    let full = name.len() / 8;
    for (i, chunk) in name.chunks_exact(8).enumerate() {
        if !same(i, le(chunk)) {
            return None;
        }
    }
    let rest = name.len() % 8;
    if rest > 0 {
        // The last bytes, moved to the bottom of a word: from the last eight bytes of the name
        // when it has eight, else byte by byte.
        let word = match name.len() >= 8 {
            true => le(&name[name.len() - 8..]) >> (8 * (8 - rest)),
            false => name
                .iter()
                .rev()
                .fold(0u64, |word, &b| word << 8 | u64::from(b)),
        };
        if !same(full, word) {
            return None;
        }
    }
    Some(spelling)
}

/// Eight name bytes (little-endian, all below 0x80, as token characters are) folded to lower case
/// with `-` for `_` and `.`; and whether there was an `_` and a `.`.
fn fold_word(word: u64) -> (u64, bool, bool) {
    const fn each(byte: u8) -> u64 {
        u64::from_ne_bytes([byte; 8])
    }
    // Bytes from `A` to `Z` get 0x20: those with b + 0x3f >= 0x80 but not b + 0x25 >= 0x80.
    let capitals = (word + each(0x3f)) & !(word + each(0x25)) & each(0x80);
    let word = word | capitals >> 2;
    // 0x80 exactly in the bytes equal to `byte` (no borrow from byte to byte).
    let equal = |byte: u8| {
        let x = word ^ each(byte);
        !(((x & each(0x7f)) + each(0x7f)) | x | each(0x7f))
    };
    let (underscores, dots) = (equal(b'_'), equal(b'.'));
    // `_` ^ 0x72 and `.` ^ 0x03 are `-`.
    let folded = word ^ ((underscores >> 7) * 0x72) ^ ((dots >> 7) * 0x03);
    (folded, underscores != 0, dots != 0)
}

/// What the request to the backend must look like, derived once from the config.
#[derive(Debug, Clone)]
pub struct HeaderRules {
    user_id: HeaderName,
    appid: HeaderName,
    openid: HeaderName,
    unionid: HeaderName,
    phone: Option<HeaderName>,
    /// Every name a client header must not fold to (see [`same_header`]): the identity headers, whose
    /// client values never pass, then the forwarding headers, whose exact spelling passes from trusted
    /// proxies. With their lengths, so most names are ruled out by one comparison.
    folded: Vec<(usize, HeaderName, Folded)>,
    /// Which (length, first letter) pairs any name with a rule of its own has (hop-by-hop,
    /// `Authorization`, `Cookie`, the folded names): bit `letter_bit(first byte)` of
    /// `special[len]`. A name outside them can only be dropped for an underscore, which is most
    /// headers of most requests decided in two steps.
    special: [u32; SPECIAL_LENGTHS],
    /// Every name with a rule of its own (lower case with `-` only, which is how they fold; all
    /// shorter than [`SPECIAL_LENGTHS`]) and its rule, by length: a name the table's shortcut lets
    /// through is compared with the few of its length instead of going through every rule.
    named_rules: Vec<Vec<(NameWords, Rule)>>,
    allow_underscores: bool,
    trusted_proxies: Vec<IpNet>,
}

/// Names this long or longer always take every rule.
const SPECIAL_LENGTHS: usize = 48;

/// The rule a name of [`HeaderRules::named_rules`] falls under. The first three apply to the exact
/// name only (any case); the last two to every spelling that folds to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    HopByHop,
    Authorization,
    Cookie,
    Identity,
    Forwarding,
}

/// A name's first byte as a bit: its letter, in either case, or one bit shared by every other byte
/// (`-`, `_` and `.`, which [`same_header`] folds into each other, all land on it).
fn letter_bit(first: u8) -> u32 {
    match first.to_ascii_lowercase() {
        letter @ b'a'..=b'z' => 1 << (letter - b'a'),
        _ => 1 << 26,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Folded {
    Identity,
    Forwarding,
}

/// Facts about the client connection that the forwarding headers report.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub peer: IpAddr,
    /// `"http"` or `"https"`: how the client reached wxgate.
    pub scheme: &'static str,
    /// The peer's address as an `X-Forwarded-For` value, formatted once per connection.
    forwarded_for: HeaderValue,
}

impl ClientInfo {
    pub fn new(peer: IpAddr, scheme: &'static str) -> Self {
        let forwarded_for = HeaderValue::try_from(canonical_ip(peer).to_string())
            .expect("an IP address is a valid header value");
        ClientInfo {
            peer,
            scheme,
            forwarded_for,
        }
    }
}

impl HeaderRules {
    pub fn from_config(config: &Config) -> Self {
        let h = &config.headers;
        Self::new(
            [
                h.user_id.clone(),
                h.appid.clone(),
                h.openid.clone(),
                h.unionid.clone(),
            ],
            h.phone.clone(),
            h.allow_underscores,
            config.server.trusted_proxies.clone(),
        )
    }

    fn new(
        names: [HeaderName; 4],
        phone: Option<HeaderName>,
        allow_underscores: bool,
        trusted_proxies: Vec<IpNet>,
    ) -> Self {
        let [user_id, appid, openid, unionid] = names;
        let folded = [&user_id, &appid, &openid, &unionid]
            .into_iter()
            .chain(phone.as_ref())
            .map(|name| (name.as_str().len(), name.clone(), Folded::Identity))
            .chain(FORWARDING.iter().map(|name| {
                (
                    name.len(),
                    HeaderName::from_static(name),
                    Folded::Forwarding,
                )
            }))
            .collect::<Vec<_>>();
        let mut special = [0u32; SPECIAL_LENGTHS];
        // Identity names are lower case without `_` or `.` (HeaderName, and the config refuses
        // those): as they fold.
        let mut named_rules = vec![Vec::new(); SPECIAL_LENGTHS];
        let rules = HOP_BY_HOP
            .iter()
            .map(|name| (*name, Rule::HopByHop))
            .chain([
                ("authorization", Rule::Authorization),
                ("cookie", Rule::Cookie),
            ])
            .chain(folded.iter().map(|(_, name, kind)| {
                let rule = match kind {
                    Folded::Identity => Rule::Identity,
                    Folded::Forwarding => Rule::Forwarding,
                };
                (name.as_str(), rule)
            }));
        for (name, rule) in rules {
            // Longer names are left to every rule in turn (see `fate`).
            if let Some(slot) = special.get_mut(name.len()) {
                *slot |= letter_bit(name.as_bytes()[0]);
                named_rules[name.len()].push((NameWords::of(name.as_bytes()), rule));
            }
        }
        HeaderRules {
            user_id,
            appid,
            openid,
            unionid,
            phone,
            folded,
            special,
            named_rules,
            allow_underscores,
            trusted_proxies,
        }
    }

    /// The client's address: the peer, or, when the peer is a trusted proxy, the nearest address in
    /// `X-Forwarded-For` that is not itself a trusted proxy (the rightmost such: entries further left
    /// were written by the client and may be forged).
    pub fn client_ip(&self, headers: &HeaderMap, peer: IpAddr) -> IpAddr {
        if !self.is_trusted(peer) {
            return canonical_ip(peer);
        }
        let mut client = canonical_ip(peer);
        let chain: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect();
        for hop in chain.iter().rev() {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) => {
                    client = canonical_ip(ip);
                    if !self.is_trusted(ip) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        client
    }

    /// Whether the client at `peer` is a proxy whose forwarding headers are believed.
    pub fn is_trusted(&self, peer: IpAddr) -> bool {
        if self.trusted_proxies.is_empty() {
            return false;
        }
        let peer = canonical_ip(peer);
        self.trusted_proxies.iter().any(|net| net.contains(&peer))
    }

    /// Turns the client's headers into the headers the backend receives.
    ///
    /// 1. hop-by-hop headers and those the client named in `Connection` go;
    /// 2. wxgate's own bearer credentials go;
    /// 3. every header that folds (see [`same_header`]) to an identity header goes, and so does every
    ///    name with `_` unless allowed; forwarding headers go unless the peer is a trusted proxy, and
    ///    even then only their exact spelling stays;
    /// 4. `X-Forwarded-*` are set, then the identity headers when there is an identity.
    pub fn prepare_request(
        &self,
        headers: &mut HeaderMap,
        identity: Option<&Identity>,
        client: &ClientInfo,
    ) -> Result<(), Error> {
        let trusted = self.is_trusted(client.peer);
        let mut doomed: SmallVec<[HeaderName; 8]> = SmallVec::new();
        let (mut cookies, mut own_cookies) = (false, false);
        {
            let survey = Survey::of_map(headers);
            for name in headers.keys() {
                cookies |= *name == header::COOKIE;
                match self.fate(name.as_str().as_bytes(), &survey, trusted) {
                    Fate::Pass => {}
                    Fate::Drop => doomed.push(name.clone()),
                    Fate::CutOwnCookies => own_cookies = true,
                }
            }
        }
        for name in &doomed {
            headers.remove(name);
        }
        if own_cookies {
            remove_own_cookies(headers);
        }
        // The site's other cookies go on to the backend: never indexed by HPACK, should it speak h2.
        if cookies && let header::Entry::Occupied(mut cookies) = headers.entry(header::COOKIE) {
            cookies
                .iter_mut()
                .for_each(|value| value.set_sensitive(true));
        }
        self.set_forwarding(headers, client, trusted);
        if let Some(identity) = identity {
            self.insert_identity(headers, identity)?;
        }
        Ok(())
    }

    /// The rules of [`HeaderRules::prepare_request`] for one client header named `name` (any case).
    pub fn fate(&self, name: &[u8], survey: &Survey<'_>, trusted: bool) -> Fate {
        let ordinary = match (name.first(), self.special.get(name.len())) {
            (Some(&first), Some(letters)) => letters & letter_bit(first) == 0,
            _ => false,
        };
        if ordinary && survey.named.is_empty() {
            // No rule names it: only the underscore rule can apply.
            return match !self.allow_underscores && has_underscore(name) {
                true => Fate::Drop,
                false => Fate::Pass,
            };
        }
        if name.len() < SPECIAL_LENGTHS {
            return self.fate_by_name(name, survey, trusted);
        }
        self.fate_by_every_rule(name, survey, trusted)
    }

    /// [`HeaderRules::fate`] for a name shorter than [`SPECIAL_LENGTHS`]: compared with the names
    /// of its length in [`HeaderRules::named_rules`], then the rules applied in the same order as
    /// [`HeaderRules::fate_by_every_rule`] applies them.
    fn fate_by_name(&self, name: &[u8], survey: &Survey<'_>, trusted: bool) -> Fate {
        if survey.named.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            return Fate::Drop;
        }
        let (mut hop, mut authorization, mut cookie, mut forged) = (false, false, false, false);
        for (canonical, rule) in &self.named_rules[name.len()] {
            let Some(spelling) = spelling_of(name, canonical) else {
                continue;
            };
            // The name as spelled is the rule's name, not merely one that folds to it.
            let exact = !(spelling.underscore || spelling.dot);
            match rule {
                Rule::HopByHop => hop |= exact,
                Rule::Authorization => authorization |= exact,
                Rule::Cookie => cookie |= exact,
                Rule::Identity => forged = true,
                Rule::Forwarding => forged |= !(trusted && exact),
            }
        }
        if hop {
            Fate::Drop
        } else if authorization {
            match survey.bearer {
                true => Fate::Drop,
                false => Fate::Pass,
            }
        } else if cookie {
            match survey.own_cookies {
                true => Fate::CutOwnCookies,
                false => Fate::Pass,
            }
        } else if forged || (!self.allow_underscores && has_underscore(name)) {
            Fate::Drop
        } else {
            Fate::Pass
        }
    }

    /// [`HeaderRules::fate`] without the shortcut: every rule in turn.
    fn fate_by_every_rule(&self, name: &[u8], survey: &Survey<'_>, trusted: bool) -> Fate {
        // Rule 1.
        if is_hop_by_hop(name) || survey.named.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            return Fate::Drop;
        }
        // Rule 2. Other schemes (Basic, a backend's own) pass through.
        if name.eq_ignore_ascii_case(b"authorization") {
            return if survey.bearer {
                Fate::Drop
            } else {
                Fate::Pass
            };
        }
        if name.eq_ignore_ascii_case(b"cookie") {
            return if survey.own_cookies {
                Fate::CutOwnCookies
            } else {
                Fate::Pass
            };
        }
        if self.forgeable(name, trusted) {
            Fate::Drop
        } else {
            Fate::Pass
        }
    }

    /// Rule 3 for one name: whether a client must not send it.
    fn forgeable(&self, name: &[u8], trusted: bool) -> bool {
        if !self.allow_underscores && name.contains(&b'_') {
            return true;
        }
        self.folded.iter().any(|(len, canonical, kind)| {
            *len == name.len()
                && same_header(name, canonical.as_str())
                && !(*kind == Folded::Forwarding
                    && trusted
                    && name.eq_ignore_ascii_case(canonical.as_str().as_bytes()))
        })
    }

    /// The request's headers for the backend as HTTP/1.1 text: the client's `headers` (with `survey`
    /// made of them) as their fates say, then `X-Forwarded-*`, then the identity. The same rules as
    /// [`HeaderRules::prepare_request`], written out instead of applied to a map. `host`, when given,
    /// replaces the client's `Host` (the upstream's own, when `upstream.preserve_host` is off).
    ///
    /// A header that passes unchanged is copied from the head as it arrived (`name:` and the
    /// value, with the whitespace between them; only the line ending is wxgate's), and a run of
    /// adjacent ones as one copy: on most requests that is the whole head but `Authorization` in
    /// two or three copies.
    pub fn write_request_headers(
        &self,
        out: &mut Vec<u8>,
        headers: HeadLines<'_>,
        survey: &Survey<'_>,
        identity: Option<&Identity>,
        client: &ClientInfo,
        host: Option<&[u8]>,
    ) -> Result<(), Error> {
        let trusted = self.is_trusted(client.peer);
        let text = headers.text;
        let mut chain: SmallVec<[&[u8]; 2]> = SmallVec::new();
        let (mut proto, mut forwarded_host, mut client_host) = (false, false, None);
        let mut runs = LineRuns::new(text);
        for &(name_at, value_at) in headers.spans {
            let (name, value) = (headers.part(name_at), headers.part(value_at));
            if name.eq_ignore_ascii_case(b"host") {
                client_host.get_or_insert(value);
                if host.is_some() {
                    continue;
                }
            }
            match self.fate(name, survey, trusted) {
                Fate::Drop => continue,
                Fate::Pass => {
                    // Only a trusted proxy's forwarding headers pass.
                    if trusted {
                        if name.eq_ignore_ascii_case(b"x-forwarded-for") {
                            // Extended below, as one header.
                            chain.push(value);
                            continue;
                        }
                        proto |= name.eq_ignore_ascii_case(b"x-forwarded-proto");
                        forwarded_host |= name.eq_ignore_ascii_case(b"x-forwarded-host");
                    }
                    runs.pass(out, name_at.0 as usize, value_at.1 as usize);
                }
                Fate::CutOwnCookies => match cut_own_cookies(value) {
                    Some(Cow::Borrowed(_)) => {
                        runs.pass(out, name_at.0 as usize, value_at.1 as usize)
                    }
                    kept => {
                        runs.flush(out);
                        if let Some(kept) = kept {
                            write_header(out, name, &kept);
                        }
                    }
                },
            }
        }
        runs.flush(out);
        if let Some(host) = host {
            write_header(out, b"host", host);
        }
        out.extend_from_slice(b"x-forwarded-for: ");
        for hop in chain {
            out.extend_from_slice(hop);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(client.forwarded_for.as_bytes());
        out.extend_from_slice(b"\r\n");
        if !proto {
            write_header(out, b"x-forwarded-proto", client.scheme.as_bytes());
        }
        if !forwarded_host && let Some(client_host) = client_host {
            write_header(out, b"x-forwarded-host", client_host);
        }
        if let Some(identity) = identity {
            let [user_id, openid, unionid, phone] = identity.id_bytes();
            // (name, value, whether it is sent when empty: an absent unionid or phone is empty).
            let fields = [
                (Some(&self.user_id), user_id, true),
                (Some(&self.appid), identity.appid().as_bytes(), true),
                (Some(&self.openid), openid, true),
                (Some(&self.unionid), unionid, false),
                (self.phone.as_ref(), phone, false),
            ];
            for (name, value, always) in fields {
                let Some(name) = name.filter(|_| always || !value.is_empty()) else {
                    continue;
                };
                // Visible ASCII, space and tab; checked without a branch per byte.
                let valid = value.iter().fold(true, |ok, &b| {
                    ok & ((b == b'\t') | (b.wrapping_sub(b' ') <= b'~' - b' '))
                });
                if !valid {
                    return Err(Error::Internal(
                        "identity value is not a valid header value".into(),
                    ));
                }
                write_header(out, name.as_str().as_bytes(), value);
            }
        }
        Ok(())
    }

    fn set_forwarding(&self, headers: &mut HeaderMap, client: &ClientInfo, trusted: bool) {
        // X-Forwarded-For: a trusted proxy's list is extended with the proxy itself; anyone else's
        // was removed above and starts again with the real peer.
        if trusted && headers.contains_key(&X_FORWARDED_FOR) {
            let peer = client.forwarded_for.to_str().unwrap_or_default();
            let chain: Vec<&str> = headers
                .get_all(&X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .chain([peer])
                .collect();
            if let Ok(value) = HeaderValue::try_from(chain.join(", ")) {
                headers.insert(X_FORWARDED_FOR, value);
            }
        } else {
            headers.insert(X_FORWARDED_FOR, client.forwarded_for.clone());
        }
        if !(trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
            headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(client.scheme));
        }
        if !(trusted && headers.contains_key(&X_FORWARDED_HOST))
            && let Some(host) = headers.get(header::HOST).cloned()
        {
            headers.insert(X_FORWARDED_HOST, host);
        }
    }

    /// Writes the identity headers (replacing any of the same name).
    pub fn insert_identity(
        &self,
        headers: &mut HeaderMap,
        identity: &Identity,
    ) -> Result<(), Error> {
        let value = |v: &str| {
            HeaderValue::try_from(v)
                .map_err(|_| Error::Internal("identity value is not a valid header value".into()))
        };
        headers.insert(self.user_id.clone(), value(identity.user_id())?);
        headers.insert(self.appid.clone(), value(identity.appid())?);
        headers.insert(self.openid.clone(), value(identity.openid())?);
        if let Some(unionid) = identity.unionid() {
            headers.insert(self.unionid.clone(), value(unionid)?);
        }
        if let (Some(name), Some(phone)) = (&self.phone, identity.phone()) {
            headers.insert(name.clone(), value(phone)?);
        }
        Ok(())
    }
}

/// Header lines copied from a head as they arrived (the name, the colon, the whitespace and the
/// value; the line ending is always CRLF), a run of adjacent lines in one copy.
pub struct LineRuns<'t> {
    text: &'t [u8],
    /// The lines passed and not yet copied: from the first one's name to the last one's value.
    run: Option<(usize, usize)>,
}

impl<'t> LineRuns<'t> {
    pub fn new(text: &'t [u8]) -> Self {
        LineRuns { text, run: None }
    }

    /// The line whose name starts at `start` and whose value ends at `end` in the text passes,
    /// unchanged.
    pub fn pass(&mut self, out: &mut Vec<u8>, start: usize, end: usize) {
        self.run = match self.run {
            // The line right after the run's last, joined by nothing but CRLF: the run grows.
            Some((first, last)) if last + 2 == start && &self.text[last..start] == b"\r\n" => {
                Some((first, end))
            }
            _ => {
                self.flush(out);
                Some((start, end))
            }
        };
    }

    /// Copies the lines passed so far: before a header written otherwise, and at the end.
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        if let Some((start, end)) = self.run.take() {
            out.extend_from_slice(&self.text[start..end]);
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// `name: value\r\n`.
pub fn write_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Adds to `doomed` the headers a `Connection` header names (RFC 9110 §7.6.1), besides the usual
/// `keep-alive` and `close` tokens.
fn connection_named(headers: &HeaderMap, doomed: &mut SmallVec<[HeaderName; 8]>) {
    doomed.push(header::CONNECTION);
    for token in headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
    {
        if token.eq_ignore_ascii_case("keep-alive") || token.eq_ignore_ascii_case("close") {
            continue;
        }
        if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
            doomed.push(name);
        }
    }
}

/// Removes the hop-by-hop headers and every header the `Connection` header names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let mut doomed: SmallVec<[HeaderName; 8]> = SmallVec::new();
    for name in headers.keys() {
        if *name == header::CONNECTION {
            connection_named(headers, &mut doomed);
        } else if is_hop_by_hop(name.as_str().as_bytes()) {
            doomed.push(name.clone());
        }
    }
    for name in &doomed {
        headers.remove(name);
    }
}

/// The protocol a request asks to switch to: `Upgrade`'s value when `Connection` names `upgrade`
/// (a WebSocket handshake, for one). Such requests keep those two headers on the way to the backend,
/// and so does its `101` on the way back.
pub fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let protocol = headers.get(header::UPGRADE)?;
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
        .then(|| protocol.clone())
}

/// Puts back `Connection: upgrade` and `Upgrade` after the hop-by-hop headers were removed.
pub fn restore_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// The prefix of wxgate's cookie names (the session and the login-state binding), compared without
/// case so no spelling of them reaches a backend.
const OWN_COOKIE_PREFIX: &[u8] = b"__host-wxgate";

fn mentions_own_cookie(value: &[u8]) -> bool {
    value
        .windows(OWN_COOKIE_PREFIX.len())
        .any(|w| w.eq_ignore_ascii_case(OWN_COOKIE_PREFIX))
}

/// Removes wxgate's own cookies from `Cookie` headers and keeps the others in order; a header left
/// empty goes. Cookies are credentials for wxgate only, like bearer tokens.
fn remove_own_cookies(headers: &mut HeaderMap) {
    let kept: Vec<HeaderValue> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| match cut_own_cookies(value.as_bytes())? {
            Cow::Borrowed(_) => Some(value.clone()),
            Cow::Owned(kept) => HeaderValue::from_bytes(&kept).ok(),
        })
        .collect();
    headers.remove(header::COOKIE);
    for value in kept {
        headers.append(header::COOKIE, value);
    }
}

/// What is left of one `Cookie` value for the backend, the same for both forms of the rules: the
/// value itself when it does not mention wxgate's cookies (whatever else it holds, even nothing);
/// otherwise the other cookies, in order, or `None` when none is left. Text that is not UTF-8 and
/// mentions our cookie cannot be filtered safely, so all of it is dropped (`None`).
fn cut_own_cookies(value: &[u8]) -> Option<Cow<'_, [u8]>> {
    if !mentions_own_cookie(value) {
        return Some(Cow::Borrowed(value));
    }
    let kept = without_own_cookies(std::str::from_utf8(value).ok()?)?;
    Some(Cow::Owned(kept.into_bytes()))
}

/// One `Cookie` value with wxgate's cookies cut out, the others kept in order; `None` when none is
/// left.
fn without_own_cookies(text: &str) -> Option<String> {
    let others: Vec<&str> = text
        .split(';')
        .map(str::trim)
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(n, _)| n).trim();
            !pair.is_empty() && !mentions_own_cookie(name.as_bytes())
        })
        .collect();
    (!others.is_empty()).then(|| others.join("; "))
}

/// `::ffff:1.2.3.4` is `1.2.3.4`: a dual-stack listener reports IPv4 clients that way.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rules(trusted: &[&str], allow_underscores: bool) -> HeaderRules {
        HeaderRules::new(
            [
                HeaderName::from_static("x-user-id"),
                HeaderName::from_static("x-wechat-appid"),
                HeaderName::from_static("x-wechat-openid"),
                HeaderName::from_static("x-wechat-unionid"),
            ],
            None,
            allow_underscores,
            trusted.iter().map(|t| t.parse().unwrap()).collect(),
        )
    }

    /// Identity header names the config accepts that are also names other rules know: a
    /// forwarding header and a non-standard hop-by-hop one, plus a phone header.
    fn colliding_rules(trusted: &[&str], allow_underscores: bool) -> HeaderRules {
        HeaderRules::new(
            [
                HeaderName::from_static("x-real-ip"),
                HeaderName::from_static("x-wechat-appid"),
                HeaderName::from_static("proxy-connection"),
                HeaderName::from_static("x-wechat-unionid"),
            ],
            Some(HeaderName::from_static("x-wechat-phone")),
            allow_underscores,
            trusted.iter().map(|t| t.parse().unwrap()).collect(),
        )
    }

    fn client(peer: &str) -> ClientInfo {
        ClientInfo::new(peer.parse().unwrap(), "http")
    }

    fn identity() -> Identity {
        Identity::new(
            "wx0123456789abcdef",
            crate::session::SessionIds {
                user_id: "u_1",
                openid: "oVBkZ0aYgDMDIywRdgPW8-joxXc4",
                unionid: None,
                phone: None,
            },
        )
        .unwrap()
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    proptest! {
        /// Two names fold to the same words exactly when `same_header` says they are the same,
        /// and the words note `_` and `.`.
        #[test]
        fn names_folded_eight_bytes_at_a_time_compare_as_same_header_says(
            canonical in "[a-z0-9-]{1,47}",
            changes in prop::collection::vec((any::<prop::sample::Index>(), 0u8..6), 0..4),
            other in "[!#$%&'*+.^_`|~0-9A-Za-z-]{1,47}",
        ) {
            // A spelling of the canonical name (some bytes in upper case, or `-` as `_` or `.`),
            // or, with a byte replaced, perhaps another name of the same length.
            let mut name = canonical.clone().into_bytes();
            for (at, how) in &changes {
                let i = at.index(name.len());
                if *how == 5 {
                    name[i] = b'Q';
                } else if name[i] == b'-' {
                    name[i] = [b'-', b'_', b'.', b'-', b'_'][usize::from(*how)];
                } else if *how > 2 {
                    name[i] = name[i].to_ascii_uppercase();
                }
            }
            let words = NameWords::of(canonical.as_bytes());
            for name in [&name[..], other.as_bytes()] {
                let spelling = (name.len() == canonical.len())
                    .then(|| spelling_of(name, &words))
                    .flatten();
                prop_assert_eq!(spelling.is_some(), same_header(name, &canonical));
                if let Some(spelling) = spelling {
                    prop_assert_eq!(spelling.underscore, name.contains(&b'_'));
                    prop_assert_eq!(spelling.dot, name.contains(&b'.'));
                }
            }
        }

        #[test]
        fn underscores_are_found_wherever_they_are(
            name in prop::collection::vec(prop_oneof![Just(b'_'), any::<u8>()], 0..40),
        ) {
            prop_assert_eq!(has_underscore(&name), name.contains(&b'_'));
        }
    }

    #[test]
    fn names_fold_case_underscore_and_dot() {
        for forged in [
            "X-User-Id",
            "x_user_id",
            "X.User.Id",
            "x-USER_id",
            "X_User.Id",
        ] {
            assert!(same_header(forged.as_bytes(), "x-user-id"), "{forged}");
        }
        assert!(!same_header(b"x-user-idx", "x-user-id"));
        assert!(!same_header(b"x-userid", "x-user-id"));
    }

    #[test]
    fn forged_identity_headers_are_removed_even_with_underscores_allowed() {
        for allow in [false, true] {
            let mut h = map(&[
                ("x-user-id", "admin"),
                ("x_user_id", "admin"),
                ("x.user.id", "admin"),
                ("x-wechat-unionid", "forged"),
                ("x-other", "kept"),
            ]);
            rules(&[], allow)
                .prepare_request(&mut h, None, &client("203.0.113.9"))
                .unwrap();
            assert!(
                !h.keys()
                    .any(|k| same_header(k.as_str().as_bytes(), "x-user-id")),
                "{h:?}"
            );
            assert!(!h.contains_key("x-wechat-unionid"));
            assert_eq!(h["x-other"], "kept");
        }
    }

    #[test]
    fn underscore_names_are_dropped_unless_allowed() {
        let mut h = map(&[("my_header", "v")]);
        rules(&[], false)
            .prepare_request(&mut h, None, &client("203.0.113.9"))
            .unwrap();
        assert!(!h.contains_key("my_header"));
        let mut h = map(&[("my_header", "v")]);
        rules(&[], true)
            .prepare_request(&mut h, None, &client("203.0.113.9"))
            .unwrap();
        assert_eq!(h["my_header"], "v");
    }

    #[test]
    fn identity_headers_are_ours_alone() {
        let mut h = map(&[("x-user-id", "admin"), ("x-wechat-unionid", "forged")]);
        rules(&[], false)
            .prepare_request(&mut h, Some(&identity()), &client("203.0.113.9"))
            .unwrap();
        assert_eq!(h.get_all("x-user-id").iter().collect::<Vec<_>>(), ["u_1"]);
        assert_eq!(h["x-wechat-openid"], "oVBkZ0aYgDMDIywRdgPW8-joxXc4");
        // No unionid known: the header is absent, not empty, and the forged one is gone.
        assert!(!h.contains_key("x-wechat-unionid"));
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic eA=="),
            ("x-end-to-end", "1"),
        ]);
        remove_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-end-to-end"]);
    }

    #[test]
    fn bearer_credentials_are_not_forwarded_but_other_schemes_are() {
        let mut h = map(&[("authorization", "Bearer eyJ.abc.def")]);
        rules(&[], false)
            .prepare_request(&mut h, None, &client("203.0.113.9"))
            .unwrap();
        assert!(!h.contains_key("authorization"));
        let mut h = map(&[("authorization", "Basic dXNlcjpwdw==")]);
        rules(&[], false)
            .prepare_request(&mut h, None, &client("203.0.113.9"))
            .unwrap();
        assert_eq!(h["authorization"], "Basic dXNlcjpwdw==");
    }

    #[test]
    fn own_cookies_are_not_forwarded_but_others_are() {
        let mut h = HeaderMap::new();
        for value in [
            "theme=dark; __Host-wxgate=eyJ.abc.def; lang=zh",
            "__Host-wxgate-state=abc",
            "__HOST-WXGATE=forged;cart=3",
            "only=this",
        ] {
            h.append(header::COOKIE, HeaderValue::from_static(value));
        }
        rules(&[], false)
            .prepare_request(&mut h, None, &client("203.0.113.9"))
            .unwrap();
        let cookies: Vec<&str> = h
            .get_all(header::COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(cookies, ["theme=dark; lang=zh", "cart=3", "only=this"]);
        let mut untouched = map(&[("cookie", "a=1;b=2")]);
        rules(&[], false)
            .prepare_request(&mut untouched, None, &client("203.0.113.9"))
            .unwrap();
        assert_eq!(untouched["cookie"], "a=1;b=2");
    }

    /// CI's proptest found the two forms disagreeing here: beside a `Cookie` naming ours, the text
    /// form dropped an empty `Cookie` and would have respaced `a=1;b=2`, which the map form keeps.
    /// A value that does not mention our cookies now passes as it came in both.
    #[test]
    fn cookies_beside_ours_pass_as_they_came_in_both_forms() {
        let pairs: Vec<(String, String)> = [
            ("cookie", ""),
            ("cookie", "a=1;b=2"),
            ("cookie", "x=1;__Host-wxgate=t"),
            ("cookie", "__Host-wxgate=only"),
            // Not ASCII, yet readable: filtered the same way in both.
            ("cookie", "name=王;__Host-wxgate=t"),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
        let (from_map, from_text) = both_forms(
            &rules(&[], false),
            &pairs,
            &[],
            None,
            &client("203.0.113.9"),
        );
        let cookies = |headers: Headers| -> Vec<String> {
            headers
                .into_iter()
                .filter(|(name, _)| name == "cookie")
                .map(|(_, value)| value)
                .collect()
        };
        let expected = ["", "a=1;b=2", "x=1", "name=王"];
        assert_eq!(cookies(from_map), expected);
        assert_eq!(cookies(from_text), expected);
    }

    #[test]
    fn forwarding_headers_from_untrusted_clients_are_replaced() {
        let mut h = map(&[
            ("host", "shop.example.com"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x_forwarded_for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
            ("x-real-ip", "1.2.3.4"),
            ("forwarded", "for=1.2.3.4"),
        ]);
        rules(&[], true)
            .prepare_request(&mut h, None, &client("203.0.113.9"))
            .unwrap();
        assert_eq!(h["x-forwarded-for"], "203.0.113.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "shop.example.com");
        assert!(!h.contains_key("x_forwarded_for"));
        assert!(!h.contains_key("x-real-ip"));
        assert!(!h.contains_key("forwarded"));
    }

    #[test]
    fn forwarding_headers_from_trusted_proxies_are_extended() {
        let mut h = map(&[
            ("host", "internal:8080"),
            ("x-forwarded-for", "198.51.100.7"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "shop.example.com"),
        ]);
        rules(&["10.0.0.0/8"], false)
            .prepare_request(&mut h, None, &client("::ffff:10.1.2.3"))
            .unwrap();
        assert_eq!(h["x-forwarded-for"], "198.51.100.7, 10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "shop.example.com");
    }

    /// Header names a forger would try: each identity header in every mix of case and separators,
    /// plus unrelated names.
    fn header_name() -> impl Strategy<Value = String> {
        let forged = prop::sample::select(vec![
            "x-user-id",
            "x-wechat-appid",
            "x-wechat-openid",
            "x-wechat-unionid",
        ])
        .prop_flat_map(|canonical| {
            let len = canonical.len();
            (
                Just(canonical),
                prop::collection::vec((any::<bool>(), 0u8..3), len),
            )
        })
        .prop_map(|(canonical, choices)| {
            canonical
                .chars()
                .zip(choices)
                .map(|(c, (upper, sep))| match (c, sep) {
                    ('-', 0) => '-',
                    ('-', 1) => '_',
                    ('-', _) => '.',
                    (c, _) if upper => c.to_ascii_uppercase(),
                    (c, _) => c,
                })
                .collect()
        });
        prop_oneof![forged, "[a-zA-Z][a-zA-Z0-9_.-]{0,20}"]
    }

    /// The headers `write_request_headers` writes, read back as (lower-case name, value) pairs.
    fn written(text: &[u8]) -> Vec<(String, String)> {
        std::str::from_utf8(text)
            .unwrap()
            .split("\r\n")
            .filter(|line| !line.is_empty())
            .map(|line| {
                let (name, value) = line.split_once(':').unwrap();
                (name.to_ascii_lowercase(), value.trim().to_owned())
            })
            .collect()
    }

    /// (lower-case name, value) pairs.
    type Headers = Vec<(String, String)>;

    /// The headers each form of `rules` sends the backend for a client's `pairs` (the head spelled
    /// by `spacing`, see [`head_lines`]): (the HeaderMap form's, the text form's), in order.
    fn both_forms(
        rules: &HeaderRules,
        pairs: &[(String, String)],
        spacing: &[u8],
        identity: Option<&Identity>,
        client: &ClientInfo,
    ) -> (Headers, Headers) {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value.trim().as_bytes()).unwrap(),
            );
        }
        rules.prepare_request(&mut map, identity, client).unwrap();
        let from_map = map
            .iter()
            .map(|(n, v)| {
                let value = std::str::from_utf8(v.as_bytes()).unwrap();
                (n.as_str().to_owned(), value.to_owned())
            })
            .collect();

        let (head, spans) = head_lines(pairs, spacing);
        let lines = HeadLines {
            text: &head,
            spans: &spans,
        };
        let mut survey = Survey::new();
        for (name, value) in lines.iter() {
            survey.look(name, value);
        }
        let mut text = Vec::new();
        rules
            .write_request_headers(&mut text, lines, &survey, identity, client, None)
            .unwrap();
        (from_map, written(&text))
    }

    /// `pairs` as the header lines of a request head, the way clients spell them: each line's
    /// whitespace after the colon and before its end is picked by `spacing`, and its line ends in
    /// CRLF or a bare LF (which httparse accepts, and a run of copied lines must not take in).
    /// Values are trimmed first, as httparse trims them.
    fn head_lines(pairs: &[(String, String)], spacing: &[u8]) -> (Vec<u8>, Vec<(Span, Span)>) {
        let mut text = b"GET / HTTP/1.1\r\n".to_vec();
        let mut spans = Vec::new();
        for (i, (name, value)) in pairs.iter().enumerate() {
            let style = spacing.get(i).copied().unwrap_or(0);
            let at = |text: &Vec<u8>| text.len() as u32;
            let name_start = at(&text);
            text.extend_from_slice(name.as_bytes());
            let name_end = at(&text);
            text.extend_from_slice([&b": "[..], b":", b":\t ", b": "][usize::from(style % 4)]);
            let value_start = at(&text);
            text.extend_from_slice(value.trim().as_bytes());
            let value_end = at(&text);
            let endings = [&b"\r\n"[..], b"\r\n", b" \r\n", b"\n", b" \n"];
            text.extend_from_slice(endings[usize::from(style / 4 % 5)]);
            spans.push(((name_start, name_end), (value_start, value_end)));
        }
        text.extend_from_slice(b"\r\n");
        (text, spans)
    }

    /// A name from the set the rules care about, in any case and spelling, or any other name.
    fn any_header_name() -> impl Strategy<Value = String> {
        let special = prop::sample::select(vec![
            "connection",
            "keep-alive",
            "upgrade",
            "te",
            "authorization",
            "cookie",
            "host",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "forwarded",
            "x-real-ip",
            "x-secret-hop",
            "proxy-authorization",
            "proxy-connection",
            "proxy_connection",
            "x.real.ip",
            "x-wechat-phone",
            "x-user-id",
            "x_user_id",
            "x.wechat.openid",
            "x-wechat-appid",
            "x-wechat-unionid",
            "x_forwarded_for",
            "_x-user-id",
            "user-agent",
            "accept",
        ])
        .prop_flat_map(|name| (Just(name), prop::collection::vec(any::<bool>(), name.len())))
        .prop_map(|(name, upper)| {
            name.chars()
                .zip(upper)
                .map(|(c, u)| if u { c.to_ascii_uppercase() } else { c })
                .collect()
        });
        prop_oneof![header_name(), special]
    }

    fn any_header_value() -> impl Strategy<Value = String> {
        prop_oneof![
            "[ -~]{0,20}",
            Just("Bearer abc.def.ghi".to_owned()),
            Just("Basic dXNlcjpwdw==".to_owned()),
            Just("keep-alive, x-secret-hop".to_owned()),
            Just("theme=dark; __Host-wxgate=abc; lang=zh".to_owned()),
            Just("__Host-wxgate-state=s".to_owned()),
            Just("198.51.100.7".to_owned()),
        ]
    }

    #[test]
    fn an_identity_value_that_cannot_be_a_header_value_fails_both_forms() {
        let rules = rules(&[], false);
        let client = client("203.0.113.9");
        for (user_id, ok) in [
            ("u_1", true),
            ("u 1\t", true),
            ("u\r\nx-admin: 1", false),
            ("u\u{7f}", false),
            ("u\u{0}", false),
        ] {
            let identity = Identity::new(
                "wx0123456789abcdef",
                crate::session::SessionIds {
                    user_id,
                    openid: "oVBkZ0aYgDMDIywRdgPW8-joxXc4",
                    unionid: None,
                    phone: None,
                },
            )
            .unwrap();
            let mut text = Vec::new();
            let lines = HeadLines {
                text: b"",
                spans: &[],
            };
            let written = rules.write_request_headers(
                &mut text,
                lines,
                &Survey::new(),
                Some(&identity),
                &client,
                None,
            );
            let mut map = HeaderMap::new();
            let inserted = rules.prepare_request(&mut map, Some(&identity), &client);
            assert_eq!((written.is_ok(), inserted.is_ok()), (ok, ok), "{user_id:?}");
        }
    }

    proptest! {
        // Cheap (0.1 ms a case), and a disagreement can hide in a rare pairing of headers: CI
        // found one at the default 256 cases.
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// The fast lane's text form of the rules and the HeaderMap form send the backend the same
        /// headers, whatever the client sent, trusted or not.
        #[test]
        fn both_forms_of_the_rules_send_the_same_headers(
            pairs in prop::collection::vec((any_header_name(), any_header_value()), 0..16),
            spacing in prop::collection::vec(0u8..20, 16),
            allow_underscores in any::<bool>(),
            trusted in any::<bool>(),
            with_identity in any::<bool>(),
        ) {
            let rules = rules(if trusted { &["203.0.113.0/24"] } else { &[] }, allow_underscores);
            let client = client("203.0.113.9");
            let id = identity();
            let identity = with_identity.then_some(&id);
            let (mut from_map, mut from_text) =
                both_forms(&rules, &pairs, &spacing, identity, &client);
            from_map.sort();
            from_text.sort();
            prop_assert_eq!(from_text, from_map);
        }
    }

    proptest! {
        /// The shortcut for names no rule mentions decides exactly as every rule in turn does.
        #[test]
        fn the_fate_shortcut_agrees_with_every_rule(
            pairs in prop::collection::vec((any_header_name(), any_header_value()), 0..8),
            name in any_header_name(),
            allow_underscores in any::<bool>(),
            trusted in any::<bool>(),
            colliding in any::<bool>(),
        ) {
            let rules = match colliding {
                true => colliding_rules(&[], allow_underscores),
                false => rules(&[], allow_underscores),
            };
            let mut survey = Survey::new();
            for (name, value) in &pairs {
                survey.look(name.as_bytes(), value.as_bytes());
            }
            // The fates that matter are those of the request's own headers.
            for name in pairs.iter().map(|(n, _)| n).chain([&name]) {
                prop_assert_eq!(
                    rules.fate(name.as_bytes(), &survey, trusted),
                    rules.fate_by_every_rule(name.as_bytes(), &survey, trusted),
                    "{}", name
                );
            }
        }
    }

    proptest! {
        #[test]
        fn no_client_value_for_an_identity_header_reaches_the_backend(
            pairs in prop::collection::vec((header_name(), "[ -~]{0,30}"), 0..20),
            allow_underscores in any::<bool>(),
            with_identity in any::<bool>(),
        ) {
            let mut h = HeaderMap::new();
            for (name, value) in &pairs {
                h.append(
                    HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_str(value).unwrap(),
                );
            }
            let id = identity();
            rules(&[], allow_underscores)
                .prepare_request(&mut h, with_identity.then_some(&id), &client("203.0.113.9"))
                .unwrap();
            for canonical in ["x-user-id", "x-wechat-appid", "x-wechat-openid", "x-wechat-unionid"] {
                let present: Vec<(&HeaderName, &HeaderValue)> =
                    h.iter().filter(|(k, _)| same_header(k.as_str().as_bytes(), canonical)).collect();
                let expected: Vec<&str> = match (with_identity, canonical) {
                    (false, _) | (true, "x-wechat-unionid") => vec![],
                    (true, "x-user-id") => vec!["u_1"],
                    (true, "x-wechat-appid") => vec!["wx0123456789abcdef"],
                    (true, _) => vec!["oVBkZ0aYgDMDIywRdgPW8-joxXc4"],
                };
                let got: Vec<&str> = present.iter().map(|(_, v)| v.to_str().unwrap()).collect();
                prop_assert_eq!(got, expected);
                for (name, _) in present {
                    prop_assert_eq!(name.as_str(), canonical);
                }
            }
            if !allow_underscores {
                prop_assert!(!h.keys().any(|k| k.as_str().contains('_')));
            }
        }
    }
}
