package tokenmgr

import (
	"encoding/base64"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"golang.org/x/oauth2"
)

// Status values stored in the record's "status" field.
const (
	StatusOK             = "ok"
	StatusReauthRequired = "reauth_required"
)

// record is one grant's hash in Redis, decoded. Tokens are secrets: printing
// a record never prints them.
type record struct {
	V int64
	// Family names the token family, one per consent: set by a seed,
	// carried by every rotation, checked by every fenced write. It starts
	// with the seed's time (unix ms on the Redis server's clock), so records
	// of two families are ordered even when the record was lost in between
	// and versions start again at 1 (invariant 9). "" for records written
	// before families existed: the oldest family.
	Family         string
	Status         string
	Reason         string
	AccessToken    secret
	RefreshToken   secret
	TokenType      string
	Expiry         time.Time // zero: the token does not expire
	Scope          string
	RotatedAt      time.Time
	RotatedBy      string
	RefreshCount   int64
	IdleExpiry     time.Time
	AbsoluteExpiry time.Time
	RetryAt        time.Time // fleet-wide backoff after a transient provider error
	Restored       bool
	// Refused is set by a dead mark: the provider refused this family's
	// refresh token, so it may have revoked the family. No pair of the
	// family is live after it, whatever its version: a pair a process
	// held from before a failover rolled the record back never overwrites
	// the mark (invariant 10); only a seed, a new family, revives the grant.
	Refused bool
	// Forced401 is set when this version was produced by a refresh that a
	// 401 forced: the 401's reason (its WWW-Authenticate challenge). A 401
	// with the same reason on this version is the API's answer, not a
	// stale token, and rotates nothing (transport.go).
	Forced401 string
	// hasRefresh reports a non-empty refresh_token field, known even when
	// only metadata was decoded.
	hasRefresh bool
}

// Field names of the record hash. Documented in the README.
const (
	fV, fStatus, fReason            = "v", "status", "reason"
	fAccess, fRefresh, fType        = "access_token", "refresh_token", "token_type"
	fExpiry, fScope                 = "expiry", "scope"
	fRotatedAt, fRotatedBy, fCount  = "rotated_at", "rotated_by", "refresh_count"
	fIdleExpiry, fAbsExpiry, fRetry = "idle_expiry", "absolute_expiry", "retry_at"
	fRestored, fFamily, fForced401  = "restored", "family", "forced_401"
	// fUncounted: the last rotation was refused by the rotations set (an
	// old ACL), so the last hour's count is unknown. Cleared by a counted
	// rotation or a seed.
	fUncounted = "rotations_untracked"
	// fRefused: a dead mark (the provider refused the refresh token), as
	// opposed to an answer declared lost. See record.Refused.
	fRefused = "refused"
)

// Layout says where a record's sealed tokens live (Options.Layout).
type Layout int

const (
	// LayoutHash: the sealed tokens are fields of the record hash,
	// tm:{GRANT}:tok, as in every release before LayoutPair. Default.
	LayoutHash Layout = iota
	// LayoutPair: the sealed pair is a string of its own, tm:{GRANT}:pair,
	// and the record hash holds only the plain metadata. A sealed token is
	// longer than Redis's hash-max-listpack-value (64 B by default), so in
	// the hash it turns the whole record into a hashtable; without the
	// tokens the hash stays a listpack: about half the memory per grant
	// (BENCHMARKS.md, figure 8). Every release since LayoutPair reads both
	// layouts; set it only when no process of an older release is left, as
	// those read the tokens from the hash alone.
	LayoutPair
)

// String is the layout's name, as --layout takes it and the scripts are
// told it (scripts/record.lua).
func (l Layout) String() string {
	switch l {
	case LayoutHash:
		return "hash"
	case LayoutPair:
		return "pair"
	}
	return "Layout(" + strconv.Itoa(int(l)) + ")"
}

// fPair is the field CorruptRecordError names for a LayoutPair record's
// pair key; fTokens for a live record whose tokens are in neither layout.
const fPair, fTokens = "pair", "tokens"

// splitPair parses a pair key's value, "LEN:ACCESSREFRESH" with LEN the
// sealed access token's length in bytes (written by scripts/record.lua).
// Sealed values never hold a space, but the length keeps the format
// unambiguous whatever a Sealer writes. The error never quotes the value:
// with AllowPlaintext it is the tokens in clear.
func splitPair(pair string) (access, refresh string, err error) {
	lenText, rest, ok := strings.Cut(pair, ":")
	n, perr := strconv.Atoi(lenText)
	if !ok || perr != nil || n < 1 || n > len(rest) || len(lenText) > 6 || lenText[0] == '+' || lenText[0] == '-' {
		return "", "", fmt.Errorf("want LEN:ACCESSREFRESH (LEN the sealed access token's length), have %d bytes that do not parse so", len(pair))
	}
	return rest[:n], rest[n:], nil
}

// tokensLostError is a live record with no tokens in either layout: its
// pair key was lost (an eviction, a mistaken DEL, a copy of the hash
// alone) or its token fields deleted. It carries the record's metadata: a
// process holding the pair of this version, or a newer one, puts it back
// (refresh.go, readLease); to everyone else it is a corrupt record.
type tokensLostError struct{ meta *record }

func (*tokensLostError) Error() string {
	return "no tokens: neither access_token and refresh_token fields nor a pair key (lost: a process holding this version's pair puts it back)"
}

// withPair puts a LayoutPair record's sealed tokens, read from its pair
// key, where decodeRecord looks for them; unusable is a pair key that
// exists and holds no pair (empty, or of another type: an operator's
// mistake). Token fields in the hash win: a process of a release before
// LayoutPair wrote them last, knowing nothing of the pair key (every
// writer of this one clears the copy it does not write,
// scripts/record.lua). A damaged pair key does not hide a dead grant's
// status, whose tokens nobody needs.
func withPair(grant string, h map[string]string, pair string, unusable bool) error {
	if len(h) == 0 {
		return nil // a pair key without a record is no record
	}
	if _, ok := h[fAccess]; ok {
		return nil
	}
	if _, ok := h[fRefresh]; ok {
		return nil
	}
	if pair == "" && !unusable {
		if h[fStatus] != StatusOK {
			return nil // a dead grant's tokens are not needed
		}
		meta, err := decodeRecord(grant, h, nil)
		if err != nil {
			return err
		}
		return &CorruptRecordError{Grant: grant, Field: fTokens, Err: &tokensLostError{meta: meta}}
	}
	at, rt, err := splitPair(pair)
	if unusable {
		err = errors.New("empty, or not a string")
	}
	if err != nil {
		if h[fStatus] == StatusReauthRequired {
			return nil
		}
		return &CorruptRecordError{Grant: grant, Field: fPair, Err: err}
	}
	h[fAccess], h[fRefresh] = at, rt
	return nil
}

// recordFromToken is the part of a record that a provider's token gives,
// shared by a seed and a refresh: the pair, its type (Bearer when the
// provider says nothing), scope, and who wrote it when. Expiry is the
// token's own; the caller decides the version and the countdowns.
func recordFromToken(tok *oauth2.Token, now time.Time, by string, p Provider) *record {
	rec := &record{
		Status:       StatusOK,
		AccessToken:  secret(tok.AccessToken),
		RefreshToken: secret(tok.RefreshToken),
		TokenType:    tok.TokenType,
		Expiry:       tok.Expiry,
		RotatedAt:    now,
		RotatedBy:    by,
	}
	if rec.TokenType == "" {
		rec.TokenType = "Bearer"
	}
	if s, ok := tok.Extra("scope").(string); ok {
		rec.Scope = s
	}
	if p.IdleExpiry > 0 {
		rec.IdleExpiry = now.Add(p.IdleExpiry)
	}
	return rec
}

// token returns the pair as an *oauth2.Token. The result is shared by every
// caller and must not be modified.
func (r *record) token() *oauth2.Token {
	t := &oauth2.Token{
		AccessToken:  string(r.AccessToken),
		TokenType:    r.TokenType,
		RefreshToken: string(r.RefreshToken),
		Expiry:       r.Expiry,
	}
	if r.Scope != "" {
		t = t.WithExtra(map[string]any{"scope": r.Scope})
	}
	return t
}

// fields encodes the record for HSET, without "v" (the scripts own it) and
// without refresh_count (HINCRBY owns it). Times are unix milliseconds, so
// redis-cli shows numbers an operator can compare; empty means unset.
func (r *record) fields(grant string, s Sealer) ([]any, error) {
	at, err := s.Seal(grant, boundField(fAccess, r.Family, r.V), []byte(r.AccessToken))
	if err != nil {
		return nil, fmt.Errorf("seal %s: %w", fAccess, err)
	}
	rt, err := s.Seal(grant, boundField(fRefresh, r.Family, r.V), []byte(r.RefreshToken))
	if err != nil {
		return nil, fmt.Errorf("seal %s: %w", fRefresh, err)
	}
	status := r.Status
	if status == "" {
		status = StatusOK
	}
	return []any{
		fStatus, status,
		fAccess, at,
		fRefresh, rt,
		fType, r.TokenType,
		fExpiry, msString(r.Expiry),
		fScope, r.Scope,
		fRotatedAt, msString(r.RotatedAt),
		fRotatedBy, r.RotatedBy,
		fIdleExpiry, msString(r.IdleExpiry),
		fAbsExpiry, msString(r.AbsoluteExpiry),
		fFamily, r.Family,
		fForced401, r.Forced401,
	}, nil
}

// messagePrefix marks a rotation message that carries its record:
// "GRANT V m1 RECORD", RECORD the record's fields as stored, tokens sealed,
// each as NAME=LEN:VALUE (LEN the value's length in bytes), one after the
// other. Subscribers install it without reading Redis; the format is plain
// to parse, since every process of a fleet decodes every message it hears.
// Messages without it ("GRANT V", from older writers) make them read.
const messagePrefix = "m1 "

// message is the rotation message announcing rec (its version and fields,
// fields as rec.fields encoded them).
func message(grant string, rec *record, fields []any) (string, error) {
	var b strings.Builder
	b.Grow(512)
	b.WriteString(grant)
	b.WriteByte(' ')
	b.WriteString(strconv.FormatInt(rec.V, 10))
	b.WriteByte(' ')
	b.WriteString(messagePrefix)
	put := func(name, value string) {
		b.WriteString(name)
		b.WriteByte('=')
		b.WriteString(strconv.Itoa(len(value)))
		b.WriteByte(':')
		b.WriteString(value)
	}
	put(fV, strconv.FormatInt(rec.V, 10))
	if rec.RefreshCount > 0 {
		put(fCount, strconv.FormatInt(rec.RefreshCount, 10))
	}
	for i := 0; i+1 < len(fields); i += 2 {
		name, _ := fields[i].(string)
		value, _ := fields[i+1].(string)
		if value != "" {
			put(name, value)
		}
	}
	return b.String(), nil
}

// decodeMessage opens the record a rotation message carries.
func decodeMessage(grant, body string, s Sealer) (*record, error) {
	h := make(map[string]string, 16)
	for body != "" {
		name, rest, ok := strings.Cut(body, "=")
		if !ok {
			return nil, &CorruptRecordError{Grant: grant, Field: "message", Err: errors.New("want NAME=LEN:VALUE")}
		}
		lenText, rest, ok := strings.Cut(rest, ":")
		n, err := strconv.Atoi(lenText)
		if !ok || err != nil || n < 0 || n > len(rest) {
			return nil, &CorruptRecordError{Grant: grant, Field: "message", Err: errors.New("want NAME=LEN:VALUE")}
		}
		h[name], body = rest[:n], rest[n:]
	}
	return decodeRecord(grant, h, s)
}

// familyEpoch is when a family was seeded (unix ms), read from its name;
// 0 for the unnamed family of records from before families existed.
func familyEpoch(family string) int64 {
	ms, _, _ := strings.Cut(family, ".")
	n, err := strconv.ParseInt(ms, 10, 64)
	if err != nil || n < 0 {
		return 0
	}
	return n
}

// newerThan orders two records of one grant: by family (the later seed
// wins), then a dead mark before any pair of its family, then by version.
// A process holding a record newer than the stored one knows the store went
// back in time (invariant 9).
func (r *record) newerThan(o *record) bool {
	if r.Family != o.Family {
		re, oe := familyEpoch(r.Family), familyEpoch(o.Family)
		if re != oe {
			return re > oe
		}
		return r.Family > o.Family
	}
	if r.Refused != o.Refused {
		return r.Refused // a dead mark ends its family (see Refused)
	}
	return r.V > o.V
}

// validFamily: "" (records from before families), or "EPOCHMS.HEX".
func validFamily(f string) bool {
	if f == "" {
		return true
	}
	ms, id, ok := strings.Cut(f, ".")
	if !ok || len(ms) == 0 || len(ms) > 16 || len(id) == 0 || len(id) > 32 {
		return false
	}
	for _, c := range ms {
		if c < '0' || c > '9' {
			return false
		}
	}
	for _, c := range id {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// CorruptRecordError reports a record that cannot be decoded: an operator's
// mistaken HSET, a truncated value, a value sealed with an unknown key. The
// record is left as it is; nothing overwrites it blindly.
type CorruptRecordError struct {
	Grant string
	Field string
	Err   error
}

func (e *CorruptRecordError) Error() string {
	return fmt.Sprintf("tokenmgr: record of grant %q is corrupt: field %s: %v", e.Grant, e.Field, e.Err)
}

func (e *CorruptRecordError) Unwrap() error { return e.Err }

// decodeRecord parses an HGETALL reply. An empty map means the record does
// not exist; the caller checks that first. With a nil Sealer only the
// metadata is decoded (for status displays, which need no key).
func decodeRecord(grant string, h map[string]string, s Sealer) (*record, error) {
	bad := func(field string, err error) error { return &CorruptRecordError{Grant: grant, Field: field, Err: err} }
	r := &record{Status: h[fStatus], Reason: h[fReason], TokenType: h[fType], Scope: h[fScope], RotatedBy: h[fRotatedBy],
		Family: h[fFamily], Forced401: h[fForced401]}
	var err error
	if r.V, err = strconv.ParseInt(h[fV], 10, 64); err != nil || r.V < 1 {
		return nil, bad(fV, fmt.Errorf("want a positive integer, have %s", quoted(h[fV])))
	}
	if r.TokenType != "" {
		if err := checkTokenType(r.TokenType); err != nil {
			return nil, bad(fType, err)
		}
	}
	if !validFamily(r.Family) {
		return nil, bad(fFamily, fmt.Errorf("want EPOCHMS.HEX, have %s", quoted(r.Family)))
	}
	switch r.Status {
	case StatusOK, StatusReauthRequired:
	default:
		return nil, bad(fStatus, fmt.Errorf("want %q or %q, have %s", StatusOK, StatusReauthRequired, quoted(r.Status)))
	}
	for _, f := range []struct {
		name string
		dst  *time.Time
	}{{fExpiry, &r.Expiry}, {fRotatedAt, &r.RotatedAt}, {fIdleExpiry, &r.IdleExpiry}, {fAbsExpiry, &r.AbsoluteExpiry}, {fRetry, &r.RetryAt}} {
		if *f.dst, err = parseMS(h[f.name]); err != nil {
			return nil, bad(f.name, err)
		}
	}
	if c := h[fCount]; c != "" {
		if r.RefreshCount, err = strconv.ParseInt(c, 10, 64); err != nil {
			return nil, bad(fCount, fmt.Errorf("want an integer, have %s", quoted(c)))
		}
	}
	r.Restored = h[fRestored] == "1"
	r.Refused = h[fRefused] == "1"
	r.hasRefresh = !sealedEmpty(h[fRefresh])
	if s == nil {
		return r, nil // metadata only: no key needed
	}
	if r.Status == StatusReauthRequired {
		// A dead grant's tokens are not needed to fail fast; do not let a
		// damaged token field hide the reason.
		return r, nil
	}
	at, err := openBound(s, grant, fAccess, r.Family, r.V, h[fAccess])
	if err != nil {
		return nil, bad(fAccess, err)
	}
	rt, err := openBound(s, grant, fRefresh, r.Family, r.V, h[fRefresh])
	if err != nil {
		return nil, bad(fRefresh, err)
	}
	if err := checkAccessToken(string(at)); err != nil {
		return nil, bad(fAccess, err)
	}
	r.AccessToken, r.RefreshToken = secret(at), secret(rt)
	return r, nil
}

// boundField is what a token value is sealed for: its field, and the
// family and version of the record it belongs to, so that an older sealed
// value copied back into a newer record does not open (its spent refresh
// token is never presented).
func boundField(field, family string, v int64) string {
	return field + "@" + family + "/" + strconv.FormatInt(v, 10)
}

// openBound opens a token value of the record at (family, v). Records from
// before families (family "") may still hold values sealed for the field
// alone, which they accept until a rotation rewrites them.
func openBound(s Sealer, grant, field, family string, v int64, stored string) ([]byte, error) {
	pt, err := s.Open(grant, boundField(field, family, v), stored)
	if err != nil && family == "" {
		if legacy, lerr := s.Open(grant, field, stored); lerr == nil {
			return legacy, nil
		}
	}
	return pt, err
}

// maxTokenBytes bounds an access token: it goes into a header.
const maxTokenBytes = 16 << 10

// checkAccessToken checks that an access token can go into an
// Authorization header as a bearer token (RFC 6750 section 2.1, b64token):
// one with a line break would make every request fail locally.
func checkAccessToken(at string) error {
	if at == "" {
		return errors.New("empty")
	}
	if len(at) > maxTokenBytes {
		return fmt.Errorf("%d bytes, more than %d", len(at), maxTokenBytes)
	}
	body := strings.TrimRight(at, "=")
	if body == "" {
		return errors.New("not a bearer token (RFC 6750 b64token)")
	}
	for _, c := range []byte(body) {
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("-._~+/", c) >= 0) {
			return errors.New("not a bearer token (RFC 6750 b64token): it holds a character an Authorization header cannot carry")
		}
	}
	return nil
}

// checkTokenType accepts the token types the Manager can send: Bearer.
func checkTokenType(tt string) error {
	if !strings.EqualFold(tt, "bearer") {
		return fmt.Errorf("token type %s: only Bearer tokens are supported", quoted(tt))
	}
	return nil
}

func msString(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return strconv.FormatInt(t.UnixMilli(), 10)
}

func parseMS(s string) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	ms, err := strconv.ParseInt(s, 10, 64)
	if err != nil || ms < 0 {
		return time.Time{}, fmt.Errorf("want unix milliseconds, have %s", quoted(s))
	}
	return time.UnixMilli(ms), nil
}

// sealedEmpty reports, without a key, whether a stored token value holds
// the empty string: "" or "plain:" or a ciphertext of nothing (nonce and
// tag only).
func sealedEmpty(stored string) bool {
	if stored == "" || stored == plainPrefix {
		return true
	}
	if rest, ok := strings.CutPrefix(stored, encPrefix); ok {
		if _, b64, ok := strings.Cut(rest, ":"); ok {
			return base64.RawURLEncoding.DecodedLen(len(b64)) <= 12+16
		}
	}
	return false
}
