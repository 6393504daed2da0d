package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"

	"github.com/tokenmgr/tokenmgr/internal/buildinfo"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

func get(t *testing.T, h http.Handler, path string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
	return rec.Code, rec.Body.String()
}

// seedHour seeds grant with a token that expires in an hour; 51 minutes
// on, it is due for the refresher (10 minutes before expiry) and outside
// the workers' margin (5).
func seedHour(t *testing.T, w *world, rf *single, grant string) {
	t.Helper()
	tok := w.idp.NewGrant("")
	tok.Expiry = w.clock.Now().Add(time.Hour)
	if _, err := rf.m.Seed(t.Context(), grant, tok, tokenmgr.SeedOptions{}); err != nil {
		t.Fatal(err)
	}
}

// /healthz fails, with the registration and how long, once a scheduler
// loop has not completed a tick for max(3 x --tick, 30 s); the start
// counts as a tick; a completed tick makes it healthy again. The clock is
// the test's: nothing waits.
func TestHealthzTickBound(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	c := defaultRun()
	c.tick = 2 * time.Second
	wall := tokenmgrtest.NewClock(time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC))
	c.wall = wall.Now
	rf := w.single(c, tokenmgr.Strict)
	if bound := livenessBound(c.tick); bound != 30*time.Second || livenessBound(time.Minute) != 3*time.Minute {
		t.Fatalf("bound %s for a 2s tick, %s for 1m; want 30s and 3m", bound, livenessBound(time.Minute))
	}
	if code, body := get(t, rf.handler, "/healthz"); code != http.StatusOK || body != "ok\n" {
		t.Fatalf("at start: %d %q", code, body)
	}
	wall.Advance(30 * time.Second)
	if code, _ := get(t, rf.handler, "/healthz"); code != http.StatusOK {
		t.Errorf("at the bound: %d, want 200", code)
	}
	wall.Advance(time.Second)
	code, body := get(t, rf.handler, "/healthz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "registration default: the scheduler has not completed a tick for 31s (bound 30s)") {
		t.Errorf("past the bound: %d %q, want 503 naming the registration and the time", code, body)
	}
	// Liveness is about the loop, not Redis: /readyz still answers.
	if code, _ := get(t, rf.handler, "/readyz"); code != http.StatusOK {
		t.Errorf("/readyz %d while the loop is late, want 200", code)
	}
	rf.sched.step(t.Context(), c.tick)
	if code, body := get(t, rf.handler, "/healthz"); code != http.StatusOK {
		t.Errorf("after a tick: %d %q", code, body)
	}
}

// Each registration's loop counts: one stuck one fails /healthz.
func TestHealthzEveryRegistration(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	c := defaultRun()
	wall := tokenmgrtest.NewClock(time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC))
	c.wall = wall.Now
	c.regs = []*registration{{name: "jira", grants: []string{"a"}}, {name: "xero", grants: []string{"b"}}}
	srv, err := newServer(t.Context(), c, []tokenmgr.Options{w.options(tokenmgr.Strict), w.options(tokenmgr.Strict)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { closeRunners(context.Background(), srv.runners) })
	wall.Advance(time.Minute)
	srv.runners[0].sched.step(t.Context(), c.tick)
	code, body := get(t, srv.handler, "/healthz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "registration xero") || strings.Contains(body, "registration jira") {
		t.Errorf("%d %q, want 503 naming xero only", code, body)
	}
}

// A tick ends while --concurrency refreshes are in flight, so the loop
// keeps ticking (and announcing) behind a slow provider.
func TestTickDoesNotWaitForASlot(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	c := defaultRun()
	c.concurrency, c.jitter = 1, 0
	rf := w.single(c, tokenmgr.Strict)
	for _, g := range []string{"a", "b"} {
		seedHour(t, w, rf, g)
	}
	w.clock.Advance(51 * time.Minute)
	rf.sched.sem <- struct{}{} // the one slot is taken
	done := make(chan int, 1)
	go func() { done <- rf.sched.tick(t.Context()) }()
	select {
	case n := <-done:
		if n != 0 {
			t.Errorf("started %d refreshes with no slot free", n)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the tick waited for a refresh slot")
	}
	<-rf.sched.sem
	// Nothing was left marked as running: the next tick starts both in turn.
	tickAndWait(t.Context(), rf.sched)
	tickAndWait(t.Context(), rf.sched)
	if n := w.idp.Stats().Rotations; n != 2 {
		t.Errorf("%d rotations after the slot freed, want 2", n)
	}
}

// /readyz turns 503 "draining" as soon as the run's context ends
// (SIGTERM), while refreshes in flight finish; before that it follows
// Redis.
func TestReadyzDraining(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	ctx, sigterm := context.WithCancel(t.Context())
	defer sigterm()
	rf, err := newSingle(ctx, defaultRun(), w.options(tokenmgr.Strict))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = rf.m.Close(context.Background()) })
	if code, body := get(t, rf.handler, "/readyz"); code != http.StatusOK {
		t.Fatalf("before SIGTERM: %d %q", code, body)
	}
	sigterm()
	if code, body := get(t, rf.handler, "/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "draining") {
		t.Errorf("after SIGTERM: %d %q, want 503 draining", code, body)
	}
	if code, _ := get(t, rf.handler, "/healthz"); code != http.StatusOK {
		t.Errorf("/healthz %d while draining, want 200: a draining refresher is alive", code)
	}
}

func TestReadyzRedisDown(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	rf := w.single(defaultRun(), tokenmgr.Strict)
	w.mr.Close()
	if code, body := get(t, rf.handler, "/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "Redis unavailable") {
		t.Errorf("Redis down: %d %q, want 503", code, body)
	}
}

// /metrics: build information, Go and process collectors, the library's
// counters and histograms per registration (tokenmgrprom), the
// scheduler's outcomes; it lints clean.
func TestMetricsEndpoint(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	c := defaultRun()
	c.jitter = 0
	rf := w.single(c, tokenmgr.Strict)
	seedHour(t, w, rf, "jira")
	w.clock.Advance(51 * time.Minute)
	tickAndWait(t.Context(), rf.sched)
	code, body := get(t, rf.handler, "/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics %d", code)
	}
	for _, want := range []string{
		`tokenmgr_build_info{goversion="` + buildinfo.Get().GoVersion + `",revision="` + buildinfo.Get().Revision + `",version="` + buildinfo.Version + `"} 1`,
		"go_goroutines ", "process_cpu_seconds_total ",
		`tokenmgr_provider_refreshes_total{registration="default"} 1`,
		`tokenmgr_secret_fallbacks_total{registration="default"} 0`,
		`tokenmgr_provider_call_duration_seconds_count{outcome="ok",registration="default"} 1`,
		`tokenmgr_lease_wait_duration_seconds_count{acquired="true",registration="default"} 1`,
		`tokenmgr_refresher_refreshes_total{outcome="refreshed"} 1`,
		"tokenmgr_grants_reauth_required 0",
		"tokenmgr_grants_reauth_required_errors_total 0",
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	if strings.Contains(body, " -1\n") {
		t.Errorf("a -1 value in /metrics")
	}
	// Lint what is served, as Prometheus scrapes it.
	problems, err := promlint.New(strings.NewReader(body)).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
}

type failingStore struct{ grantStore }

func (failingStore) DeadGrants(context.Context) (int64, error) {
	return 0, errors.New("redis: connection refused")
}

type countingStore struct {
	grantStore
	n int64
}

func (s countingStore) DeadGrants(context.Context) (int64, error) { return s.n, nil }

// When the count of dead grants cannot be read the gauge is absent from
// the scrape and an error counter rises: never -1.
func TestReauthGaugeWithoutSentinel(t *testing.T) {
	c := newReauthCollector(failingStore{})
	const failed = `
# HELP tokenmgr_grants_reauth_required_errors_total Scrapes in which the count of grants that need re-consent could not be read from Redis.
# TYPE tokenmgr_grants_reauth_required_errors_total counter
tokenmgr_grants_reauth_required_errors_total 1
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(failed)); err != nil {
		t.Error(err)
	}
	ok := newReauthCollector(countingStore{n: 2})
	if problems, err := testutil.CollectAndLint(ok); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", problems, err)
	}
	const two = `
# HELP tokenmgr_grants_reauth_required Grants that need re-consent (absent from a scrape when Redis could not be read: see tokenmgr_grants_reauth_required_errors_total).
# TYPE tokenmgr_grants_reauth_required gauge
tokenmgr_grants_reauth_required 2
# HELP tokenmgr_grants_reauth_required_errors_total Scrapes in which the count of grants that need re-consent could not be read from Redis.
# TYPE tokenmgr_grants_reauth_required_errors_total counter
tokenmgr_grants_reauth_required_errors_total 0
`
	if err := testutil.CollectAndCompare(ok, strings.NewReader(two)); err != nil {
		t.Error(err)
	}
}

func TestVersion(t *testing.T) {
	for _, args := range [][]string{{"--version"}, {"version"}} {
		var out bytes.Buffer
		if err := run(t.Context(), args, func(string) string { return "" }, strings.NewReader(""), &out, io.Discard); err != nil || out.String() != buildinfo.String("refresher")+"\n" {
			t.Errorf("refresher %v: %q %v, want %q", args, out.String(), err, buildinfo.String("refresher"))
		}
	}
}
