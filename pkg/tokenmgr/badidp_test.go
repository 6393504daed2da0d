package tokenmgr

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
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
		oauth: &oauth2.Config{ClientID: "c", Endpoint: oauth2.Endpoint{TokenURL: srv.URL, AuthStyle: oauth2.AuthStyleInParams}},
		core:  core{opts: Options{Provider: Provider{HTTPTimeout: 5 * time.Second}, IdPTransport: http.DefaultTransport, Now: time.Now}},
	}
	f.Fuzz(func(t *testing.T, b string, code int) {
		if code < 200 || code > 599 {
			return
		}
		body.Store(b)
		status.Store(int64(code))
		tok, _, err := m.callIdP(t.Context(), "rt")
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
		{"expires_in 1", `{"access_token":"a","token_type":"Bearer","expires_in":1,"refresh_token":"r2"}`, "", 200, minAccessTTL, 0},
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
