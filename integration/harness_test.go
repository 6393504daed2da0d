//go:build integration

// Package integration runs fleets of real processes (demo-workers,
// refreshers, the fake IdP) against real redis-server processes, under
// faults. Run alone with:
//
//	go test -tags integration -v ./integration/
package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
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
	"golang.org/x/oauth2"

	"github.com/tokenmgr/tokenmgr/internal/cli"
	"github.com/tokenmgr/tokenmgr/internal/redisserver"
	"github.com/tokenmgr/tokenmgr/internal/testbin"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
)

var binDir string

func TestMain(m *testing.M) {
	dir, err := testbin.Build("refresher", "demo-worker", "fakeidp")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// fleet is one scenario's world.
type fleet struct {
	t        *testing.T
	redisURL string // what the processes use; the store's URL unless a cluster
	grant    string
	key      string // TOKENMGR_ENCRYPTION_KEY
	store    *redisserver.Server
	idpURL   string
	profile  string
	procs    []*exec.Cmd
	logDir   string // process logs, printed when the test fails
}

func newFleet(t *testing.T, profile string, idpArgs ...string) *fleet {
	f := &fleet{t: t, grant: "jira", profile: profile, store: redisserver.Start(t)}
	f.redisURL = f.store.URL()
	f.startIdP(idpArgs)
	f.seed()
	return f
}

// newClusterFleet is newFleet on a Redis Cluster.
func newClusterFleet(t *testing.T, profile string, nodes []*redisserver.Server) *fleet {
	f := &fleet{t: t, grant: "jira", profile: profile, store: nodes[0]}
	f.redisURL = "redis+cluster://" + nodes[0].Addr() + "?addr=" + nodes[1].Addr() + "&addr=" + nodes[2].Addr()
	f.startIdP(nil)
	f.seed()
	return f
}

func (f *fleet) startIdP(idpArgs []string) {
	key, _ := tokenmgr.GenerateKey("k1")
	f.key = key.Encode()
	f.idpURL = testbin.StartFakeIdP(f.t, binDir, append([]string{"--profile", f.profile, "--access-ttl", "2s", "--auth-style", "params"}, idpArgs...)...)
}

func (f *fleet) provider() string {
	switch f.profile {
	case "grace":
		return "okta"
	case "grace-xero":
		return "xero"
	}
	return f.profile
}

func (f *fleet) env() []string {
	return append(os.Environ(), "TOKENMGR_REDIS_URL="+f.redisURL, "TOKENMGR_CLIENT_ID=client-id",
		"TOKENMGR_CLIENT_SECRET=client-secret", "TOKENMGR_ENCRYPTION_KEY="+f.key)
}

func (f *fleet) common() []string {
	return []string{"--grant", f.grant, "--provider", f.provider(), "--token-url", f.idpURL + "/oauth/token", "--http-timeout", "2s"}
}

func (f *fleet) rdb() redis.UniversalClient {
	c, err := cli.NewRedis(f.redisURL)
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() { c.Close() })
	return c
}

// seed creates a grant at the IdP and stores it, as an operator would.
func (f *fleet) seed() { f.seedGrant(f.grant) }

// seedGrant seeds grant with a new token family and returns its first pair.
func (f *fleet) seedGrant(grant string) *oauth2.Token {
	resp, err := http.Post(f.idpURL+"/admin/grant", "", nil)
	if err != nil {
		f.t.Fatal(err)
	}
	var tok struct {
		AccessToken  string `json:"access_token"`
		RefreshToken string `json:"refresh_token"`
		ExpiresIn    int64  `json:"expires_in"`
	}
	_ = json.NewDecoder(resp.Body).Decode(&tok)
	resp.Body.Close()
	kr, _ := tokenmgr.ParseKeyring(f.key)
	admin, err := tokenmgr.NewAdmin(tokenmgr.Options{Redis: f.rdb(), Sealer: kr, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		f.t.Fatal(err)
	}
	pair := &oauth2.Token{AccessToken: tok.AccessToken, RefreshToken: tok.RefreshToken,
		TokenType: "Bearer", Expiry: time.Now().Add(time.Duration(tok.ExpiresIn) * time.Second)}
	if _, err := admin.Seed(context.Background(), grant, pair, tokenmgr.SeedOptions{}); err != nil {
		f.t.Fatal(err)
	}
	return pair
}

// storedPair decrypts grant's current token pair from Redis.
func (f *fleet) storedPair(grant string) (access, refresh string, err error) {
	kr, err := tokenmgr.ParseKeyring(f.key)
	if err != nil {
		return "", "", err
	}
	raw, err := f.rdb().HMGet(context.Background(), "tm:{"+grant+"}:tok", "access_token", "refresh_token", "family", "v").Result()
	if err != nil {
		return "", "", err
	}
	// Values are sealed for field@family/v (docs/design.md, invariant 8).
	family, _ := raw[2].(string)
	v, _ := raw[3].(string)
	out := make([]string, 2)
	for i, field := range []string{"access_token", "refresh_token"} {
		s, _ := raw[i].(string)
		b, err := kr.Open(grant, field+"@"+family+"/"+v, s)
		if err != nil {
			return "", "", fmt.Errorf("open %s of %s: %w", field, grant, err)
		}
		out[i] = string(b)
	}
	return out[0], out[1], nil
}

// foreignRotation spends grant's refresh token outside the fleet, as a
// stray script with a copy of it would, and returns the pair it got.
func (f *fleet) foreignRotation(grant string) (*oauth2.Token, error) {
	_, rt, err := f.storedPair(grant)
	if err != nil {
		return nil, err
	}
	cfg := &oauth2.Config{ClientID: "client-id", ClientSecret: "client-secret", Endpoint: oauth2.Endpoint{TokenURL: f.idpURL + "/oauth/token", AuthStyle: oauth2.AuthStyleInParams}}
	return cfg.TokenSource(context.Background(), &oauth2.Token{RefreshToken: rt}).Token()
}

// start runs a process of ours in the background; it is killed at the end.
func (f *fleet) start(name string, args ...string) (*exec.Cmd, *bytes.Buffer) {
	cmd := exec.Command(filepath.Join(binDir, name), args...)
	cmd.Env = f.env()
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = f.logFile(name)
	if err := cmd.Start(); err != nil {
		f.t.Fatal(err)
	}
	f.procs = append(f.procs, cmd)
	f.t.Cleanup(func() { _ = cmd.Process.Kill(); _, _ = cmd.Process.Wait() })
	return cmd, &out
}

// logFile is where a process's log goes (they hold no tokens: invariant 8).
// When the test fails, the last lines of each are printed with it.
func (f *fleet) logFile(name string) *os.File {
	if f.logDir == "" {
		f.logDir = f.t.TempDir()
	}
	file, err := os.CreateTemp(f.logDir, name+"-*.log")
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() {
		file.Close()
		if !f.t.Failed() {
			return
		}
		b, _ := os.ReadFile(file.Name())
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		if len(lines) > 30 {
			lines = lines[len(lines)-30:]
		}
		if len(b) > 0 {
			f.t.Logf("last lines of %s:\n%s", filepath.Base(file.Name()), strings.Join(lines, "\n"))
		}
	})
	return file
}

// refresher starts a refresher pod.
func (f *fleet) refresher(extra ...string) *exec.Cmd {
	args := append([]string{"run", "--listen", "127.0.0.1:0", "--tick", "100ms", "--jitter", "0s", "--log-level", "warn"}, f.common()...)
	cmd, _ := f.start("refresher", append(args, extra...)...)
	return cmd
}

// report is a demo-worker's JSON report.
type report struct {
	Requests               int64            `json:"requests"`
	OK                     int64            `json:"ok"`
	Failed                 int64            `json:"failed"`
	UnauthorizedSeen       int64            `json:"unauthorized_seen"`
	UnauthorizedAfterRetry int64            `json:"unauthorized_after_retry"`
	Refreshes              int64            `json:"refreshes"`
	ReauthRequired         bool             `json:"reauth_required"`
	Failures               map[string]int64 `json:"failures"`
}

// workers runs n demo-workers for d and returns their reports.
func (f *fleet) workers(n int, d time.Duration, extra ...string) []report {
	return f.workersWith(n, d, func(int) []string { return extra })
}

// workersWith is workers with worker i's extra flags from extra(i).
func (f *fleet) workersWith(n int, d time.Duration, extra func(i int) []string) []report {
	type result struct {
		rep report
		err error
	}
	results := make([]result, n)
	logs := make([]*os.File, n)
	for i := range logs {
		logs[i] = f.logFile("demo-worker")
	}
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			args := append([]string{"--api-url", f.idpURL + "/rest/api/3/myself", "--concurrency", "2",
				"--duration", d.String(), "--report", "json", "--log-level", "error"}, f.common()...)
			cmd := exec.Command(filepath.Join(binDir, "demo-worker"), append(args, extra(i)...)...)
			cmd.Env = f.env()
			cmd.Stderr = logs[i]
			out, err := cmd.Output()
			if ee, ok := err.(*exec.ExitError); ok && ee.ExitCode() == 1 {
				err = nil // failures are in the report
			}
			results[i].err = err
			if err == nil {
				results[i].err = json.Unmarshal(out, &results[i].rep)
			}
		})
	}
	wg.Wait()
	var reps []report
	for i, r := range results {
		if r.err != nil {
			f.t.Fatalf("worker %d: %v", i, r.err)
		}
		reps = append(reps, r.rep)
	}
	return reps
}

func sum(reps []report) report {
	var s report
	s.Failures = map[string]int64{}
	for _, r := range reps {
		s.Requests += r.Requests
		s.OK += r.OK
		s.Failed += r.Failed
		s.UnauthorizedSeen += r.UnauthorizedSeen
		s.UnauthorizedAfterRetry += r.UnauthorizedAfterRetry
		s.Refreshes += r.Refreshes
		s.ReauthRequired = s.ReauthRequired || r.ReauthRequired
		for k, n := range r.Failures {
			s.Failures[k] += n
		}
	}
	return s
}

func (f *fleet) stats() map[string]int64 {
	resp, err := http.Get(f.idpURL + "/stats")
	if err != nil {
		f.t.Fatal(err)
	}
	defer resp.Body.Close()
	var m map[string]int64
	_ = json.NewDecoder(resp.Body).Decode(&m)
	return m
}

func (f *fleet) faults(q string) {
	resp, err := http.Post(f.idpURL+"/admin/faults?"+q, "", nil)
	if err != nil || resp.StatusCode != http.StatusNoContent {
		f.t.Fatalf("faults %s: %v %v", q, resp, err)
	}
	resp.Body.Close()
}

func (f *fleet) version() int64 {
	v, _ := f.rdb().HGet(context.Background(), "tm:{"+f.grant+"}:tok", "v").Int64()
	return v
}

// summary prints the scenario's figures on one line.
func (f *fleet) summary(name string, s report, idp map[string]int64) {
	line := fmt.Sprintf("SCENARIO %s: requests=%d ok=%d failed=%d 401_seen=%d 401_after_retry=%d rotations=%d idp_refresh_ok=%d idp_refresh_failed=%d reuse=%d revoked=%d version=%d failures=%v",
		name, s.Requests, s.OK, s.Failed, s.UnauthorizedSeen, s.UnauthorizedAfterRetry, idp["rotations"], idp["refresh_ok"], idp["refresh_failed"],
		idp["reuse_detected"], idp["families_revoked"], f.version(), s.Failures)
	f.t.Log(line)
	fmt.Println(line)
}

func signal(cmd *exec.Cmd, sig syscall.Signal) { _ = cmd.Process.Signal(sig) }

// waitRotations waits until the IdP has rotated the grant n times.
func (f *fleet) waitRotations(n int64) {
	for deadline := time.Now().Add(3 * time.Minute); f.stats()["rotations"] < n; time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			f.t.Errorf("fewer than %d rotations after 3 minutes", n)
			return
		}
	}
}
