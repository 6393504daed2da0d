package tokenmgrtest

import (
	"crypto/rand"
	"encoding/base64"
	"net/http"
	"sync"
	"time"

	"golang.org/x/oauth2"
)

// Config configures an IdP. Zero fields take the documented defaults.
type Config struct {
	// Profile selects the rotation semantics. The zero Profile does not
	// rotate and answers invalid_grant with 400.
	Profile Profile
	// ClientID is the only client the IdP knows. Default "client-id".
	ClientID string
	// ClientSecret is that client's secret. Default "client-secret".
	ClientSecret string
	// AuthStyle is the client-authentication style the token endpoint
	// requires: oauth2.AuthStyleInHeader or oauth2.AuthStyleInParams. A
	// request in the other style gets 401 invalid_client, which makes
	// x/oauth2's auto-detection retry and present the refresh token twice.
	// oauth2.AuthStyleAutoDetect (0) accepts either style.
	AuthStyle oauth2.AuthStyle
	// AccessTTL is the lifetime of access tokens. Default 1h.
	AccessTTL time.Duration
	// Now is the clock for all expiry and leeway decisions. Default time.Now.
	Now func() time.Time
	// ConsentPage makes GET /authorize answer with an HTML consent page
	// (buttons #allow and #deny, POSTing back to /authorize) instead of
	// consenting at once, so browser tests can walk the consent step as a
	// user would. Off, plain HTTP clients get the code from one redirect.
	ConsentPage bool
}

// Stats counts what the IdP has seen since it started.
type Stats struct {
	RefreshOK         int64 `json:"refresh_ok"`          // refresh grants answered with tokens (rotations, replays, non-rotating refreshes)
	RefreshFailed     int64 `json:"refresh_failed"`      // refresh grants answered with an OAuth error (not counting injected faults)
	ReuseDetected     int64 `json:"reuse_detected"`      // a retired refresh token of a live family was presented
	FamiliesRevoked   int64 `json:"families_revoked"`    // families revoked because of reuse
	AuthCodeExchanges int64 `json:"auth_code_exchanges"` // successful authorization_code grants
	API200            int64 `json:"api_200"`             // API calls with a valid access token
	API401            int64 `json:"api_401"`             // API calls rejected as unauthorized
	Rotations         int64 `json:"rotations"`           // refreshes that produced a new refresh token
	Dropped           int64 `json:"dropped"`             // token responses dropped by DropResponses
	Injected5xx       int64 `json:"injected_5xx"`        // 503 answers injected by Fail5xx
	Injected429       int64 `json:"injected_429"`        // 429 answers injected by Fail429
	InjectedBusy      int64 `json:"injected_busy"`       // 400 invalid_request answers injected by FailBusy
}

// IdP is a fake identity provider. It implements http.Handler and is safe for
// concurrent use.
type IdP struct {
	cfg Config // immutable after New, except cfg.Now, which is guarded by mu
	mux *http.ServeMux

	mu          sync.Mutex // guards every field below, and cfg.Now
	latency     time.Duration
	answerDelay time.Duration // after processing, before answering
	fail5xx     int
	fail429     int
	failBusy    int
	retryAfter  time.Duration
	drop        int
	challenge   string // non-empty: the API answers every request 401 with this WWW-Authenticate
	stats       Stats
	families    map[string]*family      // by family id
	refresh     map[string]*family      // every refresh token ever issued -> its family
	access      map[string]*accessToken // every access token ever issued
	codes       map[string]*authCode    // unused authorization codes
	issued      []string                // every access and refresh token, in issue order
}

// family is one grant: the chain of refresh tokens descending from one
// consent. Reuse of a retired member can revoke all of it.
type family struct {
	id        string
	scope     string
	current   string         // refresh token that rotates on the next refresh
	previous  string         // refresh token retired by the last rotation; "" if none
	rotatedAt time.Time      // when previous was retired
	revoked   bool           // reuse detected: every token of the family is dead
	ats       []*accessToken // access tokens not yet scheduled for revocation
}

type accessToken struct {
	fam      *family
	expiry   time.Time
	revokeAt time.Time // zero: not revoked; else dead from this instant on
}

type authCode struct {
	redirectURI string
	scope       string
	challenge   string
	method      string
	expiry      time.Time
}

// New returns an IdP handler. Serve it yourself, or use NewServer.
func New(cfg Config) *IdP {
	if cfg.ClientID == "" {
		cfg.ClientID = "client-id"
	}
	if cfg.ClientSecret == "" {
		cfg.ClientSecret = "client-secret"
	}
	if cfg.AccessTTL <= 0 {
		cfg.AccessTTL = time.Hour
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Profile.InvalidGrantStatus == 0 {
		cfg.Profile.InvalidGrantStatus = http.StatusBadRequest
	}
	p := &IdP{
		cfg:      cfg,
		families: make(map[string]*family),
		refresh:  make(map[string]*family),
		access:   make(map[string]*accessToken),
		codes:    make(map[string]*authCode),
	}
	p.mux = p.routes()
	return p
}

// Stats returns a snapshot of the counters.
func (p *IdP) Stats() Stats {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stats
}

// NewGrant creates a token family as if a user had consented, without the
// authorization-code round trip, and returns its first token pair.
func (p *IdP) NewGrant(scope string) *oauth2.Token {
	p.mu.Lock()
	defer p.mu.Unlock()
	fam := p.newFamilyLocked(scope)
	at, exp := p.issueAccessLocked(fam)
	return (&oauth2.Token{
		AccessToken:  at,
		TokenType:    "Bearer",
		RefreshToken: fam.current,
		Expiry:       exp,
		ExpiresIn:    int64(p.cfg.AccessTTL / time.Second),
	}).WithExtra(map[string]any{"scope": scope})
}

// IssuedTokens returns every access and refresh token ever issued, so tests
// can assert that none of them leaked into logs or errors.
func (p *IdP) IssuedTokens() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.issued...)
}

// AccessTokenValid reports whether at would be accepted by the API now.
func (p *IdP) AccessTokenValid(at string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.accessValidLocked(at)
}

// FamilyRevoked reports whether the family that issued the given refresh or
// access token was revoked. Unknown tokens report false.
func (p *IdP) FamilyRevoked(refreshOrAccessToken string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if fam, ok := p.refresh[refreshOrAccessToken]; ok {
		return fam.revoked
	}
	if a, ok := p.access[refreshOrAccessToken]; ok {
		return a.fam.revoked
	}
	return false
}

// SetLatency delays every subsequent token-endpoint answer by d. The delay
// happens before the request is processed, so a client that gives up during
// it changes no state.
func (p *IdP) SetLatency(d time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.latency = d
}

// SetAnswerDelay delays every token-endpoint answer after the request was
// processed (a rotation has already happened): a client killed meanwhile
// has spent its refresh token without receiving the new one.
func (p *IdP) SetAnswerDelay(d time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.answerDelay = d
}

// Fail5xx makes the next n refresh requests answer 503
// temporarily_unavailable without touching any token.
func (p *IdP) Fail5xx(n int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.fail5xx = n
}

// FailBusy makes the next n refresh requests answer 400 invalid_request
// "multiple concurrent requests using the same token; please retry",
// without touching any token: what Ory Hydra answers under database
// contention. A retry with the same refresh token succeeds.
func (p *IdP) FailBusy(n int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.failBusy = n
}

// Fail429 makes the next n refresh requests answer 429 rate_limited with a
// Retry-After of retryAfter (whole seconds, rounded up), without touching any
// token. Pending Fail5xx answers are served first.
func (p *IdP) Fail429(n int, retryAfter time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.fail429 = n
	p.retryAfter = retryAfter
}

// DropResponses makes the next n refresh requests take full effect (a
// rotation happens and is counted) and then closes the connection without
// answering: the lost-response case a token manager must recover from.
func (p *IdP) DropResponses(n int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.drop = n
}

// SetAPIChallenge makes the Jira-like API answer every request 401 with
// this WWW-Authenticate challenge, valid token or not, until it is set to
// "": an API that rejects for a reason no refresh cures, as Jira does for
// a missing scope (`Bearer error="invalid_token", error_description="scope
// does not match"`) or as RFC 6750 says with error="insufficient_scope".
func (p *IdP) SetAPIChallenge(wwwAuthenticate string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.challenge = wwwAuthenticate
}

// SetClock replaces the clock used for all expiry and leeway decisions.
func (p *IdP) SetClock(now func() time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cfg.Now = now
}

func (p *IdP) nowLocked() time.Time { return p.cfg.Now() }

func (p *IdP) newFamilyLocked(scope string) *family {
	fam := &family{id: "fam-" + randomString(16), scope: scope}
	fam.current = p.issueRefreshLocked(fam)
	p.families[fam.id] = fam
	return fam
}

func (p *IdP) issueRefreshLocked(fam *family) string {
	rt := "fake-rt-" + randomString(32)
	p.refresh[rt] = fam
	p.issued = append(p.issued, rt)
	return rt
}

func (p *IdP) issueAccessLocked(fam *family) (string, time.Time) {
	at := "fake-at-" + randomString(32)
	a := &accessToken{fam: fam, expiry: p.nowLocked().Add(p.cfg.AccessTTL)}
	p.access[at] = a
	fam.ats = append(fam.ats, a)
	p.issued = append(p.issued, at)
	return at, a.expiry
}

func (p *IdP) accessValidLocked(at string) bool {
	a, ok := p.access[at]
	if !ok || a.fam.revoked {
		return false
	}
	now := p.nowLocked()
	if !now.Before(a.expiry) {
		return false
	}
	return a.revokeAt.IsZero() || now.Before(a.revokeAt)
}

// refreshOutcome is the result of applying the refresh rules to one token.
type refreshOutcome int

const (
	refreshRotated refreshOutcome = iota
	refreshKept                   // non-rotating profile: same refresh token
	refreshReplay                 // previous token inside the leeway
	refreshReuse                  // retired token outside the leeway
	refreshUnknown                // never issued, or family revoked
)

// refreshLocked applies the rotation rules to rt. On success it returns the
// new access token, its expiry and the family's current refresh token.
func (p *IdP) refreshLocked(rt string) (out refreshOutcome, fam *family, at string, exp time.Time) {
	fam, ok := p.refresh[rt]
	if !ok || fam.revoked {
		p.stats.RefreshFailed++
		return refreshUnknown, nil, "", time.Time{}
	}
	now := p.nowLocked()
	prof := p.cfg.Profile
	switch {
	case rt == fam.current && !prof.Rotates:
		out = refreshKept
	case rt == fam.current:
		p.revokeOldAccessLocked(fam, now)
		fam.previous, fam.rotatedAt = fam.current, now
		fam.current = p.issueRefreshLocked(fam)
		p.stats.Rotations++
		out = refreshRotated
	case rt == fam.previous && now.Before(fam.rotatedAt.Add(prof.ReuseLeeway)):
		out = refreshReplay
	default:
		p.stats.ReuseDetected++
		p.stats.RefreshFailed++
		if prof.RevokeFamilyOnReuse {
			fam.revoked = true
			p.stats.FamiliesRevoked++
		}
		return refreshReuse, fam, "", time.Time{}
	}
	p.stats.RefreshOK++
	at, exp = p.issueAccessLocked(fam)
	return out, fam, at, exp
}

// revokeOldAccessLocked schedules the revocation of the family's existing
// access tokens at a rotation, per the profile.
func (p *IdP) revokeOldAccessLocked(fam *family, now time.Time) {
	var at time.Time
	switch p.cfg.Profile.RevokeOldAccess {
	case RevokeAccessOnRotation:
		at = now
	case RevokeAccessAfterLeeway:
		at = now.Add(p.cfg.Profile.ReuseLeeway)
	}
	if !at.IsZero() {
		for _, a := range fam.ats {
			a.revokeAt = at
		}
	}
	// Every listed token is now scheduled (or, for RevokeAccessNever, lives
	// until its expiry), so the list restarts: long benchmarks stay small.
	clear(fam.ats)
	fam.ats = fam.ats[:0]
}

// randomString returns n bytes from crypto/rand, base64url-encoded.
func randomString(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // crypto/rand.Read never returns an error (Go 1.24+)
	return base64.RawURLEncoding.EncodeToString(b)
}
