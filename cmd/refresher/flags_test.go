package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"

	"github.com/tokenmgr/tokenmgr/internal/cli"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
)

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "registrations.json")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// PKCE in /connect: off by default for atlassian (its 3LO documentation
// does not describe it), on for the other providers; --pkce sets it for
// every registration, a registration's "pkce" in --config for itself.
func TestPKCEDefaults(t *testing.T) {
	env := map[string]string{"TOKENMGR_REDIS_URL": "redis://127.0.0.1:1", "TOKENMGR_ENCRYPTION_KEY": testKey, "TOKENMGR_CLIENT_ID": "c",
		"TOKENMGR_CLIENT_SECRET": "s", "S": "s"}
	getenv := func(k string) string { return env[k] }
	for _, tc := range []struct {
		args []string
		want bool
	}{
		{[]string{"--provider", "atlassian"}, false},
		{[]string{"--provider", "strict", "--token-url", "https://idp.example/token"}, true},
		{[]string{"--provider", "xero", "--token-url", "https://idp.example/token"}, true},
		{[]string{"--provider", "atlassian", "--pkce"}, true},
		{[]string{"--provider", "atlassian", "--pkce=true"}, true},
		{[]string{"--provider", "strict", "--token-url", "https://idp.example/token", "--pkce=false"}, false},
	} {
		c, err := parseRunFlags(tc.args, getenv, io.Discard)
		if err != nil {
			t.Fatalf("%v: %v", tc.args, err)
		}
		if got := c.regs[0].usePKCE(c.pkce); got != tc.want {
			t.Errorf("%v: PKCE %v, want %v", tc.args, got, tc.want)
		}
	}
	if _, err := parseRunFlags([]string{"--pkce=maybe"}, getenv, io.Discard); cli.Exit("x", err, io.Discard) != 2 {
		t.Errorf("--pkce=maybe: %v, want a usage error", err)
	}
	cfg := writeConfig(t, `{"registrations": [
		{"name": "a", "provider": "atlassian", "client_id": "a", "client_secret_env": "S", "grants": ["a"]},
		{"name": "a-on", "provider": "atlassian", "client_id": "a", "client_secret_env": "S", "grants": ["b"], "pkce": true},
		{"name": "s", "provider": "strict", "token_url": "https://idp.example/token", "client_id": "a", "client_secret_env": "S", "grants": ["c"]},
		{"name": "s-off", "provider": "strict", "token_url": "https://idp.example/token", "client_id": "a", "client_secret_env": "S", "grants": ["d"], "pkce": false}]}`)
	for _, tc := range []struct {
		flags []string
		want  []bool
	}{
		{nil, []bool{false, true, true, false}},
		{[]string{"--pkce"}, []bool{true, true, true, false}},
		{[]string{"--pkce=false"}, []bool{false, true, false, false}},
	} {
		c, err := parseRunFlags(append([]string{"--config", cfg}, tc.flags...), getenv, io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		for i, r := range c.regs {
			if got := r.usePKCE(c.pkce); got != tc.want[i] {
				t.Errorf("%v: registration %s: PKCE %v, want %v", tc.flags, r.name, got, tc.want[i])
			}
		}
	}
}

// The previous client secret reaches each registration's
// tokenmgr.Options: from TOKENMGR_CLIENT_SECRET_PREVIOUS or
// --client-secret-previous-file with flags, from the registration's own
// client_secret_previous_env or _file in --config (never another's
// variable); and it is never printed, neither in errors nor in the log.
func TestPreviousSecretReachesOptions(t *testing.T) {
	const prev, other = "previous-s3cret-value", "someone-elses-previous"
	prevFile := filepath.Join(t.TempDir(), "prev")
	_ = os.WriteFile(prevFile, []byte(prev+"\n"), 0o600)
	env := map[string]string{"TOKENMGR_REDIS_URL": "redis://127.0.0.1:1", "TOKENMGR_ENCRYPTION_KEY": testKey, "TOKENMGR_CLIENT_ID": "c",
		"TOKENMGR_CLIENT_SECRET": "current", "S": "current", "P": prev, cli.EnvClientSecretPrevious: prev}
	getenv := func(k string) string { return env[k] }
	options := func(args ...string) []string {
		t.Helper()
		c, err := parseRunFlags(args, getenv, io.Discard)
		if err != nil {
			t.Fatalf("%v: %v", args, err)
		}
		var out []string
		for _, r := range c.regs {
			o, err := r.common.Options()
			if err != nil {
				t.Fatal(err)
			}
			cli.CloseClients(o)
			out = append(out, o.PreviousClientSecret)
		}
		return out
	}
	if got := options(); len(got) != 1 || got[0] != prev {
		t.Errorf("from %s: %q", cli.EnvClientSecretPrevious, got)
	}
	delete(env, cli.EnvClientSecretPrevious)
	if got := options("--client-secret-previous-file", prevFile); got[0] != prev {
		t.Errorf("from --client-secret-previous-file: %q", got)
	}
	if got := options(); got[0] != "" {
		t.Errorf("none configured: %q", got)
	}
	env[cli.EnvClientSecretPrevious] = other // must not reach a --config registration
	cfg := writeConfig(t, fmt.Sprintf(`{"registrations": [
		{"name": "env", "provider": "atlassian", "client_id": "a", "client_secret_env": "S", "client_secret_previous_env": "P", "grants": ["a"]},
		{"name": "file", "provider": "atlassian", "client_id": "a", "client_secret_env": "S", "client_secret_previous_file": %q, "grants": ["b"]},
		{"name": "none", "provider": "atlassian", "client_id": "a", "client_secret_env": "S", "grants": ["c"]}]}`, prevFile))
	if got := options("--config", cfg); len(got) != 3 || got[0] != prev || got[1] != prev || got[2] != "" {
		t.Errorf("--config: %q, want [%s %s \"\"]", got, prev, prev)
	}
	// Never printed: not in -h, not in an error, not in the log of a run
	// that starts (and stops at once: Redis is not there).
	var out, errOut bytes.Buffer
	env[cli.EnvClientSecretPrevious] = prev
	_ = run(t.Context(), []string{"run", "-h"}, getenv, strings.NewReader(""), &out, &errOut)
	_ = run(t.Context(), []string{"run", "--client-secret-previous-file", "/nonexistent"}, getenv, strings.NewReader(""), &out, &errOut)
	bad := writeConfig(t, `{"registrations": [{"name": "x", "provider": "atlassian", "client_id": "a", "client_secret_env": "S", "client_secret_previous_env": "P", "grants": ["bad name"]}]}`)
	_ = run(t.Context(), []string{"run", "--config", bad}, getenv, strings.NewReader(""), &out, &errOut)
	ctx, sigterm := context.WithCancel(t.Context())
	sigterm() // stop at once: what matters is what it logged on the way
	_ = run(ctx, []string{"run", "--listen", "127.0.0.1:0", "--log-level", "debug"}, getenv, strings.NewReader(""), &out, &errOut)
	if strings.Contains(out.String()+errOut.String(), prev) {
		t.Errorf("the previous secret was printed:\n%s\n%s", out.String(), errOut.String())
	}
	if !strings.Contains(errOut.String(), "a previous client secret is configured") {
		t.Errorf("the log does not say a previous secret is configured:\n%s", errOut.String())
	}
}

func TestDuplicateRegistrationNames(t *testing.T) {
	env := map[string]string{"TOKENMGR_REDIS_URL": "redis://127.0.0.1:1", "TOKENMGR_ENCRYPTION_KEY": testKey, "S": "s"}
	cfg := writeConfig(t, `{"registrations": [
		{"name": "jira", "provider": "atlassian", "client_id": "a", "client_secret_env": "S", "grants": ["a"]},
		{"name": "jira", "provider": "atlassian", "client_id": "b", "client_secret_env": "S", "grants": ["b"]}]}`)
	if _, err := parseRunFlags([]string{"--config", cfg}, func(k string) string { return env[k] }, io.Discard); err == nil || !strings.Contains(err.Error(), "registration jira: the name is taken") {
		t.Errorf("two registrations named jira: %v", err)
	}
}

// refresher probe: silent exit 0 when every --url answers 2xx; else exit 1
// with the status and the endpoint's reason; 2 for a command line that
// does not parse.
func TestProbe(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/ok" {
			_, _ = io.WriteString(w, "ok\n")
			return
		}
		http.Error(w, "draining: shutting down after SIGTERM", http.StatusServiceUnavailable)
	}))
	defer srv.Close()
	dead := httptest.NewServer(http.NotFoundHandler())
	dead.Close()
	for _, tc := range []struct {
		args   []string
		code   int
		stderr string
	}{
		{[]string{"--url", srv.URL + "/ok"}, 0, ""},
		{[]string{"--url", srv.URL + "/ok", "--url", srv.URL + "/ok", "--timeout", "5s"}, 0, ""},
		{[]string{"--url", srv.URL + "/readyz"}, 1, "503 Service Unavailable: draining: shutting down after SIGTERM"},
		{[]string{"--url", srv.URL + "/ok", "--url", srv.URL + "/readyz"}, 1, "/readyz: 503"},
		{[]string{"--url", dead.URL + "/healthz"}, 1, "connection refused"},
		{[]string{"--url", "ftp://x/"}, 2, "want an http:// or https:// URL"},
		{[]string{"--url", srv.URL, "--timeout", "0s"}, 1, "--timeout must be positive"},
		{[]string{"stray"}, 2, "unexpected arguments"},
	} {
		var out, errOut bytes.Buffer
		err := run(t.Context(), append([]string{"probe"}, tc.args...), func(string) string { return "" }, strings.NewReader(""), &out, &errOut)
		code := cli.Exit("refresher", err, &errOut)
		if code != tc.code || out.Len() != 0 || (tc.stderr == "" && errOut.Len() != 0) || !strings.Contains(errOut.String(), tc.stderr) {
			t.Errorf("probe %v: exit %d, stdout %q, stderr %q; want %d and stderr with %q", tc.args, code, out.String(), errOut.String(), tc.code, tc.stderr)
		}
	}
}

// seed --consented-at starts the absolute expiry countdown at the consent,
// not at the import; a consent in the future is refused.
func TestSeedConsentedAt(t *testing.T) {
	mr := miniredis.RunT(t)
	env := map[string]string{"TOKENMGR_REDIS_URL": "redis://" + mr.Addr(), "TOKENMGR_ENCRYPTION_KEY": testKey}
	getenv := func(k string) string { return env[k] }
	tok := `{"access_token":"a","refresh_token":"r","expires_in":3600}`
	consented := time.Now().Add(-200 * 24 * time.Hour).UTC().Truncate(time.Second)
	var out, errOut bytes.Buffer
	if err := run(t.Context(), []string{"seed", "--grant", "jira", "--provider", "atlassian", "--consented-at", consented.Format(time.RFC3339)}, getenv, strings.NewReader(tok), &out, &errOut); err != nil {
		t.Fatalf("seed: %v %s", err, errOut.String())
	}
	out.Reset()
	if err := run(t.Context(), []string{"status", "--grant", "jira", "--json"}, getenv, strings.NewReader(""), &out, &errOut); err != nil {
		t.Fatal(err)
	}
	var sts []tokenmgr.GrantStatus
	if err := json.Unmarshal(out.Bytes(), &sts); err != nil || len(sts) != 1 {
		t.Fatalf("status: %v %s", err, out.String())
	}
	if want := consented.Add(365 * 24 * time.Hour); !sts[0].AbsoluteExpiry.Equal(want) {
		t.Errorf("absolute expiry %s, want the consent + 365 days, %s", sts[0].AbsoluteExpiry, want)
	}
	future := time.Now().Add(time.Hour).UTC().Format(time.RFC3339)
	err := run(t.Context(), []string{"seed", "--grant", "jira", "--consented-at", future}, getenv, strings.NewReader(tok), &out, &errOut)
	if err == nil || !strings.Contains(err.Error(), "in the future") {
		t.Errorf("a consent in the future: %v", err)
	}
}

// --layout (or TOKENMGR_LAYOUT) reaches every registration's Options and
// the operator commands' Admin; a bad value is an error naming the flag.
func TestLayoutFlag(t *testing.T) {
	env := map[string]string{"TOKENMGR_REDIS_URL": "redis://127.0.0.1:1", "TOKENMGR_ENCRYPTION_KEY": testKey, "TOKENMGR_CLIENT_ID": "c",
		"TOKENMGR_CLIENT_SECRET": "s", "S": "s"}
	getenv := func(k string) string { return env[k] }
	layouts := func(args ...string) []tokenmgr.Layout {
		t.Helper()
		c, err := parseRunFlags(args, getenv, io.Discard)
		if err != nil {
			t.Fatalf("%v: %v", args, err)
		}
		var out []tokenmgr.Layout
		for _, r := range c.regs {
			o, err := r.common.Options()
			if err != nil {
				t.Fatal(err)
			}
			cli.CloseClients(o)
			a, err := r.common.AdminOptions()
			if err != nil {
				t.Fatal(err)
			}
			cli.CloseClients(a)
			if a.Layout != o.Layout {
				t.Errorf("%v: the Admin writes %v, the Manager %v", args, a.Layout, o.Layout)
			}
			out = append(out, o.Layout)
		}
		return out
	}
	if got := layouts(); got[0] != tokenmgr.LayoutHash {
		t.Errorf("default: %v, want LayoutHash", got)
	}
	if got := layouts("--layout", "pair"); got[0] != tokenmgr.LayoutPair {
		t.Errorf("--layout pair: %v", got)
	}
	cfg := writeConfig(t, `{"registrations": [
		{"name": "a", "provider": "atlassian", "client_id": "a", "client_secret_env": "S", "grants": ["a"]},
		{"name": "b", "provider": "atlassian", "client_id": "a", "client_secret_env": "S", "grants": ["b"]}]}`)
	if got := layouts("--layout", "pair", "--config", cfg); len(got) != 2 || got[0] != tokenmgr.LayoutPair || got[1] != tokenmgr.LayoutPair {
		t.Errorf("--config with --layout pair: %v", got)
	}
	env[cli.EnvLayout] = "pair"
	if got := layouts(); got[0] != tokenmgr.LayoutPair {
		t.Errorf("from %s: %v", cli.EnvLayout, got)
	}
	var out, errOut bytes.Buffer
	err := run(t.Context(), []string{"run", "--layout", "split\x1b[31m"}, getenv, strings.NewReader(""), &out, &errOut)
	if code := cli.Exit("refresher", err, &errOut); code != 1 || !strings.Contains(errOut.String(), "--layout") || strings.Contains(errOut.String(), "\x1b") {
		t.Errorf("--layout with a bad value: exit %d, %q", code, errOut.String())
	}
}
