package main

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tokenmgr/tokenmgr/internal/redisserver"
	"github.com/tokenmgr/tokenmgr/internal/testbin"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
)

// The operator commands and "refresher run", exercised as a user runs them: real
// binaries, a real redis-server, the fakeidp binary.

var buildBinaries = sync.OnceValues(func() (string, error) { return testbin.Build("refresher", "fakeidp") })

type binEnv struct {
	t      *testing.T
	key    string // TOKENMGR_ENCRYPTION_KEY
	bin    string
	redis  *redisserver.Server
	idpURL string
}

func newBinEnv(t *testing.T, idpArgs ...string) *binEnv {
	srv := redisserver.Start(t)
	bin, err := buildBinaries()
	if err != nil {
		t.Fatal(err)
	}
	idpURL := testbin.StartFakeIdP(t, bin, append([]string{"--auth-style", "params"}, idpArgs...)...)
	key, _ := tokenmgr.GenerateKey("k1")
	return &binEnv{t: t, key: key.Encode(), bin: bin, redis: srv, idpURL: idpURL}
}

func (b *binEnv) env() []string {
	return append(os.Environ(), "TOKENMGR_REDIS_URL="+b.redis.URL(), "TOKENMGR_CLIENT_ID=client-id",
		"TOKENMGR_CLIENT_SECRET=client-secret", "TOKENMGR_ENCRYPTION_KEY="+b.key)
}

// refresher runs the binary to completion.
func (b *binEnv) refresher(stdin string, args ...string) (stdout, stderr string, code int) {
	cmd := exec.Command(filepath.Join(b.bin, "refresher"), args...)
	cmd.Env = b.env()
	cmd.Stdin = strings.NewReader(stdin)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		b.t.Fatal(err)
	}
	return o.String(), e.String(), code
}

func (b *binEnv) newGrantJSON() (string, map[string]any) {
	resp, err := http.Post(b.idpURL+"/admin/grant", "", nil)
	if err != nil {
		b.t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var m map[string]any
	_ = json.Unmarshal(raw, &m)
	return string(raw), m
}

func (b *binEnv) idpStats() map[string]int64 {
	resp, err := http.Get(b.idpURL + "/stats")
	if err != nil {
		b.t.Fatal(err)
	}
	defer resp.Body.Close()
	var m map[string]int64
	_ = json.NewDecoder(resp.Body).Decode(&m)
	return m
}

func TestOperatorCommands(t *testing.T) {
	b := newBinEnv(t, "--profile", "strict")
	grantJSON, tok := b.newGrantJSON()
	secrets := []string{tok["access_token"].(string), tok["refresh_token"].(string)}
	var outputs []string
	check := func(out, errOut string) {
		outputs = append(outputs, out, errOut)
	}

	out, errOut, code := b.refresher(grantJSON, "seed", "--grant", "jira")
	check(out, errOut)
	if code != 0 || !strings.Contains(out, "grant jira seeded: version 1") {
		t.Fatalf("seed: %d %q %q", code, out, errOut)
	}
	out, errOut, code = b.refresher("", "status", "--json")
	check(out, errOut)
	var sts []map[string]any
	if err := json.Unmarshal([]byte(out), &sts); err != nil || code != 0 || len(sts) != 1 || sts[0]["version"].(float64) != 1 || sts[0]["status"] != "ok" {
		t.Fatalf("status --json: %d %q %v", code, out, err)
	}
	out, errOut, code = b.refresher("", "rotate", "--grant", "jira", "--provider", "strict", "--token-url", b.idpURL+"/oauth/token")
	check(out, errOut)
	if code != 0 || !strings.Contains(out, "grant jira rotated: version 2") {
		t.Fatalf("rotate: %d %q %q", code, out, errOut)
	}
	out, errOut, code = b.refresher("", "status", "--grant", "jira")
	check(out, errOut)
	if code != 0 || !strings.Contains(out, "GRANT") || !strings.Contains(out, "jira") || !strings.Contains(out, " 2 ") {
		t.Fatalf("status: %d %q", code, out)
	}
	if s := b.idpStats(); s["rotations"] != 1 || s["reuse_detected"] != 0 {
		t.Errorf("IdP %v", s)
	}
	rdb := redis.NewClient(&redis.Options{Addr: b.redis.Addr()})
	defer rdb.Close()
	raw, _ := rdb.HGetAll(t.Context(), "tm:{jira}:tok").Result()
	if !strings.HasPrefix(raw["refresh_token"], "enc:v1:k1:") {
		t.Errorf("refresh token not encrypted at rest")
	}
	for _, v := range raw {
		outputs = append(outputs, v)
	}
	_, errOut, code = b.refresher("", "status", "--insecure-plaintext")
	if code != 1 || !strings.Contains(errOut, "exclude each other") {
		t.Errorf("key and opt-out together: %d %q", code, errOut)
	}

	// Bad input: a clear error, exit status 1, nothing stored, no token echoed.
	for _, tc := range []struct{ stdin, want string }{
		{`{"access_token": "` + secrets[0] + `",`, "malformed"},
		{`{"access_token": "` + secrets[0] + `"}`, "needs access_token and refresh_token"},
		{`{"access_token": "` + secrets[0] + `", "refresh_token": 7, "expires_in": 60}`, "wrong type"},
		{`{"access_token": "` + secrets[0] + `", "refresh_token": "x", "expiry": "tomorrow"}`, "not RFC 3339"},
		{``, "no token JSON"},
	} {
		out, errOut, code = b.refresher(tc.stdin, "seed", "--grant", "jira")
		check(out, errOut)
		if code != 1 || !strings.Contains(errOut, tc.want) {
			t.Errorf("seed %q: exit %d, stderr %q, want %q", tc.stdin, code, errOut, tc.want)
		}
	}
	_, errOut, code = b.refresher("", "status", "--grant", "bad grant")
	if code != 1 || !strings.Contains(errOut, "--grant") {
		t.Errorf("bad grant name: %d %q", code, errOut)
	}
	_, errOut, code = b.refresher("", "frobnicate")
	if code != 2 || !strings.Contains(errOut, "unknown command") {
		t.Errorf("unknown command: %d %q, want 2 (usage)", code, errOut)
	}
	if _, errOut, code = b.refresher("", "status", "--nope"); code != 2 || !strings.Contains(errOut, "flag provided but not defined") {
		t.Errorf("unknown flag: %d %q, want 2 (usage)", code, errOut)
	}
	if _, _, code = b.refresher("", "status", "-h"); code != 0 {
		t.Errorf("status -h: %d, want 0", code)
	}
	out, _, _ = b.refresher("", "status", "--json")
	if !strings.Contains(out, `"version": 2`) {
		t.Errorf("bad input changed the grant: %s", out)
	}
	for _, o := range outputs {
		for _, s := range secrets {
			if strings.Contains(o, s) {
				t.Errorf("a token appears in the commands' output")
			}
		}
	}
}

// SIGTERM during an in-flight refresh: the refresh finishes and is written,
// the process exits 0, nothing is lost.
func TestSIGTERMDuringRefresh(t *testing.T) {
	b := newBinEnv(t, "--profile", "strict", "--latency", "2s")
	grantJSON, _ := b.newGrantJSON()
	var seed map[string]any
	_ = json.Unmarshal([]byte(grantJSON), &seed)
	seed["expires_in"] = 2 // due almost at once
	js, _ := json.Marshal(seed)
	if _, errOut, code := b.refresher(string(js), "seed", "--grant", "jira"); code != 0 {
		t.Fatalf("seed: %s", errOut)
	}
	cmd := exec.Command(filepath.Join(b.bin, "refresher"), "run", "--listen", "127.0.0.1:0", "--provider", "strict",
		"--token-url", b.idpURL+"/oauth/token", "--tick", "100ms", "--jitter", "0s")
	cmd.Env = b.env()
	var logs bytes.Buffer
	cmd.Stderr = &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	rdb := redis.NewClient(&redis.Options{Addr: b.redis.Addr()})
	defer rdb.Close()
	deadline := time.Now().Add(15 * time.Second)
	for {
		if n, _ := rdb.Exists(t.Context(), "tm:{jira}:intent").Result(); n == 1 {
			break // the refresh is in flight: intent written, IdP call pending
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			t.Fatalf("the refresher never started a refresh:\n%s", logs.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("exit: %v\n%s", err, logs.String())
		}
	case <-time.After(20 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatalf("no exit after SIGTERM:\n%s", logs.String())
	}
	v, _ := rdb.HGet(t.Context(), "tm:{jira}:tok", "v").Result()
	intent, _ := rdb.Exists(t.Context(), "tm:{jira}:intent").Result()
	lock, _ := rdb.Exists(t.Context(), "tm:{jira}:lock").Result()
	s := b.idpStats()
	if v != "2" || intent != 0 || lock != 0 || s["rotations"] != 1 {
		t.Errorf("after SIGTERM: version %s, intent %d, lock %d, IdP rotations %d; want 2, 0, 0, 1\n%s", v, intent, lock, s["rotations"], logs.String())
	}
}

// Key rotation as an operator does it: add a key, rewrap, drop the old key.
func TestRewrapCommand(t *testing.T) {
	b := newBinEnv(t, "--profile", "strict")
	grantJSON, _ := b.newGrantJSON()
	if _, errOut, code := b.refresher(grantJSON, "seed", "--grant", "jira"); code != 0 {
		t.Fatalf("seed: %s", errOut)
	}
	oldKey := b.key
	newKey, _ := tokenmgr.GenerateKey("k2")
	b.key = oldKey + "," + newKey.Encode()
	out, errOut, code := b.refresher("", "rewrap")
	if code != 0 || !strings.Contains(out, "rewrapped 1 of 1 grants") {
		t.Fatalf("rewrap: %d %q %q", code, out, errOut)
	}
	b.key = newKey.Encode()
	out, errOut, code = b.refresher("", "status", "--json")
	if code != 0 || !strings.Contains(out, `"status": "ok"`) {
		t.Fatalf("status with only the new key: %d %q %q", code, out, errOut)
	}
	// A damaged token field shows in status when the key is at hand.
	rdb := redis.NewClient(&redis.Options{Addr: b.redis.Addr()})
	defer rdb.Close()
	rdb.HSet(t.Context(), "tm:{jira}:tok", "access_token", "enc:v1:k2:garbage")
	out, _, _ = b.refresher("", "status", "--json")
	if !strings.Contains(out, `"status": "corrupt"`) || !strings.Contains(out, "access_token") {
		t.Errorf("status does not show the damaged field: %s", out)
	}
}

// rewrap --layout moves every grant into that layout at once, and back
// (before going back to a release that reads the hash alone).
func TestRewrapMovesLayout(t *testing.T) {
	b := newBinEnv(t, "--profile", "strict")
	grantJSON, _ := b.newGrantJSON()
	if _, errOut, code := b.refresher(grantJSON, "seed", "--grant", "jira"); code != 0 {
		t.Fatalf("seed: %s", errOut)
	}
	rdb := redis.NewClient(&redis.Options{Addr: b.redis.Addr()})
	defer rdb.Close()
	for _, tc := range []struct {
		layout string
		pair   int64
	}{{"pair", 1}, {"hash", 0}} {
		out, errOut, code := b.refresher("", "rewrap", "--layout", tc.layout)
		if code != 0 || !strings.Contains(out, "rewrapped 1 of 1 grants") {
			t.Fatalf("rewrap --layout %s: %d %q %q", tc.layout, code, out, errOut)
		}
		inHash, _ := rdb.HExists(t.Context(), "tm:{jira}:tok", "access_token").Result()
		if n, _ := rdb.Exists(t.Context(), "tm:{jira}:pair").Result(); n != tc.pair || inHash == (tc.pair == 1) {
			t.Errorf("after rewrap --layout %s: pair key %d, tokens in the hash %v", tc.layout, n, inHash)
		}
		if out, errOut, code := b.refresher("", "status", "--json"); code != 0 || !strings.Contains(out, `"status": "ok"`) {
			t.Errorf("status after rewrap --layout %s: %d %q %q", tc.layout, code, out, errOut)
		}
	}
}
