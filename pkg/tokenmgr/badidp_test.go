package tokenmgr

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
	"golang.org/x/oauth2"
)

// A malformed or partial answer from the provider is a clear transient
// error that changes nothing in Redis: the stored pair stays, and so does
// the refresh token that may still be good.
func TestMalformedProviderResponses(t *testing.T) {
	huge := `{"access_token":"` + strings.Repeat("a", 2<<20) + `","token_type":"Bearer","expires_in":3600}`
	for _, tc := range []struct {
		name, contentType, body string
		status                  int
		delay                   time.Duration
	}{
		{"no access_token", "application/json", `{"token_type":"Bearer","expires_in":3600,"refresh_token":"rt-new"}`, 200, 0},
		{"html page", "text/html", `<html><body>Service temporarily down</body></html>`, 200, 0},
		{"wrong types", "application/json", `{"access_token":123,"token_type":["Bearer"],"expires_in":"soon"}`, 200, 0},
		{"html 502", "text/html", `<html>bad gateway</html>`, 502, 0},
		{"truncated json", "application/json", `{"access_token":"abc","refresh`, 200, 0},
		{"over 1 MiB", "application/json", huge, 200, 0},
		{"slower than the timeout", "application/json", `{"access_token":"late","token_type":"Bearer","expires_in":3600}`, 200, 1500 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, miniredisBackend, tokenmgrtest.Strict)
			var calls atomic.Int64
			bad := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				calls.Add(1)
				if tc.delay > 0 {
					select {
					case <-time.After(tc.delay):
					case <-r.Context().Done():
						return
					}
				}
				w.Header().Set("Content-Type", tc.contentType)
				w.WriteHeader(tc.status)
				_, _ = w.Write([]byte(tc.body))
			}))
			defer bad.Close()
			m := e.manager(Strict, func(o *Options) {
				o.OAuth2 = &oauth2.Config{ClientID: "client-id", ClientSecret: "client-secret",
					Endpoint: oauth2.Endpoint{TokenURL: bad.URL, AuthStyle: oauth2.AuthStyleInHeader}}
				o.Provider.HTTPTimeout = time.Second
			})
			e.seed(m)
			before, _ := e.client().HMGet(t.Context(), grantKeys("tm", e.grant).record, fV, fAccess, fRefresh).Result()
			e.clock.Advance(time.Hour)
			_, err := m.Token(t.Context(), e.grant)
			var re *RefreshError
			if !errors.As(err, &re) || re.Config || errors.Is(err, ErrReauthRequired) {
				t.Fatalf("Token = %v, want a transient RefreshError", err)
			}
			if strings.Contains(err.Error(), "aaaaaaaa") || strings.Contains(err.Error(), "rt-new") || strings.Contains(err.Error(), "Service temporarily") {
				t.Errorf("the error quotes the response body: %v", err)
			}
			after, _ := e.client().HMGet(t.Context(), grantKeys("tm", e.grant).record, fV, fAccess, fRefresh).Result()
			for i := range before {
				if before[i] != after[i] {
					t.Errorf("Redis changed: field %d", i)
				}
			}
			if st := e.status(m); st.Status != StatusOK || st.RetryAt.IsZero() {
				t.Errorf("status %+v, want ok with a fleet-wide retry_at", st)
			}
			if calls.Load() != 1 {
				t.Errorf("%d calls to the provider, want 1", calls.Load())
			}
		})
	}
}

// FuzzProviderResponse feeds arbitrary token-endpoint answers through the
// refresh call: an error or a usable token, never a panic or a token
// without an access token.
func FuzzProviderResponse(f *testing.F) {
	f.Add(`{"access_token":"a","token_type":"Bearer","expires_in":3600,"refresh_token":"r"}`, 200)
	f.Add(`{"access_token":"a","expires_in":"3600"}`, 200)
	f.Add(`{"error":"invalid_grant"}`, 400)
	f.Add(`<html>`, 503)
	f.Add(`access_token=a&token_type=bearer&expires_in=60`, 200)
	var body atomic.Value
	var status atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b := body.Load().(string)
		if strings.Contains(b, "=") && !strings.HasPrefix(b, "{") {
			w.Header().Set("Content-Type", "application/x-www-form-urlencoded")
		} else {
			w.Header().Set("Content-Type", "application/json")
		}
		w.WriteHeader(int(status.Load()))
		_, _ = w.Write([]byte(b))
	}))
	f.Cleanup(srv.Close)
	m := &Manager{
		oauth:  &oauth2.Config{ClientID: "c", Endpoint: oauth2.Endpoint{TokenURL: srv.URL, AuthStyle: oauth2.AuthStyleInParams}},
		core:   core{opts: Options{Provider: Provider{HTTPTimeout: 5 * time.Second}, IdPTransport: http.DefaultTransport, Now: time.Now, Observer: noObserver{}}},
		tracer: newTracer(nil),
	}
	g := newGrantState("tm", "g")
	f.Fuzz(func(t *testing.T, b string, code int) {
		if code < 200 || code > 599 {
			return
		}
		body.Store(b)
		status.Store(int64(code))
		tok, _, err := m.callIdP(t.Context(), g, "rt")
		if err == nil && (tok == nil || tok.AccessToken == "") {
			t.Fatalf("success without an access token")
		}
		if err != nil {
			class, retry := classify(err, time.Now())
			if class < failTransient || class > failConfig || retry < 0 {
				t.Fatalf("classify gave %d %s", class, retry)
			}
		}
	})
}

// Invariant 12: times a provider gives are clamped to documented bounds,
// so a token lifetime of a second or of ten years, or a Retry-After of ten
// years, cannot make the fleet refresh in a loop or stop.
func TestProviderTimesClamped(t *testing.T) {
	for _, tc := range []struct {
		name, body, retryAfter string
		status                 int
		wantTTL, wantRetry     time.Duration
	}{
		{"expires_in negative", `{"access_token":"a","token_type":"Bearer","expires_in":-60,"refresh_token":"r2"}`, "", 200, minAccessTTL, 0},
		{"expires_in ten years", `{"access_token":"a","token_type":"Bearer","expires_in":315360000,"refresh_token":"r2"}`, "", 200, maxAccessTTL, 0},
		{"Retry-After ten years", `{"error":"temporarily_unavailable"}`, "315360000", 503, 0, maxRetryAfter},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, miniredisBackend, tokenmgrtest.Strict)
			idp := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", "application/json")
				if tc.retryAfter != "" {
					w.Header().Set("Retry-After", tc.retryAfter)
				}
				w.WriteHeader(tc.status)
				_, _ = w.Write([]byte(tc.body))
			}))
			defer idp.Close()
			m := e.manager(Strict, func(o *Options) {
				o.OAuth2 = &oauth2.Config{ClientID: "client-id", Endpoint: oauth2.Endpoint{TokenURL: idp.URL, AuthStyle: oauth2.AuthStyleInHeader}}
			})
			e.seed(m)
			e.clock.Advance(time.Hour)
			sent := e.clock.Now()
			_, err := m.Token(t.Context(), e.grant)
			if tc.wantRetry > 0 {
				var re *RefreshError
				if !errors.As(err, &re) || re.RetryAfter != tc.wantRetry {
					t.Fatalf("Token = %v, want a RefreshError retrying in %s", err, tc.wantRetry)
				}
				if st := e.status(m); st.RetryAt.Sub(sent) != tc.wantRetry {
					t.Errorf("fleet-wide retry_at in %s, want %s", st.RetryAt.Sub(sent), tc.wantRetry)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := e.status(m).Expiry.Sub(sent); got != tc.wantTTL {
				t.Errorf("stored lifetime %s, want %s", got, tc.wantTTL)
			}
			if !strings.Contains(e.logs.String(), "clamped") {
				t.Errorf("the clamp was not logged")
			}
		})
	}
}

// scriptedIdP answers each refresh with the next of answers (the last one
// repeats), and records the refresh tokens presented.
type scriptedIdP struct {
	srv       *httptest.Server
	mu        sync.Mutex
	answers   []string
	presented []string
}

func newScriptedIdP(t *testing.T, answers ...string) *scriptedIdP {
	s := &scriptedIdP{answers: answers}
	s.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = r.ParseForm()
		s.mu.Lock()
		s.presented = append(s.presented, r.PostForm.Get("refresh_token"))
		body := s.answers[0]
		if len(s.answers) > 1 {
			s.answers = s.answers[1:]
		}
		s.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(body))
	}))
	t.Cleanup(s.srv.Close)
	return s
}

func (s *scriptedIdP) tokens() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.presented...)
}

// A provider answer whose access token cannot go into a header (a line
// break) or whose type is not Bearer is a transient error: the provider
// rotated, so its new refresh token is kept and the next refresh uses it,
// never the spent one.
func testUnusableAccessToken(t *testing.T, b backend) {
	for _, bad := range []string{
		`{"access_token":"at2\r\nX-Evil: 1","token_type":"Bearer","expires_in":3600,"refresh_token":"rt2"}`,
		`{"access_token":"at2","token_type":"mac","expires_in":3600,"refresh_token":"rt2"}`,
	} {
		e := newEnv(t, b, tokenmgrtest.Strict)
		idp := newScriptedIdP(t, bad, `{"access_token":"at3","token_type":"Bearer","expires_in":3600,"refresh_token":"rt3"}`)
		m := e.manager(Strict, func(o *Options) {
			o.OAuth2 = &oauth2.Config{ClientID: "c", Endpoint: oauth2.Endpoint{TokenURL: idp.srv.URL, AuthStyle: oauth2.AuthStyleInParams}}
		})
		if _, err := m.Seed(t.Context(), e.grant, &oauth2.Token{AccessToken: "at1", RefreshToken: "rt1", TokenType: "Bearer", Expiry: e.clock.Now().Add(time.Hour)}, SeedOptions{}); err != nil {
			t.Fatal(err)
		}
		e.clock.Advance(time.Hour)
		_, err := m.Token(t.Context(), e.grant)
		var re *RefreshError
		if !errors.As(err, &re) || re.Config {
			t.Fatalf("Token = %v, want a transient RefreshError", err)
		}
		e.clock.Advance(re.RetryAfter)
		tok, err := m.Token(t.Context(), e.grant)
		if err != nil || tok.AccessToken != "at3" {
			t.Fatalf("after the backoff: %v, want the next answer's token", err)
		}
		if got := idp.tokens(); len(got) != 2 || got[0] != "rt1" || got[1] != "rt2" {
			t.Errorf("refresh tokens presented %q, want rt1 then the kept rt2", got)
		}
	}
}

// The token endpoint's redirects are not followed: the refresh token and
// client secret are never re-posted to another host. The error names the
// Location; it is a configuration error.
func TestTokenEndpointRedirectNotFollowed(t *testing.T) {
	var elsewhere atomic.Int64
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { elsewhere.Add(1) }))
	defer other.Close()
	redirector := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, other.URL+"/steal", http.StatusTemporaryRedirect)
	}))
	defer redirector.Close()
	for _, style := range []oauth2.AuthStyle{oauth2.AuthStyleInHeader, oauth2.AuthStyleInParams} {
		e := newEnv(t, miniredisBackend, tokenmgrtest.Strict)
		m := e.manager(Strict, func(o *Options) {
			o.OAuth2 = &oauth2.Config{ClientID: "c", ClientSecret: "s", Endpoint: oauth2.Endpoint{TokenURL: redirector.URL, AuthStyle: style}}
		})
		e.seed(m)
		e.clock.Advance(time.Hour)
		_, err := m.Token(t.Context(), e.grant)
		var re *RefreshError
		var rd *RedirectError
		if !errors.As(err, &re) || !re.Config || !errors.As(err, &rd) || !strings.Contains(rd.Location, other.URL+"/steal") {
			t.Fatalf("Token = %v, want a configuration RefreshError naming the Location", err)
		}
	}
	if n := elsewhere.Load(); n != 0 {
		t.Errorf("the redirect target got %d requests", n)
	}
}

// Untrusted text from the provider is bounded and printable in errors, the
// record's reason and the logs.
func TestProviderTextBounded(t *testing.T) {
	huge := strings.Repeat("\x1b[31mx", 50_000) // under x/oauth2's 1 MiB read limit once escaped
	e := newEnv(t, miniredisBackend, tokenmgrtest.Strict)
	idp := newScriptedIdP(t, `{"error":"`+strings.ReplaceAll(huge, "\x1b", `\u001b`)+`"}`)
	m := e.manager(Strict, func(o *Options) {
		o.OAuth2 = &oauth2.Config{ClientID: "c", Endpoint: oauth2.Endpoint{TokenURL: idp.srv.URL, AuthStyle: oauth2.AuthStyleInParams}}
	})
	if _, err := m.Seed(t.Context(), e.grant, &oauth2.Token{AccessToken: "at1", RefreshToken: "rt1", Expiry: e.clock.Now().Add(time.Hour)}, SeedOptions{}); err != nil {
		t.Fatal(err)
	}
	e.clock.Advance(time.Hour)
	_, err := m.Token(t.Context(), e.grant)
	if err == nil {
		t.Fatal("Token succeeded")
	}
	if msg := err.Error(); len(msg) > 1000 || strings.Contains(msg, "\x1b") {
		t.Errorf("error of %d bytes, escape sequences %v: want bounded and printable", len(msg), strings.Contains(msg, "\x1b"))
	}
	logs := e.logs.String()
	if strings.Contains(logs, "\x1b") || len(logs) > 20_000 {
		t.Errorf("logs of %d bytes, escape sequences %v", len(logs), strings.Contains(logs, "\x1b"))
	}
}
