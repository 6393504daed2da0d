package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"golang.org/x/oauth2"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

type clock struct{ ns atomic.Int64 }

func newClock() *clock {
	c := &clock{}
	c.ns.Store(time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	return c
}
func (c *clock) Now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *clock) Advance(d time.Duration) { c.ns.Add(int64(d)) }

type world struct {
	t     *testing.T
	mr    *miniredis.Miniredis
	clock *clock
	idp   *tokenmgrtest.Server
}

func newWorld(t *testing.T, profile tokenmgrtest.Profile) *world {
	w := &world{t: t, mr: miniredis.RunT(t), clock: newClock()}
	w.idp = tokenmgrtest.NewServer(tokenmgrtest.Config{Profile: profile, AuthStyle: oauth2.AuthStyleInParams, Now: w.clock.Now})
	t.Cleanup(w.idp.Close)
	return w
}

func (w *world) options(p tokenmgr.Provider) tokenmgr.Options {
	rdb := redis.NewClient(&redis.Options{Addr: w.mr.Addr()})
	w.t.Cleanup(func() { rdb.Close() })
	p.HTTPTimeout = 2 * time.Second
	return tokenmgr.Options{Redis: rdb, OAuth2: w.idp.OAuthConfig(oauth2.AuthStyleInParams), Provider: p,
		Now: w.clock.Now, Logger: slog.New(slog.DiscardHandler), PollInterval: 50 * time.Millisecond, LockRetry: 10 * time.Millisecond}
}

func defaultRun() *runConfig {
	return &runConfig{refreshBefore: 10 * time.Minute, maxFraction: 0.4, jitter: 2 * time.Minute, tick: time.Second, concurrency: 4, rate: 1000, batch: 1000, stateTTL: 10 * time.Minute, warnAbsolute: 30 * 24 * time.Hour}
}

func (w *world) pod(c *runConfig, p tokenmgr.Provider) *pod {
	pd, err := newPod(w.t.Context(), c, w.options(p))
	if err != nil {
		w.t.Fatal(err)
	}
	w.t.Cleanup(func() { _ = pd.m.Close(context.Background()) })
	return pd
}

// tickAndWait runs one tick of each scheduler and waits for its refreshes.
func tickAndWait(ctx context.Context, ss ...*scheduler) {
	for _, s := range ss {
		s.tick(ctx)
	}
	for _, s := range ss {
		s.wg.Wait()
	}
}

// Due grants are refreshed once, early enough (before the workers' 5m
// margin), at their jittered time inside the configured bounds.
func TestSchedulerRefreshesDueGrantsOnceWithJitter(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	c := defaultRun()
	pd := w.pod(c, tokenmgr.Strict)
	const n = 30
	expiry := map[string]time.Time{}
	for i := range n {
		g := fmt.Sprintf("grant-%02d", i)
		tok := w.idp.NewGrant("")
		tok.Expiry = w.clock.Now().Add(time.Hour)
		if _, err := pd.m.Seed(t.Context(), g, tok, tokenmgr.SeedOptions{}); err != nil {
			t.Fatal(err)
		}
		expiry[g] = tok.Expiry
	}
	refreshedAt := map[string]time.Time{}
	for step := 0; step < 60*6; step++ { // one hour in 10s steps
		tickAndWait(t.Context(), pd.sched)
		for g := range expiry {
			if _, done := refreshedAt[g]; done {
				continue
			}
			st, err := pd.m.Status(t.Context(), g)
			if err != nil {
				t.Fatal(err)
			}
			if st.Version > 1 {
				refreshedAt[g] = w.clock.Now()
			}
		}
		w.clock.Advance(10 * time.Second)
	}
	if len(refreshedAt) != n {
		t.Fatalf("%d of %d grants refreshed in their first hour", len(refreshedAt), n)
	}
	distinct := map[time.Time]bool{}
	for g, at := range refreshedAt {
		earliest := expiry[g].Add(-c.refreshBefore)
		latest := earliest.Add(c.jitter + 10*time.Second) // one step of the test's clock
		if at.Before(earliest) || at.After(latest) {
			t.Errorf("%s refreshed %s before expiry, want between %s and %s before", g, expiry[g].Sub(at), c.refreshBefore, c.refreshBefore-c.jitter)
		}
		if expiry[g].Sub(at) < 5*time.Minute {
			t.Errorf("%s refreshed inside the workers' margin", g)
		}
		distinct[at] = true
	}
	if len(distinct) < 5 {
		t.Errorf("jitter spread %d grants over only %d instants", n, len(distinct))
	}
	if s := w.idp.Stats(); s.RefreshOK != n || s.ReuseDetected != 0 {
		t.Errorf("IdP %+v, want exactly %d refreshes", s, n)
	}
}

// An idle grant (no worker uses it) is kept alive: rotated every token
// lifetime, so its idle expiry always lies ~90 days ahead.
func TestSchedulerKeepsIdleGrantAlive(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Atlassian)
	pd := w.pod(defaultRun(), tokenmgr.Atlassian)
	tok := w.idp.NewGrant("")
	tok.Expiry = w.clock.Now().Add(time.Hour)
	if _, err := pd.m.Seed(t.Context(), "idle", tok, tokenmgr.SeedOptions{}); err != nil {
		t.Fatal(err)
	}
	start := w.clock.Now()
	for w.clock.Now().Sub(start) < 3*24*time.Hour {
		tickAndWait(t.Context(), pd.sched)
		w.clock.Advance(5 * time.Minute)
	}
	st, err := pd.m.Status(t.Context(), "idle")
	if err != nil {
		t.Fatal(err)
	}
	if st.Status != tokenmgr.StatusOK || st.RefreshCount < 70 || st.IdleExpiry.Sub(w.clock.Now()) < 89*24*time.Hour {
		t.Errorf("after 3 idle days: %+v", st)
	}
	m := w.manager(tokenmgr.Atlassian)
	at, err := m.Token(t.Context(), "idle")
	if err != nil || !w.idp.AccessTokenValid(at.AccessToken) {
		t.Errorf("a worker cannot use the kept-alive grant: %v", err)
	}
}

func (w *world) manager(p tokenmgr.Provider) *tokenmgr.Manager {
	m, err := tokenmgr.New(w.t.Context(), w.options(p))
	if err != nil {
		w.t.Fatal(err)
	}
	w.t.Cleanup(func() { _ = m.Close(context.Background()) })
	return m
}

// A 429 postpones the grant by Retry-After: no call before, one after.
func TestSchedulerHonoursRetryAfter(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	c := defaultRun()
	c.jitter = 0
	pd := w.pod(c, tokenmgr.Strict)
	tok := w.idp.NewGrant("")
	tok.Expiry = w.clock.Now().Add(time.Hour)
	if _, err := pd.m.Seed(t.Context(), "g", tok, tokenmgr.SeedOptions{}); err != nil {
		t.Fatal(err)
	}
	w.clock.Advance(55 * time.Minute) // due
	w.idp.Fail429(1, 45*time.Second)
	tickAndWait(t.Context(), pd.sched)
	if s := w.idp.Stats(); s.Injected429 != 1 {
		t.Fatalf("IdP %+v, want one 429", s)
	}
	for range 8 { // 40s: inside Retry-After
		w.clock.Advance(5 * time.Second)
		tickAndWait(t.Context(), pd.sched)
	}
	if s := w.idp.Stats(); s.RefreshOK+s.RefreshFailed+s.Injected429 != 1 {
		t.Fatalf("the provider was called again inside Retry-After: %+v", s)
	}
	w.clock.Advance(10 * time.Second)
	tickAndWait(t.Context(), pd.sched)
	if s := w.idp.Stats(); s.RefreshOK != 1 {
		t.Errorf("not refreshed after Retry-After: %+v", s)
	}
}

// Two refresher replicas and a worker fleet against the strict provider:
// one IdP refresh per due time, no reuse, and workers never refresh.
func TestTwoReplicasAndWorkers(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	c := defaultRun()
	a, b := w.pod(c, tokenmgr.Strict), w.pod(c, tokenmgr.Strict)
	const grants = 5
	for i := range grants {
		tok := w.idp.NewGrant("")
		tok.Expiry = w.clock.Now().Add(time.Hour)
		if _, err := a.m.Seed(t.Context(), fmt.Sprintf("g%d", i), tok, tokenmgr.SeedOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	workers := []*tokenmgr.Manager{w.manager(tokenmgr.Strict), w.manager(tokenmgr.Strict), w.manager(tokenmgr.Strict)}
	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	var failures atomic.Int64
	for _, m := range workers {
		for range 5 {
			wg.Go(func() {
				for i := 0; ctx.Err() == nil; i++ {
					if _, err := m.Token(ctx, fmt.Sprintf("g%d", i%grants)); err != nil && ctx.Err() == nil {
						failures.Add(1)
					}
					time.Sleep(time.Millisecond) // a worker does other work between calls
				}
			})
		}
	}
	for step := 0; step < 3*60*3; step++ { // three hours in 20s steps
		tickAndWait(t.Context(), a.sched, b.sched)
		w.clock.Advance(20 * time.Second)
	}
	cancel()
	wg.Wait()
	s := w.idp.Stats()
	var workerRefreshes int64
	for _, m := range workers {
		workerRefreshes += m.Stats().Refreshes
	}
	t.Logf("IdP %+v; worker refreshes %d; replica refreshes %d + %d", s, workerRefreshes, a.m.Stats().Refreshes, b.m.Stats().Refreshes)
	if s.RefreshOK != s.Rotations || s.ReuseDetected != 0 || s.RefreshFailed != 0 {
		t.Errorf("IdP %+v, want one refresh per rotation and no reuse", s)
	}
	if s.Rotations < 3*grants || s.Rotations > 4*grants {
		t.Errorf("%d rotations for %d grants over three one-hour lifetimes, want about %d", s.Rotations, grants, 3*grants)
	}
	if workerRefreshes != 0 || failures.Load() != 0 {
		t.Errorf("workers refreshed %d times and failed %d times; the refresher should spare them both", workerRefreshes, failures.Load())
	}
}

// The bootstrap flow end to end: connect, consent at the fake IdP,
// callback, grant seeded, a worker uses it; replayed and forged states
// are refused.
func TestConnectFlow(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Atlassian)
	c := defaultRun()
	c.pkce = true
	c.common.Provider = "atlassian"
	var srvURL string
	srv := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) { podHandler.ServeHTTP(rw, r) }))
	defer srv.Close()
	srvURL = srv.URL
	c.redirectURL = srvURL + "/callback"
	o := w.options(tokenmgr.Atlassian)
	o.OAuth2.Endpoint.AuthURL = w.idp.AuthURL()
	pd, err := newPod(t.Context(), c, o)
	if err != nil {
		t.Fatal(err)
	}
	defer pd.m.Close(context.Background())
	podHandler = pd.handler

	var lastCallback string
	client := &http.Client{CheckRedirect: func(req *http.Request, via []*http.Request) error {
		if strings.HasPrefix(req.URL.String(), srvURL+"/callback") {
			lastCallback = req.URL.String()
		}
		if strings.HasPrefix(req.URL.String(), w.idp.AuthURL()) {
			q := req.URL.Query()
			if q.Get("audience") != "api.atlassian.com" || q.Get("prompt") != "consent" || !strings.Contains(q.Get("scope"), "offline_access") || q.Get("code_challenge") == "" {
				t.Errorf("authorize URL lacks the atlassian preset or PKCE: %s", req.URL.RawQuery)
			}
		}
		return nil
	}}
	resp, err := client.Get(srvURL + "/connect/jira-prod")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "connected") {
		t.Fatalf("connect flow ended with %d: %s", resp.StatusCode, body)
	}
	m := w.manager(tokenmgr.Atlassian)
	tok, err := m.Token(t.Context(), "jira-prod")
	if err != nil || !w.idp.AccessTokenValid(tok.AccessToken) {
		t.Fatalf("worker cannot use the connected grant: %v", err)
	}
	if s := w.idp.Stats(); s.AuthCodeExchanges != 1 {
		t.Errorf("IdP exchanges %d", s.AuthCodeExchanges)
	}
	// Replay of the same callback: the state was single-use.
	resp, err = http.Get(lastCallback)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("replayed state answered %d, want 400", resp.StatusCode)
	}
	u, _ := url.Parse(lastCallback)
	q := u.Query()
	q.Set("state", "forged-state")
	u.RawQuery = q.Encode()
	resp, err = http.Get(u.String())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("forged state answered %d, want 400", resp.StatusCode)
	}
	if st, _ := m.Status(t.Context(), "jira-prod"); st.Version != 1 {
		t.Errorf("replay changed the grant: version %d", st.Version)
	}
}

var podHandler http.Handler
