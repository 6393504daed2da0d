package cli

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/oauth2"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
)

func parse(t *testing.T, env map[string]string, args ...string) (*Common, error) {
	t.Helper()
	fs := flag.NewFlagSet("test", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var c Common
	c.Register(fs, func(k string) string { return env[k] })
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	return &c, c.Validate()
}

func TestFlags(t *testing.T) {
	secretFile := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secretFile, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	key, _ := tokenmgr.GenerateKey("k1")
	env := map[string]string{EnvRedisURL: "redis://127.0.0.1:1", EnvClientID: "cid", EnvClientSecret: "from-env", EnvEncryptionKey: key.Encode()}
	c, err := parse(t, env, "--grant", "jira", "--client-secret-file", secretFile, "--auth-style", "header")
	if err != nil {
		t.Fatal(err)
	}
	cfg := c.OAuth2Config()
	if cfg.ClientSecret != "s3cret" || cfg.ClientID != "cid" || cfg.Endpoint.TokenURL != AtlassianTokenURL || cfg.Endpoint.AuthStyle != oauth2.AuthStyleInHeader {
		t.Errorf("config %+v", cfg.Endpoint)
	}
	if c, err := parse(t, env, "--grant", "jira"); err != nil || c.OAuth2Config().ClientSecret != "from-env" {
		t.Errorf("secret from env: %v", err)
	}

	bad := []struct {
		args []string
		env  map[string]string
		want string
	}{
		{[]string{"--grant", "a b"}, env, "--grant"},
		{[]string{"--grant", "g", "--provider", "google"}, env, `--provider "google"`},
		{[]string{"--grant", "g", "--auth-style", "auto"}, env, `--auth-style "auto"`},
		{[]string{"--grant", "g", "--provider", "strict"}, env, "--token-url is required"},
		{[]string{"--grant", "g"}, map[string]string{EnvClientID: "x", EnvClientSecret: "y", EnvEncryptionKey: key.Encode()}, "--redis"},
		{[]string{"--grant", "g"}, map[string]string{EnvRedisURL: "redis://h:1", EnvClientID: "x", EnvEncryptionKey: key.Encode()}, "no client secret"},
		{[]string{"--grant", "g"}, map[string]string{EnvRedisURL: "redis://h:1", EnvClientID: "x", EnvClientSecret: "y"}, "no encryption key"},
		{[]string{"--grant", "g", "--insecure-plaintext"}, env, "exclude each other"},
		{[]string{"--grant", "g"}, map[string]string{EnvRedisURL: "redis://h:1", EnvClientID: "x", EnvClientSecret: "y", EnvEncryptionKey: "k1:c2hvcnQ="}, "want 32"},
		{[]string{"--grant", "g", "--client-secret-file", "/nonexistent"}, env, "--client-secret-file"},
	}
	for _, tc := range bad {
		_, err := parse(t, tc.env, tc.args...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: error %v, want %q", tc.args, err, tc.want)
		}
	}
	if _, err := parse(t, env, "--client-secret", "x"); err == nil {
		t.Errorf("a bare --client-secret flag was accepted")
	}
}

func TestNewRedis(t *testing.T) {
	for _, u := range []string{"redis://127.0.0.1:6390/2", "rediss://u:p@h:6390", "redis+cluster://h:1?addr=h:2", "redis+sentinel://h:26379?master_name=m"} {
		c, err := NewRedis(u)
		if err != nil {
			t.Errorf("%s: %v", u, err)
			continue
		}
		c.Close()
	}
	for _, u := range []string{"localhost:6379", "http://h:1", "redis+mesh://h:1"} {
		if _, err := NewRedis(u); err == nil {
			t.Errorf("%s accepted", u)
		}
	}
	for _, u := range []string{"redis://user:hunter2@h:1/notadb", "redis://user:hun%zzter2@h:1", "redis+sentinel://h:1?master_name=m&sentinel_password=hunter2&bogus=1",
		"hunter2@nowhere", "redis://user:hun/ter2@h:1", "redis://user:hun?ter2@h:1", "redis://user:hun#ter2@h:1", "redis://user:hu@nter2@h:1/x"} {
		_, err := NewRedis(u)
		if err == nil || strings.Contains(err.Error(), "hunter2") || strings.Contains(err.Error(), "hun") || strings.Contains(err.Error(), "nter2") {
			t.Errorf("%s: error %v must not show the password", u, err)
		}
	}
}

func TestPlaintextOptOut(t *testing.T) {
	env := map[string]string{EnvRedisURL: "redis://127.0.0.1:1", EnvClientID: "cid", EnvClientSecret: "s"}
	c, err := parse(t, env, "--grant", "g", "--insecure-plaintext")
	if err != nil || c.sealer() != nil {
		t.Errorf("opt-out: %v", err)
	}
}

func TestExit(t *testing.T) {
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Int("n", 0, "")
	for _, tc := range []struct {
		err  error
		want int
	}{
		{nil, 0},
		{Parse(fs, []string{"-h"}), 0},
		{Parse(fs, []string{"--nope"}), 2},
		{Parse(fs, []string{"-n", "many"}), 2},
		{Parse(fs, []string{"stray"}), 2},
		{Usagef("unknown command %q", "frobnicate"), 2},
		{fmt.Errorf("config: %w", Usagef("wrapped")), 2},
		{errors.New("--grant: invalid grant name"), 1},
	} {
		if got := Exit("x", tc.err, io.Discard); got != tc.want {
			t.Errorf("Exit(%v) = %d, want %d", tc.err, got, tc.want)
		}
	}
}

// The previous client secret, from its file or TOKENMGR_CLIENT_SECRET_PREVIOUS,
// reaches tokenmgr.Options.PreviousClientSecret; it is optional, one equal
// to the current secret is dropped, and no error quotes it.
func TestPreviousClientSecret(t *testing.T) {
	dir := t.TempDir()
	prevFile, emptyFile := filepath.Join(dir, "prev"), filepath.Join(dir, "empty")
	_ = os.WriteFile(prevFile, []byte("old-s3cret-from-file\n"), 0o600)
	_ = os.WriteFile(emptyFile, []byte("\n"), 0o600)
	env := map[string]string{EnvRedisURL: "redis://127.0.0.1:1", EnvClientID: "cid", EnvClientSecret: "new-s3cret", EnvClientSecretPrevious: "old-s3cret-from-env"}
	noPrev := map[string]string{EnvRedisURL: "redis://127.0.0.1:1", EnvClientID: "cid", EnvClientSecret: "new-s3cret"}
	same := map[string]string{EnvRedisURL: "redis://127.0.0.1:1", EnvClientID: "cid", EnvClientSecret: "new-s3cret", EnvClientSecretPrevious: "new-s3cret"}
	for _, tc := range []struct {
		name string
		env  map[string]string
		args []string
		want string
	}{
		{"env", env, nil, "old-s3cret-from-env"},
		{"file wins over env", env, []string{"--client-secret-previous-file", prevFile}, "old-s3cret-from-file"},
		{"none", noPrev, nil, ""},
		{"same as current", same, nil, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := parse(t, tc.env, append([]string{"--grant", "g", "--insecure-plaintext"}, tc.args...)...)
			if err != nil {
				t.Fatal(err)
			}
			o, err := c.Options()
			if err != nil {
				t.Fatal(err)
			}
			defer CloseClients(o)
			if o.PreviousClientSecret != tc.want || c.HasPreviousSecret() != (tc.want != "") {
				t.Errorf("PreviousClientSecret %q, want %q", o.PreviousClientSecret, tc.want)
			}
			if o.OAuth2.ClientSecret != "new-s3cret" {
				t.Errorf("the current secret changed: %q", o.OAuth2.ClientSecret)
			}
		})
	}
	// A registration that names no variable of its own reads none.
	c, _ := parse(t, env, "--grant", "g", "--insecure-plaintext")
	c.PreviousSecretEnv = NoSecretEnv
	if err := c.Validate(); err != nil || c.HasPreviousSecret() {
		t.Errorf("NoSecretEnv read a previous secret: %v", err)
	}
	for _, f := range []string{"/nonexistent", emptyFile} {
		_, err := parse(t, env, "--grant", "g", "--insecure-plaintext", "--client-secret-previous-file", f)
		if err == nil || !strings.Contains(err.Error(), "--client-secret-previous-file") || strings.Contains(err.Error(), "s3cret") {
			t.Errorf("%s: error %v, want one naming the flag and no secret", f, err)
		}
	}
}
