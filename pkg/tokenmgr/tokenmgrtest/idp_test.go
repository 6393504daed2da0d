package tokenmgrtest_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/oauth2"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

// fakeClock is a settable clock shared by a test and the IdP.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *fakeClock { return &fakeClock{t: time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// start runs an IdP on a fake clock for the duration of the test.
func start(t *testing.T, cfg tokenmgrtest.Config) (*tokenmgrtest.Server, *fakeClock) {
	t.Helper()
	clk := newClock()
	if cfg.Now == nil {
		cfg.Now = clk.Now
	}
	s := tokenmgrtest.NewServer(cfg)
	t.Cleanup(s.Close)
	return s, clk
}

var allProfiles = []tokenmgrtest.Profile{
	tokenmgrtest.Atlassian, tokenmgrtest.Strict, tokenmgrtest.Okta,
	tokenmgrtest.Xero, tokenmgrtest.NonRotating,
}

// response is a decoded token-endpoint (or API) answer.
type response struct {
	status int
	header http.Header
	raw    string
	body   map[string]any
}

func (r response) str(key string) string {
	s, _ := r.body[key].(string)
	return s
}

func do(t *testing.T, req *http.Request) response {
	t.Helper()
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", req.Method, req.URL.Path, err)
	}
	defer res.Body.Close()
	raw, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatalf("read body: %v", err)
	}
	r := response{status: res.StatusCode, header: res.Header, raw: strings.TrimSpace(string(raw))}
	_ = json.Unmarshal(raw, &r.body)
	return r
}

// postToken posts form to the token endpoint with client credentials in the
// given style (AuthStyleAutoDetect: none).
func postToken(t *testing.T, s *tokenmgrtest.Server, form url.Values, style oauth2.AuthStyle, secret string) response {
	t.Helper()
	conf := s.OAuthConfig(style)
	form = cloneValues(form)
	if style == oauth2.AuthStyleInParams {
		form.Set("client_id", conf.ClientID)
		form.Set("client_secret", secret)
	}
	req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, s.TokenURL(), strings.NewReader(form.Encode()))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	if style == oauth2.AuthStyleInHeader {
		req.SetBasicAuth(url.QueryEscape(conf.ClientID), url.QueryEscape(secret))
	}
	return do(t, req)
}

func cloneValues(v url.Values) url.Values {
	out := url.Values{}
	for k, vs := range v {
		out[k] = append([]string(nil), vs...)
	}
	return out
}

// refreshRaw presents rt to the token endpoint with valid credentials.
func refreshRaw(t *testing.T, s *tokenmgrtest.Server, rt string) response {
	t.Helper()
	return postToken(t, s, url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rt}},
		oauth2.AuthStyleInParams, s.OAuthConfig(0).ClientSecret)
}

// mustRotate refreshes rt and returns the new refresh token.
func mustRotate(t *testing.T, s *tokenmgrtest.Server, rt string) (newRT, newAT string) {
	t.Helper()
	r := refreshRaw(t, s, rt)
	if r.status != http.StatusOK || r.str("refresh_token") == "" || r.str("refresh_token") == rt {
		t.Fatalf("rotation: got %d %s, want 200 with a new refresh_token", r.status, r.raw)
	}
	return r.str("refresh_token"), r.str("access_token")
}

// refreshX refreshes rt through x/oauth2, as a real client would.
func refreshX(ctx context.Context, conf *oauth2.Config, rt string) (*oauth2.Token, error) {
	return conf.TokenSource(ctx, &oauth2.Token{RefreshToken: rt}).Token()
}

func apiStatus(t *testing.T, s *tokenmgrtest.Server, at string) int {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, s.APIURL(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if at != "" {
		req.Header.Set("Authorization", "Bearer "+at)
	}
	return do(t, req).status
}

func retrieveError(t *testing.T, err error) *oauth2.RetrieveError {
	t.Helper()
	var re *oauth2.RetrieveError
	if !errors.As(err, &re) {
		t.Fatalf("got error %v, want *oauth2.RetrieveError", err)
	}
	return re
}

func TestProfileByName(t *testing.T) {
	for _, want := range allProfiles {
		got, err := tokenmgrtest.ProfileByName(want.Name)
		if err != nil || got != want {
			t.Errorf("ProfileByName(%q) = %+v, %v; want %+v", want.Name, got, err, want)
		}
	}
	if got, _ := tokenmgrtest.ProfileByName("grace"); got != tokenmgrtest.Okta {
		t.Errorf(`ProfileByName("grace") = %+v, want Okta (its former name)`, got)
	}
	if got, _ := tokenmgrtest.ProfileByName("grace-xero"); got != tokenmgrtest.Xero {
		t.Errorf(`ProfileByName("grace-xero") = %+v, want Xero (its former name)`, got)
	}
	_, err := tokenmgrtest.ProfileByName("auth0")
	if err == nil {
		t.Fatal(`ProfileByName("auth0"): got nil error`)
	}
	for _, p := range allProfiles {
		if !strings.Contains(err.Error(), p.Name) {
			t.Errorf("error %q does not list %q", err, p.Name)
		}
	}
}

func TestRefreshCurrentToken(t *testing.T) {
	for _, prof := range allProfiles {
		t.Run(prof.Name, func(t *testing.T) {
			s, _ := start(t, tokenmgrtest.Config{Profile: prof})
			tok := s.NewGrant("offline_access")
			r := refreshRaw(t, s, tok.RefreshToken)
			if r.status != http.StatusOK {
				t.Fatalf("got %d %s, want 200", r.status, r.raw)
			}
			if got := r.header.Get("Content-Type"); got != "application/json" {
				t.Errorf("Content-Type: got %q, want application/json", got)
			}
			if got := r.header.Get("Cache-Control"); got != "no-store" {
				t.Errorf("Cache-Control: got %q, want no-store", got)
			}
			if r.str("token_type") != "Bearer" || r.str("scope") != "offline_access" || r.body["expires_in"] != float64(3600) {
				t.Errorf("got body %s, want Bearer, scope offline_access, expires_in 3600", r.raw)
			}
			at := r.str("access_token")
			if at == "" || at == tok.AccessToken || !s.AccessTokenValid(at) {
				t.Errorf("got access_token valid=%v, want a new valid token", s.AccessTokenValid(at))
			}
			_, hasRT := r.body["refresh_token"]
			if hasRT != prof.Rotates {
				t.Fatalf("refresh_token present: got %v, want %v", hasRT, prof.Rotates)
			}
			wantRotations := int64(0)
			if prof.Rotates {
				wantRotations = 1
				if r.str("refresh_token") == tok.RefreshToken {
					t.Error("got the same refresh token, want a rotated one")
				}
			} else {
				// Non-rotating: the same refresh token keeps working.
				for range 3 {
					if r := refreshRaw(t, s, tok.RefreshToken); r.status != http.StatusOK {
						t.Fatalf("repeat refresh: got %d %s, want 200", r.status, r.raw)
					}
				}
			}
			st := s.Stats()
			if st.Rotations != wantRotations || st.ReuseDetected != 0 || st.RefreshFailed != 0 {
				t.Errorf("got %+v, want Rotations %d and no failures", st, wantRotations)
			}
		})
	}
}

// TestPreviousTokenReplay presents the token retired by the last rotation,
// inside and outside each profile's leeway.
func TestPreviousTokenReplay(t *testing.T) {
	tests := []struct {
		prof        tokenmgrtest.Profile
		after       time.Duration
		wantOK      bool
		wantStatus  int
		wantRevoked bool
	}{
		{tokenmgrtest.Atlassian, 0, true, 200, false},
		{tokenmgrtest.Atlassian, 10*time.Minute - time.Second, true, 200, false},
		{tokenmgrtest.Atlassian, 10 * time.Minute, false, 403, true},
		{tokenmgrtest.Strict, 0, false, 400, true},
		{tokenmgrtest.Okta, 29 * time.Second, true, 200, false},
		{tokenmgrtest.Okta, 30 * time.Second, false, 400, false},
		{tokenmgrtest.Xero, 29 * time.Minute, true, 200, false},
		{tokenmgrtest.Xero, 30 * time.Minute, false, 400, false},
	}
	for _, tt := range tests {
		t.Run(tt.prof.Name+"/"+tt.after.String(), func(t *testing.T) {
			s, clk := start(t, tokenmgrtest.Config{Profile: tt.prof})
			tok := s.NewGrant("offline_access")
			rt1, at1 := mustRotate(t, s, tok.RefreshToken)
			clk.Advance(tt.after)

			r := refreshRaw(t, s, tok.RefreshToken)
			if r.status != tt.wantStatus {
				t.Fatalf("replay: got %d %s, want %d", r.status, r.raw, tt.wantStatus)
			}
			st := s.Stats()
			if st.Rotations != 1 {
				t.Errorf("Rotations: got %d, want 1", st.Rotations)
			}
			if tt.wantOK {
				if got := r.str("refresh_token"); got != rt1 {
					t.Errorf("replay: got a different refresh token, want the family's current one")
				}
				if !s.AccessTokenValid(r.str("access_token")) {
					t.Error("replay: access token not valid")
				}
				if st.RefreshOK != 2 || st.ReuseDetected != 0 {
					t.Errorf("got %+v, want RefreshOK 2, ReuseDetected 0", st)
				}
				// The current token still rotates normally afterwards.
				mustRotate(t, s, rt1)
				return
			}
			if r.str("error") != "invalid_grant" {
				t.Errorf("got %s, want invalid_grant", r.raw)
			}
			wantFamilies := int64(0)
			if tt.wantRevoked {
				wantFamilies = 1
			}
			if st.ReuseDetected != 1 || st.FamiliesRevoked != wantFamilies || st.RefreshFailed != 1 {
				t.Errorf("got %+v, want ReuseDetected 1, FamiliesRevoked %d, RefreshFailed 1", st, wantFamilies)
			}
			if got := s.FamilyRevoked(rt1); got != tt.wantRevoked {
				t.Errorf("FamilyRevoked: got %v, want %v", got, tt.wantRevoked)
			}
			// After family revocation nothing works; otherwise the current token does.
			cur := refreshRaw(t, s, rt1)
			if tt.wantRevoked {
				if cur.status != tt.wantStatus || s.AccessTokenValid(at1) || apiStatus(t, s, at1) != http.StatusUnauthorized {
					t.Errorf("after revocation: refresh %d, access token valid %v; want %d and invalid", cur.status, s.AccessTokenValid(at1), tt.wantStatus)
				}
				if got := s.Stats().ReuseDetected; got != 1 {
					t.Errorf("ReuseDetected after using a revoked family: got %d, want 1", got)
				}
			} else if cur.status != http.StatusOK {
				t.Errorf("current token after reuse: got %d %s, want 200", cur.status, cur.raw)
			}
		})
	}
}

// TestOnlyPreviousTokenHasLeeway presents a token two rotations old at once.
func TestOnlyPreviousTokenHasLeeway(t *testing.T) {
	for _, prof := range allProfiles {
		if !prof.Rotates {
			continue
		}
		t.Run(prof.Name, func(t *testing.T) {
			s, _ := start(t, tokenmgrtest.Config{Profile: prof})
			rt0 := s.NewGrant("").RefreshToken
			rt1, _ := mustRotate(t, s, rt0)
			rt2, _ := mustRotate(t, s, rt1)
			r := refreshRaw(t, s, rt0)
			if r.status != prof.InvalidGrantStatus || r.str("error") != "invalid_grant" {
				t.Fatalf("got %d %s, want %d invalid_grant", r.status, r.raw, prof.InvalidGrantStatus)
			}
			if got := s.Stats().ReuseDetected; got != 1 {
				t.Errorf("ReuseDetected: got %d, want 1", got)
			}
			if got := s.FamilyRevoked(rt2); got != prof.RevokeFamilyOnReuse {
				t.Errorf("FamilyRevoked: got %v, want %v", got, prof.RevokeFamilyOnReuse)
			}
		})
	}
}

func TestUnknownRefreshToken(t *testing.T) {
	for _, prof := range allProfiles {
		t.Run(prof.Name, func(t *testing.T) {
			s, _ := start(t, tokenmgrtest.Config{Profile: prof})
			s.NewGrant("")
			r := refreshRaw(t, s, "fake-rt-never-issued")
			if r.status != prof.InvalidGrantStatus || r.str("error") != "invalid_grant" {
				t.Fatalf("got %d %s, want %d invalid_grant", r.status, r.raw, prof.InvalidGrantStatus)
			}
			if prof == tokenmgrtest.Atlassian {
				const want = `{"error":"invalid_grant","error_description":"Unknown or invalid refresh token."}`
				if r.raw != want {
					t.Errorf("got body %s, want %s", r.raw, want)
				}
			}
			if st := s.Stats(); st.RefreshFailed != 1 || st.ReuseDetected != 0 {
				t.Errorf("got %+v, want RefreshFailed 1, ReuseDetected 0", st)
			}
		})
	}
}

// TestOldAccessTokenRevocation checks, per profile, when the access token
// issued before a rotation stops working.
func TestOldAccessTokenRevocation(t *testing.T) {
	type check struct {
		at    time.Duration // since the rotation, which happens 1 s after issue
		valid bool
	}
	tests := []struct {
		prof   tokenmgrtest.Profile
		checks []check
	}{
		{tokenmgrtest.Atlassian, []check{{0, true}, {10*time.Minute - time.Nanosecond, true}, {10 * time.Minute, false}}},
		{tokenmgrtest.Strict, []check{{0, false}}},
		{tokenmgrtest.Okta, []check{{0, true}, {time.Hour - time.Second - time.Nanosecond, true}, {time.Hour - time.Second, false}}},
		{tokenmgrtest.Xero, []check{{0, true}, {30 * time.Minute, true}, {time.Hour - time.Second, false}}},
		{tokenmgrtest.NonRotating, []check{{0, true}, {time.Hour - time.Second - time.Nanosecond, true}, {time.Hour - time.Second, false}}},
	}
	for _, tt := range tests {
		t.Run(tt.prof.Name, func(t *testing.T) {
			s, clk := start(t, tokenmgrtest.Config{Profile: tt.prof})
			tok := s.NewGrant("")
			clk.Advance(time.Second)
			r := refreshRaw(t, s, tok.RefreshToken)
			if r.status != http.StatusOK {
				t.Fatalf("refresh: got %d %s", r.status, r.raw)
			}
			newAT := r.str("access_token")
			rotatedAt := clk.Now()
			var want200, want401 int64
			for _, c := range tt.checks {
				clk.Advance(rotatedAt.Add(c.at).Sub(clk.Now()))
				if got := s.AccessTokenValid(tok.AccessToken); got != c.valid {
					t.Errorf("+%v: AccessTokenValid(old) = %v, want %v", c.at, got, c.valid)
				}
				wantStatus := http.StatusUnauthorized
				if c.valid {
					wantStatus = http.StatusOK
					want200++
				} else {
					want401++
				}
				if got := apiStatus(t, s, tok.AccessToken); got != wantStatus {
					t.Errorf("+%v: API with old token: got %d, want %d", c.at, got, wantStatus)
				}
				if !s.AccessTokenValid(newAT) {
					t.Errorf("+%v: new access token invalid", c.at)
				}
			}
			if st := s.Stats(); st.API200 != want200 || st.API401 != want401 {
				t.Errorf("got API200 %d, API401 %d; want %d, %d", st.API200, st.API401, want200, want401)
			}
		})
	}
}

func TestNonRotatingClientKeepsRefreshToken(t *testing.T) {
	s, _ := start(t, tokenmgrtest.Config{Profile: tokenmgrtest.NonRotating})
	rt := s.NewGrant("").RefreshToken
	conf := s.OAuthConfig(oauth2.AuthStyleInParams)
	for i := range 3 {
		tok, err := refreshX(t.Context(), conf, rt)
		if err != nil {
			t.Fatalf("refresh %d: %v", i, err)
		}
		if tok.RefreshToken != rt {
			t.Fatalf("refresh %d: x/oauth2 token lost the refresh token", i)
		}
	}
}

func TestAuthStyle(t *testing.T) {
	const (
		auto   = oauth2.AuthStyleAutoDetect
		header = oauth2.AuthStyleInHeader
		params = oauth2.AuthStyleInParams
	)
	tests := []struct {
		name        string
		server      oauth2.AuthStyle
		client      oauth2.AuthStyle
		wantErr     bool
		wantFailed  int64 // RefreshFailed: one per rejected presentation of the token
		wantRotated bool
	}{
		{"header/header", header, header, false, 0, true},
		{"params/params", params, params, false, 0, true},
		{"any/header", auto, header, false, 0, true},
		{"any/params", auto, params, false, 0, true},
		{"header/params", header, params, true, 1, false},
		{"params/header", params, header, true, 1, false},
		// x/oauth2 tries the header first, gets invalid_client, retries in
		// params: the refresh token is presented twice.
		{"params/autodetect", params, auto, false, 1, true},
		{"header/autodetect", header, auto, false, 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, _ := start(t, tokenmgrtest.Config{Profile: tokenmgrtest.Strict, AuthStyle: tt.server})
			rt := s.NewGrant("").RefreshToken
			_, err := refreshX(t.Context(), s.OAuthConfig(tt.client), rt)
			if tt.wantErr {
				re := retrieveError(t, err)
				if re.Response.StatusCode != http.StatusUnauthorized || re.ErrorCode != "invalid_client" {
					t.Errorf("got %d %q, want 401 invalid_client", re.Response.StatusCode, re.ErrorCode)
				}
			} else if err != nil {
				t.Fatalf("got %v, want success", err)
			}
			st := s.Stats()
			if st.RefreshFailed != tt.wantFailed || (st.Rotations == 1) != tt.wantRotated {
				t.Errorf("got %+v, want RefreshFailed %d, rotated %v", st, tt.wantFailed, tt.wantRotated)
			}
			if tt.wantErr {
				// The rejected request changed nothing: the token still rotates.
				if _, err := refreshX(t.Context(), s.OAuthConfig(tt.server), rt); err != nil {
					t.Errorf("refresh in the right style: %v", err)
				}
			}
		})
	}
}

func TestWrongClientCredentials(t *testing.T) {
	for _, prof := range allProfiles {
		for _, style := range []oauth2.AuthStyle{oauth2.AuthStyleInHeader, oauth2.AuthStyleInParams} {
			t.Run(fmt.Sprintf("%s/style%d", prof.Name, style), func(t *testing.T) {
				s, _ := start(t, tokenmgrtest.Config{Profile: prof})
				rt := s.NewGrant("").RefreshToken
				form := url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rt}}
				r := postToken(t, s, form, style, "wrong-secret")
				wantErr, wantDesc := "invalid_client", ""
				if prof == tokenmgrtest.Atlassian {
					wantErr, wantDesc = "access_denied", "Unauthorized"
				}
				if r.status != http.StatusUnauthorized || r.str("error") != wantErr ||
					(wantDesc != "" && r.str("error_description") != wantDesc) {
					t.Errorf("got %d %s, want 401 %s %s", r.status, r.raw, wantErr, wantDesc)
				}
				// x/oauth2 classifies it by code.
				conf := s.OAuthConfig(style)
				conf.ClientSecret = "wrong-secret"
				_, err := refreshX(t.Context(), conf, rt)
				if re := retrieveError(t, err); re.ErrorCode != wantErr {
					t.Errorf("x/oauth2 ErrorCode: got %q, want %q", re.ErrorCode, wantErr)
				}
				if st := s.Stats(); st.RefreshFailed != 2 || st.RefreshOK != 0 || st.Rotations != 0 {
					t.Errorf("got %+v, want RefreshFailed 2 and nothing else", st)
				}
			})
		}
	}
}

func TestMalformedTokenRequests(t *testing.T) {
	s, _ := start(t, tokenmgrtest.Config{Profile: tokenmgrtest.Atlassian})
	secret := s.OAuthConfig(0).ClientSecret
	tests := []struct {
		name     string
		form     url.Values
		wantCode string
	}{
		{"no grant_type", url.Values{"refresh_token": {"x"}}, "invalid_request"},
		{"no refresh_token", url.Values{"grant_type": {"refresh_token"}}, "invalid_request"},
		{"password grant", url.Values{"grant_type": {"password"}}, "unsupported_grant_type"},
		{"no code", url.Values{"grant_type": {"authorization_code"}}, "invalid_request"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := postToken(t, s, tt.form, oauth2.AuthStyleInParams, secret)
			if r.status != http.StatusBadRequest || r.str("error") != tt.wantCode {
				t.Errorf("got %d %s, want 400 %s", r.status, r.raw, tt.wantCode)
			}
		})
	}
	if got := s.Stats().RefreshFailed; got != 1 {
		t.Errorf("RefreshFailed: got %d, want 1 (only the refresh_token grant counts)", got)
	}
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, s.TokenURL(), nil)
	if got := do(t, req).status; got != http.StatusMethodNotAllowed {
		t.Errorf("GET token endpoint: got %d, want 405", got)
	}
}

func TestJSONTokenRequest(t *testing.T) {
	s, _ := start(t, tokenmgrtest.Config{Profile: tokenmgrtest.Atlassian})
	rt := s.NewGrant("").RefreshToken
	conf := s.OAuthConfig(0)
	body, _ := json.Marshal(map[string]string{
		"grant_type": "refresh_token", "refresh_token": rt,
		"client_id": conf.ClientID, "client_secret": conf.ClientSecret,
	})
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, s.TokenURL(), strings.NewReader(string(body)))
	req.Header.Set("Content-Type", "application/json; charset=utf-8")
	r := do(t, req)
	if r.status != http.StatusOK || r.str("refresh_token") == "" {
		t.Fatalf("got %d %s, want 200 with a refresh_token", r.status, r.raw)
	}
}

func TestFail5xx(t *testing.T) {
	s, _ := start(t, tokenmgrtest.Config{Profile: tokenmgrtest.Strict})
	rt := s.NewGrant("").RefreshToken
	conf := s.OAuthConfig(oauth2.AuthStyleInParams)
	s.Fail5xx(2)
	for i := range 2 {
		_, err := refreshX(t.Context(), conf, rt)
		re := retrieveError(t, err)
		if re.Response.StatusCode != http.StatusServiceUnavailable || re.ErrorCode != "temporarily_unavailable" {
			t.Errorf("attempt %d: got %d %q, want 503 temporarily_unavailable", i, re.Response.StatusCode, re.ErrorCode)
		}
	}
	// No rotation happened, so the same token still works, even on strict.
	if _, err := refreshX(t.Context(), conf, rt); err != nil {
		t.Fatalf("after faults: %v", err)
	}
	if st := s.Stats(); st.Injected5xx != 2 || st.Rotations != 1 || st.RefreshFailed != 0 || st.ReuseDetected != 0 {
		t.Errorf("got %+v, want Injected5xx 2, Rotations 1, no failures", st)
	}
}

func TestFail429(t *testing.T) {
	tests := []struct {
		retryAfter time.Duration
		want       string
	}{
		{1500 * time.Millisecond, "2"},
		{3 * time.Second, "3"},
		{0, "0"},
	}
	for _, tt := range tests {
		t.Run(tt.retryAfter.String(), func(t *testing.T) {
			s, _ := start(t, tokenmgrtest.Config{Profile: tokenmgrtest.Strict})
			rt := s.NewGrant("").RefreshToken
			s.Fail429(1, tt.retryAfter)
			r := refreshRaw(t, s, rt)
			if r.status != http.StatusTooManyRequests || r.str("error") != "rate_limited" || r.header.Get("Retry-After") != tt.want {
				t.Errorf("got %d %s Retry-After %q, want 429 rate_limited Retry-After %q",
					r.status, r.raw, r.header.Get("Retry-After"), tt.want)
			}
			mustRotate(t, s, rt)
			if st := s.Stats(); st.Injected429 != 1 || st.Rotations != 1 || st.RefreshFailed != 0 {
				t.Errorf("got %+v, want Injected429 1, Rotations 1", st)
			}
		})
	}
}

// TestDropResponses loses the response of a rotation that happened, then
// retries with the token the client still holds.
func TestDropResponses(t *testing.T) {
	tests := []struct {
		prof        tokenmgrtest.Profile
		wantRecover bool
	}{
		{tokenmgrtest.Atlassian, true},
		{tokenmgrtest.Okta, true},
		{tokenmgrtest.Strict, false},
	}
	for _, tt := range tests {
		t.Run(tt.prof.Name, func(t *testing.T) {
			s, _ := start(t, tokenmgrtest.Config{Profile: tt.prof})
			rt := s.NewGrant("").RefreshToken
			conf := s.OAuthConfig(oauth2.AuthStyleInHeader)
			s.DropResponses(1)
			_, err := refreshX(t.Context(), conf, rt)
			var re *oauth2.RetrieveError
			if err == nil || errors.As(err, &re) {
				t.Fatalf("dropped response: got %v, want a network error", err)
			}
			if st := s.Stats(); st.Dropped != 1 || st.Rotations != 1 || st.RefreshOK != 1 {
				t.Fatalf("got %+v, want Dropped 1, Rotations 1, RefreshOK 1", st)
			}
			issued := s.IssuedTokens()
			var current string // the refresh token the dropped response carried
			for _, tok := range issued {
				if strings.HasPrefix(tok, "fake-rt-") {
					current = tok
				}
			}

			tok, err := refreshX(t.Context(), conf, rt)
			if !tt.wantRecover {
				re := retrieveError(t, err)
				if re.ErrorCode != "invalid_grant" || !s.FamilyRevoked(current) {
					t.Errorf("got %q, revoked %v; want invalid_grant and a revoked family", re.ErrorCode, s.FamilyRevoked(current))
				}
				return
			}
			if err != nil {
				t.Fatalf("retry inside the leeway: %v", err)
			}
			if tok.RefreshToken != current {
				t.Error("retry inside the leeway: got a refresh token other than the one the dropped response carried")
			}
			if st := s.Stats(); st.Rotations != 1 || st.RefreshOK != 2 || st.ReuseDetected != 0 {
				t.Errorf("got %+v, want Rotations 1, RefreshOK 2", st)
			}
		})
	}
}

func TestLatency(t *testing.T) {
	s, _ := start(t, tokenmgrtest.Config{Profile: tokenmgrtest.Strict})
	rt := s.NewGrant("").RefreshToken
	conf := s.OAuthConfig(oauth2.AuthStyleInParams)

	const d = 30 * time.Millisecond
	s.SetLatency(d)
	begin := time.Now()
	tok, err := refreshX(t.Context(), conf, rt)
	if err != nil {
		t.Fatal(err)
	}
	if got := time.Since(begin); got < d {
		t.Errorf("refresh took %v, want at least %v", got, d)
	}

	// A client that gives up during the delay changes nothing.
	s.SetLatency(time.Minute)
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Millisecond)
	defer cancel()
	if _, err := refreshX(ctx, conf, tok.RefreshToken); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v, want context.DeadlineExceeded", err)
	}
	s.SetLatency(0)
	if _, err := refreshX(t.Context(), conf, tok.RefreshToken); err != nil {
		t.Fatalf("after the abandoned request: %v", err)
	}
	if st := s.Stats(); st.Rotations != 2 || st.ReuseDetected != 0 {
		t.Errorf("got %+v, want Rotations 2 and no reuse", st)
	}
}

func TestAuthorizationCodeFlow(t *testing.T) {
	const redirect = "https://app.example/callback?tenant=1"
	tests := []struct {
		name     string
		pkce     bool
		verifier func(good string) string
		redirect string
		advance  time.Duration
		replay   bool
		wantErr  bool
	}{
		{name: "pkce", pkce: true},
		{name: "no pkce"},
		{name: "bad verifier", pkce: true, verifier: func(string) string { return oauth2.GenerateVerifier() }, wantErr: true},
		{name: "missing verifier", pkce: true, verifier: func(string) string { return "" }, wantErr: true},
		{name: "redirect mismatch", redirect: "https://evil.example/callback", wantErr: true},
		{name: "expired code", advance: time.Minute, wantErr: true},
		{name: "replayed code", pkce: true, replay: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, clk := start(t, tokenmgrtest.Config{Profile: tokenmgrtest.Atlassian, AuthStyle: oauth2.AuthStyleInParams})
			conf := s.OAuthConfig(oauth2.AuthStyleInParams)
			conf.RedirectURL = redirect
			conf.Scopes = []string{"read:jira-work", "offline_access"}
			verifier := oauth2.GenerateVerifier()
			opts := []oauth2.AuthCodeOption{
				oauth2.SetAuthURLParam("audience", "api.atlassian.com"),
				oauth2.SetAuthURLParam("prompt", "consent"),
			}
			if tt.pkce {
				opts = append(opts, oauth2.S256ChallengeOption(verifier))
			}
			code := authorize(t, s, conf.AuthCodeURL("state-123", opts...), "state-123")
			clk.Advance(tt.advance)

			if tt.verifier != nil {
				verifier = tt.verifier(verifier)
			}
			var exOpts []oauth2.AuthCodeOption
			if tt.pkce && verifier != "" {
				exOpts = append(exOpts, oauth2.VerifierOption(verifier))
			}
			if tt.redirect != "" {
				conf.RedirectURL = tt.redirect
			}
			tok, err := conf.Exchange(t.Context(), code, exOpts...)
			if tt.wantErr {
				re := retrieveError(t, err)
				if re.Response.StatusCode != http.StatusBadRequest || re.ErrorCode != "invalid_grant" {
					t.Errorf("got %d %q, want 400 invalid_grant", re.Response.StatusCode, re.ErrorCode)
				}
				if got := s.Stats().AuthCodeExchanges; got != 0 {
					t.Errorf("AuthCodeExchanges: got %d, want 0", got)
				}
				return
			}
			if err != nil {
				t.Fatalf("exchange: %v", err)
			}
			if tok.RefreshToken == "" || apiStatus(t, s, tok.AccessToken) != http.StatusOK {
				t.Fatalf("exchange: got refresh token %v and an API status other than 200", tok.RefreshToken != "")
			}
			if got := tok.Extra("scope"); got != "read:jira-work offline_access" {
				t.Errorf("scope: got %v", got)
			}
			if got := s.Stats().AuthCodeExchanges; got != 1 {
				t.Errorf("AuthCodeExchanges: got %d, want 1", got)
			}
			// The new family rotates like any other.
			mustRotate(t, s, tok.RefreshToken)
			if tt.replay {
				_, err := conf.Exchange(t.Context(), code, exOpts...)
				if re := retrieveError(t, err); re.ErrorCode != "invalid_grant" {
					t.Errorf("replayed code: got %q, want invalid_grant", re.ErrorCode)
				}
			}
		})
	}
}

// authorize follows the consent URL and returns the code from the redirect.
func authorize(t *testing.T, s *tokenmgrtest.Server, authURL, state string) string {
	t.Helper()
	if !strings.HasPrefix(authURL, s.AuthURL()+"?") {
		t.Fatalf("auth URL %q does not start with %q", authURL, s.AuthURL())
	}
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, authURL, nil)
	res, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusFound {
		t.Fatalf("authorize: got %d, want 302", res.StatusCode)
	}
	loc, err := url.Parse(res.Header.Get("Location"))
	if err != nil {
		t.Fatal(err)
	}
	q := loc.Query()
	if loc.Host != "app.example" || q.Get("state") != state || q.Get("tenant") != "1" || q.Get("code") == "" {
		t.Fatalf("redirect: got %s, want app.example with code, state %q and the original query", loc.Redacted(), state)
	}
	return q.Get("code")
}

func TestAuthorizeRejects(t *testing.T) {
	s, _ := start(t, tokenmgrtest.Config{Profile: tokenmgrtest.Atlassian})
	good := url.Values{
		"response_type": {"code"}, "client_id": {"client-id"},
		"redirect_uri": {"https://app.example/cb"}, "state": {"s"},
	}
	tests := []struct {
		name string
		set  map[string]string
	}{
		{"unknown client", map[string]string{"client_id": "someone-else"}},
		{"no redirect_uri", map[string]string{"redirect_uri": ""}},
		{"token response type", map[string]string{"response_type": "token"}},
		{"bad challenge method", map[string]string{"code_challenge": "abc", "code_challenge_method": "S512"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			q := cloneValues(good)
			for k, v := range tt.set {
				q.Set(k, v)
			}
			req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, s.AuthURL()+"?"+q.Encode(), nil)
			if r := do(t, req); r.status != http.StatusBadRequest {
				t.Errorf("got %d %s, want 400", r.status, r.raw)
			}
		})
	}
}

func TestAPI(t *testing.T) {
	s, clk := start(t, tokenmgrtest.Config{Profile: tokenmgrtest.Okta, AccessTTL: time.Minute})
	tok := s.NewGrant("")
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, s.APIURL(), nil)
	req.Header.Set("Authorization", "Bearer "+tok.AccessToken)
	r := do(t, req)
	if r.status != http.StatusOK || r.str("displayName") != "Fake User" || r.str("accountId") == "" {
		t.Errorf("got %d %s, want 200 with accountId and displayName", r.status, r.raw)
	}
	for name, at := range map[string]string{"no token": "", "unknown token": "fake-at-nope", "refresh token": tok.RefreshToken} {
		if got := apiStatus(t, s, at); got != http.StatusUnauthorized {
			t.Errorf("%s: got %d, want 401", name, got)
		}
	}
	clk.Advance(time.Minute)
	if got := apiStatus(t, s, tok.AccessToken); got != http.StatusUnauthorized {
		t.Errorf("expired token: got %d, want 401", got)
	}
	if st := s.Stats(); st.API200 != 1 || st.API401 != 4 {
		t.Errorf("got API200 %d, API401 %d; want 1, 4", st.API200, st.API401)
	}
}

func TestStatsJSON(t *testing.T) {
	s, _ := start(t, tokenmgrtest.Config{Profile: tokenmgrtest.Strict})
	rt := s.NewGrant("").RefreshToken
	_, at := mustRotate(t, s, rt)
	refreshRaw(t, s, rt) // reuse: revokes the family
	apiStatus(t, s, at)
	s.Fail5xx(1)
	refreshRaw(t, s, rt)

	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, s.URL+"/stats", nil)
	r := do(t, req)
	if r.status != http.StatusOK || r.header.Get("Content-Type") != "application/json" {
		t.Fatalf("got %d %s", r.status, r.header.Get("Content-Type"))
	}
	var got map[string]int64
	if err := json.Unmarshal([]byte(r.raw), &got); err != nil {
		t.Fatal(err)
	}
	want := map[string]int64{
		"refresh_ok": 1, "refresh_failed": 1, "reuse_detected": 1, "families_revoked": 1,
		"auth_code_exchanges": 0, "api_200": 0, "api_401": 1, "rotations": 1,
		"dropped": 0, "injected_5xx": 1, "injected_429": 0, "injected_busy": 0,
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
	var st tokenmgrtest.Stats
	if err := json.Unmarshal([]byte(r.raw), &st); err != nil || st != s.Stats() {
		t.Errorf("got %+v, want Stats() %+v", st, s.Stats())
	}
}

// TestConcurrentRefresh presents one refresh token from 20 goroutines, as an
// uncoordinated fleet would.
func TestConcurrentRefresh(t *testing.T) {
	tests := []struct {
		prof        tokenmgrtest.Profile
		wantOK      int
		wantRevoked bool
	}{
		{tokenmgrtest.Strict, 1, true},
		{tokenmgrtest.Atlassian, 20, false}, // one rotation, 19 replays inside the leeway
	}
	for _, tt := range tests {
		t.Run(tt.prof.Name, func(t *testing.T) {
			s, _ := start(t, tokenmgrtest.Config{Profile: tt.prof})
			rt := s.NewGrant("").RefreshToken
			conf := s.OAuthConfig(oauth2.AuthStyleInHeader)
			const n = 20
			var (
				wg      sync.WaitGroup
				mu      sync.Mutex
				okCount int
				rts     = map[string]bool{}
			)
			startCh := make(chan struct{})
			for range n {
				wg.Go(func() {
					<-startCh
					tok, err := refreshX(t.Context(), conf, rt)
					mu.Lock()
					defer mu.Unlock()
					if err == nil {
						okCount++
						rts[tok.RefreshToken] = true
					} else if re := (*oauth2.RetrieveError)(nil); !errors.As(err, &re) || re.ErrorCode != "invalid_grant" {
						t.Errorf("got %v, want invalid_grant", err)
					}
				})
			}
			close(startCh)
			wg.Wait()
			if okCount != tt.wantOK || len(rts) > 1 {
				t.Fatalf("got %d successes with %d distinct refresh tokens, want %d with one", okCount, len(rts), tt.wantOK)
			}
			st := s.Stats()
			if st.Rotations != 1 || st.RefreshOK != int64(tt.wantOK) || st.RefreshFailed != int64(n-tt.wantOK) {
				t.Errorf("got %+v, want Rotations 1, RefreshOK %d", st, tt.wantOK)
			}
			if tt.wantRevoked && (st.ReuseDetected != 1 || st.FamiliesRevoked != 1) {
				t.Errorf("got %+v, want ReuseDetected 1, FamiliesRevoked 1", st)
			}
			if got := s.FamilyRevoked(rt); got != tt.wantRevoked {
				t.Errorf("FamilyRevoked: got %v, want %v", got, tt.wantRevoked)
			}
		})
	}
}

func TestIssuedTokens(t *testing.T) {
	s, clk := start(t, tokenmgrtest.Config{Profile: tokenmgrtest.Atlassian, AccessTTL: 5 * time.Minute})
	tok := s.NewGrant("offline_access")
	if tok.TokenType != "Bearer" || !tok.Expiry.Equal(clk.Now().Add(5*time.Minute)) || tok.Extra("scope") != "offline_access" {
		t.Errorf("NewGrant: got type %q expiry %v scope %v", tok.TokenType, tok.Expiry, tok.Extra("scope"))
	}
	rt1, at1 := mustRotate(t, s, tok.RefreshToken)
	want := []string{tok.RefreshToken, tok.AccessToken, rt1, at1}
	got := s.IssuedTokens()
	if len(got) != len(want) {
		t.Fatalf("got %d issued tokens, want %d", len(got), len(want))
	}
	seen := map[string]bool{}
	for _, w := range want {
		seen[w] = true
	}
	for _, tok := range got {
		if !seen[tok] {
			t.Errorf("IssuedTokens has an unexpected token")
		}
		prefix, rnd, ok := strings.Cut(tok[len("fake-"):], "-")
		b, err := base64.RawURLEncoding.DecodeString(rnd)
		if !ok || (prefix != "at" && prefix != "rt") || err != nil || len(b) < 24 {
			t.Errorf("token format: got prefix %q, %d random bytes (err %v)", prefix, len(b), err)
		}
		delete(seen, tok)
	}
	if s.FamilyRevoked("fake-rt-unknown") {
		t.Error("FamilyRevoked(unknown): got true, want false")
	}
}

func TestConcurrentKnobsAndClock(t *testing.T) {
	// Knobs and the clock may be turned while requests are in flight; -race
	// checks the locking.
	s, _ := start(t, tokenmgrtest.Config{Profile: tokenmgrtest.Xero})
	rt := s.NewGrant("").RefreshToken
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			switch i % 4 {
			case 0:
				s.Fail5xx(1)
			case 1:
				s.Fail429(1, time.Second)
			case 2:
				s.SetClock(time.Now)
			case 3:
				_ = s.Stats()
			}
			// No t.Fatal off the test goroutine: any answer will do here.
			res, err := http.PostForm(s.TokenURL(), url.Values{
				"grant_type": {"refresh_token"}, "refresh_token": {rt},
				"client_id": {"client-id"}, "client_secret": {"client-secret"},
			})
			if err == nil {
				res.Body.Close()
			}
		})
	}
	wg.Wait()
	if st := s.Stats(); st.Injected5xx+st.Injected429+st.RefreshOK+st.RefreshFailed != 8 {
		t.Errorf("got %+v, want 8 refresh requests accounted for", st)
	}
}
