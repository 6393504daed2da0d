package tokenmgr

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/redis/go-redis/v9"
	"golang.org/x/oauth2"
)

// Invariant 3: combinations that cannot work are refused with a reason.
func TestOptionsRejected(t *testing.T) {
	rdb := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"}) // never dialled
	t.Cleanup(func() { rdb.Close() })
	valid := func() Options {
		return Options{
			Redis:    rdb,
			OAuth2:   &oauth2.Config{ClientID: "id", Endpoint: oauth2.Endpoint{TokenURL: "https://idp.example/token", AuthStyle: oauth2.AuthStyleInHeader}},
			Provider: Atlassian,
			Sealer:   plaintext{},
		}
	}
	tests := []struct {
		name string
		mod  func(*Options)
		want string
	}{
		{"no redis", func(o *Options) { o.Redis = nil }, "Options.Redis is required"},
		{"no oauth2", func(o *Options) { o.OAuth2 = nil }, "Options.OAuth2 is required"},
		{"no client id", func(o *Options) { o.OAuth2.ClientID = "" }, "ClientID is required"},
		{"no token url", func(o *Options) { o.OAuth2.Endpoint.TokenURL = "" }, "TokenURL is required"},
		{"auto-detected auth style", func(o *Options) { o.OAuth2.Endpoint.AuthStyle = oauth2.AuthStyleAutoDetect }, "presents the same refresh token twice"},
		{"no provider", func(o *Options) { o.Provider = Provider{} }, "Options.Provider is required"},
		{"no sealer and no opt-out", func(o *Options) { o.Sealer = nil }, "Options.Sealer is required"},
		{"lease too short to extend", func(o *Options) { o.LeaseTTL = 500 * time.Millisecond }, "lease TTL 500ms must be at least 1s"},
		// The worst case from a first presentation to a successor's replay:
		// the call, the write with the lease kept alive, the lease running
		// out, the successor's own call.
		{"recovery window beyond leeway", func(o *Options) { o.Provider = Okta; o.LeaseTTL = 16 * time.Second },
			`crash-recovery window 31s (lease TTL 16s + 3 x HTTP timeout 5s`},
		{"recovery window beyond leeway by the timeout", func(o *Options) { o.Provider = Okta; o.Provider.HTTPTimeout = 10 * time.Second },
			`crash-recovery window 33s (lease TTL 3s + 3 x HTTP timeout 10s`},
		{"MinReplicas without a single or cluster client", func(o *Options) { o.MinReplicas = 1; o.Redis = redis.NewRing(&redis.RingOptions{}) }, "MinReplicas needs"},
		{"fraction too large", func(o *Options) { o.MaxRefreshFraction = 0.9 }, "MaxRefreshFraction 0.9 must be in (0, 0.5]"},
		{"negative duration", func(o *Options) { o.RefreshBefore = -time.Second }, "must not be negative"},
		{"brace in prefix", func(o *Options) { o.KeyPrefix = "a{b" }, "must not contain braces"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o := valid()
			cfg := *o.OAuth2
			o.OAuth2 = &cfg
			tc.mod(&o)
			_, err := New(context.Background(), o)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("New = %v, want an error containing %q", err, tc.want)
			}
		})
	}
	t.Run("defaults fit every preset", func(t *testing.T) {
		for _, p := range []Provider{Atlassian, Strict, Okta, Xero, NonRotating} {
			o := valid()
			o.Provider = p
			o.Logger = discardLogger()
			m, err := New(context.Background(), o)
			if err != nil {
				t.Errorf("%s: %v", p.Name, err)
				continue
			}
			if m.opts.LeaseTTL != 3*time.Second || m.opts.WaitTimeout != p.HTTPTimeout+6*time.Second {
				t.Errorf("%s: default lease %s and wait %s, want 3s and the HTTP timeout %s + 6s", p.Name, m.opts.LeaseTTL, m.opts.WaitTimeout, p.HTTPTimeout)
			}
			_ = m.Close(context.Background())
		}
	})
}

func TestValidateGrantName(t *testing.T) {
	for name, ok := range map[string]bool{
		"jira-prod": true, "a/b": true, "x:y%2F": true, strings.Repeat("g", 200): true,
		"": false, strings.Repeat("g", 201): false, "bad{grant}": false, "two words": false, "line\n": false, ".": false, "..": false, "...": true,
		"jira-ü": true, "nb\u00a0sp": false, "ls\u2028": false, "bidi\u202e": false, "esc\x1b[31m": false, "bell\a": false, "bad\xffutf8": false, "zw\u200b": false,
	} {
		if err := ValidateGrantName(name); (err == nil) != ok {
			t.Errorf("ValidateGrantName(%q) = %v, want ok=%v", name, err, ok)
		}
	}
}

// FuzzValidators: the checks of untrusted names and values never accept
// what would break a key, a header or a person's terminal, and what a
// person reads of them is bounded and printable.
func FuzzValidators(f *testing.F) {
	for _, s := range []string{"jira-prod", "a{b}", "x y", "\u202e", "\x1b[31m", "Bearer error=\"invalid_token\", error_description=\"scope\"", "ab==", "a\r\nb", "é"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if ValidateGrantName(s) == nil {
			if !utf8.ValidString(s) || strings.ContainsAny(s, "{} \t\r\n") || strings.IndexFunc(s, func(r rune) bool { return !unicode.IsPrint(r) || unicode.IsSpace(r) }) >= 0 {
				t.Fatalf("accepted grant name %q", s)
			}
		} else if msg := ValidateGrantName(s).Error(); len(msg) > 300 || strings.ContainsAny(msg, "\r\n\x1b") {
			t.Fatalf("the error for %q is unbounded or unprintable: %q", s, msg)
		}
		if checkAccessToken(s) == nil && strings.ContainsAny(s, " \r\n\t\x00:,\"") {
			t.Fatalf("accepted access token %q", s)
		}
		p := printable(s, 100)
		if len(p) > 100 || !utf8.ValidString(p) || strings.IndexFunc(p, func(r rune) bool { return unicode.IsControl(r) || unicode.Is(unicode.Cf, r) }) >= 0 {
			t.Fatalf("printable(%q) = %q", s, p)
		}
		h := http.Header{}
		h.Set("WWW-Authenticate", s)
		if reason, _ := challenge(h); len(reason) > maxChallenge {
			t.Fatalf("challenge reason of %d bytes", len(reason))
		}
	})
}
