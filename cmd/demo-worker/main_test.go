package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"golang.org/x/oauth2"

	"github.com/tokenmgr/tokenmgr/internal/compose"
	"github.com/tokenmgr/tokenmgr/internal/redisserver"
	"github.com/tokenmgr/tokenmgr/internal/testbin"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
)

func noEnv(string) string { return "" }

func TestFlagsRejected(t *testing.T) {
	for _, args := range [][]string{
		{"--concurrency", "0"}, {"--report", "xml"}, {"--profile", "google"}, {"--compare", "fancy"},
		{"--workers", "0"}, {"--access-ttl", "10ms"}, {"--log-level", "loud"}, {"stray"},
		{"--redis", "redis://127.0.0.1:1", "--grant", "g"},                           // no --api-url, client id or secret
		{"--api-url", "http://api", "--token-url", "http://idp", "--client-id", "c"}, // a worker without --redis is not the demo
		{"--requests", "2", "--workers", "4"},
	} {
		if _, err := parseFlags(args, noEnv, io.Discard); err == nil {
			t.Errorf("%v accepted", args)
		}
	}
}

// The embedded demo, short: the managed fleet has no failure and one IdP
// refresh per rotation; the naive fleet loses the grant.
func TestEmbeddedDemoCompareNaive(t *testing.T) {
	var out bytes.Buffer
	err := run(t.Context(), []string{"--compare", "naive", "--duration", "7s", "--report", "json", "--concurrency", "2"}, noEnv, &out, io.Discard)
	if err != nil {
		t.Fatalf("run: %v\n%s", err, out.String())
	}
	var got struct{ Fleets []fleetResult }
	if err := json.Unmarshal(out.Bytes(), &got); err != nil || len(got.Fleets) != 2 {
		t.Fatalf("report %q: %v", out.String(), err)
	}
	managed, naive := got.Fleets[0], got.Fleets[1]
	t.Logf("managed: %+v", managed)
	t.Logf("naive:   %+v", naive)
	if managed.Failed != 0 || managed.OK == 0 || managed.GrantLost {
		t.Errorf("managed fleet: %d failed of %d, grant lost %v", managed.Failed, managed.Requests, managed.GrantLost)
	}
	if managed.Rotations < 2 || managed.IdPRefreshCalls != managed.Rotations || managed.ReuseDetected != 0 {
		t.Errorf("managed fleet: %d IdP refresh calls for %d rotations, %d reuse", managed.IdPRefreshCalls, managed.Rotations, managed.ReuseDetected)
	}
	if managed.Refreshes != managed.Rotations {
		t.Errorf("managers report %d refreshes, IdP %d rotations", managed.Refreshes, managed.Rotations)
	}
	if !naive.GrantLost || naive.FamiliesRevoked == 0 || naive.Failed == 0 {
		t.Errorf("naive fleet kept the grant: %+v", naive)
	}
}

func TestEmbeddedDemoRequestBudget(t *testing.T) {
	var out bytes.Buffer
	if err := run(t.Context(), []string{"--requests", "203", "--workers", "4", "--report", "json", "--stagger", "0s"}, noEnv, &out, io.Discard); err != nil {
		t.Fatalf("run: %v\n%s", err, out.String())
	}
	var got struct{ Fleets []fleetResult }
	if err := json.Unmarshal(out.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	if r := got.Fleets[0]; r.Requests != 203 || r.OK != 203 {
		t.Errorf("--requests 203 made %d requests (%d ok)", r.Requests, r.OK)
	}
}

func TestEmbeddedDemoText(t *testing.T) {
	var out bytes.Buffer
	if err := run(t.Context(), []string{"--duration", "2500ms", "--workers", "2", "--concurrency", "1"}, noEnv, &out, io.Discard); err != nil {
		t.Fatalf("run: %v\n%s", err, out.String())
	}
	for _, want := range []string{"embedded demo:", "[managed (tokenmgr)]   1s", "IdP refresh calls", "grant                   alive"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}

// buildBinaries compiles the commands once per test run.
var buildBinaries = sync.OnceValues(func() (string, error) { return testbin.Build("demo-worker", "fakeidp") })

// Real demo-worker processes against the fakeidp binary and a real
// redis-server: their JSON reports add up to the IdP's counters.
func TestProcessesAddUpToIdPCounters(t *testing.T) {
	srv := redisserver.Start(t)
	bin, err := buildBinaries()
	if err != nil {
		t.Fatal(err)
	}
	idpURL := testbin.StartFakeIdP(t, bin, "--profile", "strict", "--access-ttl", "2s", "--auth-style", "params")

	// Seed the grant as an operator would.
	resp, err := http.Post(idpURL+"/admin/grant", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	var seed struct {
		AccessToken  string `json:"access_token"`
		RefreshToken string `json:"refresh_token"`
		ExpiresIn    int64  `json:"expires_in"`
	}
	_ = json.NewDecoder(resp.Body).Decode(&seed)
	resp.Body.Close()
	rdb := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	defer rdb.Close()
	key, _ := tokenmgr.GenerateKey("k1")
	keyring, _ := tokenmgr.NewKeyring(key)
	m, err := tokenmgr.New(t.Context(), tokenmgr.Options{
		Redis:    rdb,
		Sealer:   keyring,
		OAuth2:   &oauth2.Config{ClientID: "client-id", ClientSecret: "client-secret", Endpoint: oauth2.Endpoint{TokenURL: idpURL + "/oauth/token", AuthStyle: oauth2.AuthStyleInParams}},
		Provider: tokenmgr.Strict,
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Seed(t.Context(), "jira", &oauth2.Token{AccessToken: seed.AccessToken, RefreshToken: seed.RefreshToken, TokenType: "Bearer",
		Expiry: time.Now().Add(time.Duration(seed.ExpiresIn) * time.Second)}, tokenmgr.SeedOptions{}); err != nil {
		t.Fatal(err)
	}
	_ = m.Close(context.Background())

	const workers = 3
	reports := make([]report, workers)
	var wg sync.WaitGroup
	for i := range workers {
		wg.Go(func() {
			cmd := exec.CommandContext(t.Context(), filepath.Join(bin, "demo-worker"),
				"--redis", srv.URL(), "--grant", "jira", "--provider", "strict", "--token-url", idpURL+"/oauth/token",
				"--api-url", idpURL+"/rest/api/3/myself", "--concurrency", "4", "--duration", "6s", "--report", "json", "--http-timeout", "2s")
			cmd.Env = append(os.Environ(), "TOKENMGR_CLIENT_ID=client-id", "TOKENMGR_CLIENT_SECRET=client-secret", "TOKENMGR_ENCRYPTION_KEY="+key.Encode())
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			out, err := cmd.Output()
			if err != nil {
				t.Errorf("worker %d: %v\n%s\n%s", i, err, out, stderr.String())
				return
			}
			if err := json.Unmarshal(out, &reports[i]); err != nil {
				t.Errorf("worker %d report %q: %v", i, out, err)
			}
		})
	}
	wg.Wait()

	resp, err = http.Get(idpURL + "/stats")
	if err != nil {
		t.Fatal(err)
	}
	var idp map[string]int64
	_ = json.NewDecoder(resp.Body).Decode(&idp)
	resp.Body.Close()
	var sum report
	for _, r := range reports {
		sum.Requests += r.Requests
		sum.OK += r.OK
		sum.Failed += r.Failed
		sum.UnauthorizedSeen += r.UnauthorizedSeen
		sum.Refreshes += r.Refreshes
	}
	t.Logf("workers: %+v; IdP: %v", sum, idp)
	if sum.Failed != 0 || sum.OK == 0 {
		t.Errorf("%d failed requests of %d", sum.Failed, sum.Requests)
	}
	if idp["rotations"] < 2 || sum.Refreshes != idp["rotations"] || idp["refresh_ok"] != idp["rotations"] || idp["reuse_detected"] != 0 {
		t.Errorf("workers refreshed %d times; IdP: %d rotations, %d ok refreshes, %d reuse", sum.Refreshes, idp["rotations"], idp["refresh_ok"], idp["reuse_detected"])
	}
	if sum.OK != idp["api_200"] || sum.UnauthorizedSeen != idp["api_401"] {
		t.Errorf("workers: %d ok and %d 401s; IdP answered %d 200s and %d 401s", sum.OK, sum.UnauthorizedSeen, idp["api_200"], idp["api_401"])
	}
}

// docker-compose.yml cannot run here: check that its demo-worker command
// parses with the flags this binary really has.
func TestComposeCommands(t *testing.T) {
	f, err := compose.Load("../../docker-compose.yml")
	if err != nil {
		t.Fatal(err)
	}
	cmds := f.Commands("demo-worker")
	if len(cmds) == 0 {
		t.Fatal("no demo-worker service")
	}
	for name, args := range cmds {
		c, err := parseFlags(args, f.Services[name].Env(), io.Discard)
		if err != nil {
			t.Errorf("service %s: %v", name, err)
			continue
		}
		if c.embedded() {
			t.Errorf("service %s would run the embedded demo, not a worker", name)
		}
	}
}

// Exit status 0 for -h, 2 for a command line that does not parse, 1 for
// flags that parse but cannot work and for failed requests; the binary
// too, since main is where the status is made.
func TestExitStatus(t *testing.T) {
	cases := []struct {
		args []string
		want int
	}{
		{[]string{"-h"}, 0},
		{[]string{"--nope"}, 2},
		{[]string{"--duration", "long"}, 2},
		{[]string{"stray"}, 2},
		{[]string{"--concurrency", "0"}, 1},
		{[]string{"--report", "xml"}, 1},
		{[]string{"--redis", "redis://127.0.0.1:1", "--grant", "g"}, 1},
	}
	for _, tc := range cases {
		if got := exitStatus(run(t.Context(), tc.args, noEnv, io.Discard, io.Discard), io.Discard); got != tc.want {
			t.Errorf("demo-worker %v: exit %d, want %d", tc.args, got, tc.want)
		}
	}
	if got := exitStatus(fmt.Errorf("load: %w", errFailures), io.Discard); got != 1 {
		t.Errorf("failed requests: exit %d, want 1", got)
	}
	bin, err := buildBinaries()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range cases {
		cmd := exec.Command(filepath.Join(bin, "demo-worker"), tc.args...)
		cmd.Env = []string{}
		err := cmd.Run()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		if code != tc.want {
			t.Errorf("the demo-worker binary %v: exit %d, want %d", tc.args, code, tc.want)
		}
	}
}
