package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"golang.org/x/oauth2"

	"github.com/tokenmgr/tokenmgr/internal/cli"
	"github.com/tokenmgr/tokenmgr/internal/testbin"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

type world struct {
	t      *testing.T
	mr     *miniredis.Miniredis
	clock  *tokenmgrtest.Clock
	idp    *tokenmgrtest.Server
	sealer tokenmgr.Sealer // nil: plaintext
}

func newWorld(t *testing.T, profile tokenmgrtest.Profile) *world {
	w := &world{t: t, mr: miniredis.RunT(t), clock: tokenmgrtest.NewClock(time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC))}
	w.idp = tokenmgrtest.NewServer(tokenmgrtest.Config{Profile: profile, AuthStyle: oauth2.AuthStyleInParams, Now: w.clock.Now})
	t.Cleanup(w.idp.Close)
	return w
}

func (w *world) options(p tokenmgr.Provider) tokenmgr.Options {
	rdb := redis.NewClient(&redis.Options{Addr: w.mr.Addr()})
	w.t.Cleanup(func() { rdb.Close() })
	p.HTTPTimeout = 2 * time.Second
	return tokenmgr.Options{Redis: rdb, OAuth2: w.idp.OAuthConfig(oauth2.AuthStyleInParams), Provider: p, Sealer: w.sealer, AllowPlaintext: w.sealer == nil,
		Now: w.clock.Now, Logger: slog.New(slog.DiscardHandler), PollInterval: 50 * time.Millisecond, LockRetry: 10 * time.Millisecond}
}

func defaultRun() *runConfig {
	return &runConfig{refreshBefore: 10 * time.Minute, maxFraction: 0.4, jitter: 2 * time.Minute, tick: time.Second, concurrency: 4, rate: 1000, batch: 1000, stateTTL: 10 * time.Minute, warnAbsolute: 30 * 24 * time.Hour}
}

// single is a one-registration refresher built from c's flags: its runner
// and the server's handlers.
type single struct {
	*runner
	handler  http.Handler // what --listen serves
	operator http.Handler // the operator surface (nil: off)
}

// newSingle builds a one-registration server from c's flags, serving
// c.common.Grant or, when it is empty, every grant in the schedule.
func newSingle(ctx context.Context, c *runConfig, o tokenmgr.Options) (*single, error) {
	if len(c.regs) == 0 {
		reg := &registration{name: "default", common: c.common, scopes: c.scopes}
		if c.common.Grant != "" {
			reg.grants = []string{c.common.Grant}
		}
		c.regs = []*registration{reg}
	}
	s, err := newServer(ctx, c, []tokenmgr.Options{o})
	if err != nil {
		return nil, err
	}
	return &single{runner: s.runners[0], handler: s.handler, operator: s.operator}, nil
}

func (w *world) single(c *runConfig, p tokenmgr.Provider) *single {
	rf, err := newSingle(w.t.Context(), c, w.options(p))
	if err != nil {
		w.t.Fatal(err)
	}
	w.t.Cleanup(func() { _ = rf.m.Close(context.Background()) })
	return rf
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
	rf := w.single(c, tokenmgr.Strict)
	const n = 30
	expiry := map[string]time.Time{}
	for i := range n {
		g := fmt.Sprintf("grant-%02d", i)
		tok := w.idp.NewGrant("")
		tok.Expiry = w.clock.Now().Add(time.Hour)
		if _, err := rf.m.Seed(t.Context(), g, tok, tokenmgr.SeedOptions{}); err != nil {
			t.Fatal(err)
		}
		expiry[g] = tok.Expiry
	}
	refreshedAt := map[string]time.Time{}
	for step := 0; step < 60*6; step++ { // one hour in 10s steps
		tickAndWait(t.Context(), rf.sched)
		for g := range expiry {
			if _, done := refreshedAt[g]; done {
				continue
			}
			st, err := rf.m.Status(t.Context(), g)
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
	rf := w.single(defaultRun(), tokenmgr.Atlassian)
	tok := w.idp.NewGrant("")
	tok.Expiry = w.clock.Now().Add(time.Hour)
	if _, err := rf.m.Seed(t.Context(), "idle", tok, tokenmgr.SeedOptions{}); err != nil {
		t.Fatal(err)
	}
	start := w.clock.Now()
	for w.clock.Now().Sub(start) < 3*24*time.Hour {
		tickAndWait(t.Context(), rf.sched)
		w.clock.Advance(5 * time.Minute)
	}
	st, err := rf.m.Status(t.Context(), "idle")
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
	rf := w.single(c, tokenmgr.Strict)
	tok := w.idp.NewGrant("")
	tok.Expiry = w.clock.Now().Add(time.Hour)
	if _, err := rf.m.Seed(t.Context(), "g", tok, tokenmgr.SeedOptions{}); err != nil {
		t.Fatal(err)
	}
	w.clock.Advance(55 * time.Minute) // due
	w.idp.Fail429(1, 45*time.Second)
	tickAndWait(t.Context(), rf.sched)
	if s := w.idp.Stats(); s.Injected429 != 1 {
		t.Fatalf("IdP %+v, want one 429", s)
	}
	for range 8 { // 40s: inside Retry-After
		w.clock.Advance(5 * time.Second)
		tickAndWait(t.Context(), rf.sched)
	}
	if s := w.idp.Stats(); s.RefreshOK+s.RefreshFailed+s.Injected429 != 1 {
		t.Fatalf("the provider was called again inside Retry-After: %+v", s)
	}
	w.clock.Advance(10 * time.Second)
	tickAndWait(t.Context(), rf.sched)
	if s := w.idp.Stats(); s.RefreshOK != 1 {
		t.Errorf("not refreshed after Retry-After: %+v", s)
	}
}

// Two refresher replicas and a worker fleet against the strict provider:
// one IdP refresh per due time, no reuse, and workers never refresh.
func TestTwoReplicasAndWorkers(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	c := defaultRun()
	a, b := w.single(c, tokenmgr.Strict), w.single(c, tokenmgr.Strict)
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

// The bootstrap flow end to end: connect (as the operator), consent at the
// fake IdP, callback, grant seeded, a worker uses it; no credentials,
// another browser, a replayed or forged state, and replacing a healthy
// grant without asking are refused.
// The atlassian preset sends no PKCE challenge unless --pkce says so (its
// 3LO documentation does not describe PKCE); the login works both ways.
func TestConnectFlow(t *testing.T) {
	t.Run("atlassian default, no PKCE", func(t *testing.T) { testConnectFlow(t, nil, false) })
	t.Run("--pkce", func(t *testing.T) { testConnectFlow(t, new(true), true) })
}

func testConnectFlow(t *testing.T, pkce *bool, wantPKCE bool) {
	w := newWorld(t, tokenmgrtest.Atlassian)
	c := defaultRun()
	c.pkce = pkce
	c.common.Provider = "atlassian"
	c.creds.password = "correct horse battery"
	srv := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) { singleHandler.ServeHTTP(rw, r) }))
	defer srv.Close()
	c.redirectURL = srv.URL + "/callback"
	o := w.options(tokenmgr.Atlassian)
	o.OAuth2.Endpoint.AuthURL = w.idp.AuthURL()
	rf, err := newSingle(t.Context(), c, o)
	if err != nil {
		t.Fatal(err)
	}
	defer rf.m.Close(context.Background())
	singleHandler = rf.handler

	var lastCallback string
	jar, _ := cookiejar.New(nil)
	browser := &http.Client{Jar: jar, CheckRedirect: func(req *http.Request, via []*http.Request) error {
		if strings.HasPrefix(req.URL.String(), srv.URL+"/callback") {
			lastCallback = req.URL.String()
		}
		if strings.HasPrefix(req.URL.String(), w.idp.AuthURL()) {
			q := req.URL.Query()
			if q.Get("audience") != "api.atlassian.com" || q.Get("prompt") != "consent" || !strings.Contains(q.Get("scope"), "offline_access") {
				t.Errorf("authorize URL lacks the atlassian preset: %s", req.URL.RawQuery)
			}
			if (q.Get("code_challenge") != "") != wantPKCE {
				t.Errorf("authorize URL: PKCE challenge %q, want one: %v", q.Get("code_challenge"), wantPKCE)
			}
		}
		return nil
	}}
	send := func(method, path, pass string, form url.Values) (int, string) {
		req, _ := http.NewRequest(method, srv.URL+path, strings.NewReader(form.Encode()))
		if method == http.MethodPost {
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		}
		if pass != "" {
			req.SetBasicAuth("admin", pass)
		}
		resp, err := browser.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	get := func(path, pass string) (int, string) { return send(http.MethodGet, path, pass, nil) }
	// connect does what an operator does: open /connect/{grant}, then
	// submit its form (which carries the CSRF token).
	csrfInput := regexp.MustCompile(`name="csrf" value="([^"]+)"`)
	connect := func(grant, pass string, replace bool) (int, string) {
		code, page := get("/connect/"+grant, pass)
		if code != http.StatusOK {
			return code, page
		}
		m := csrfInput.FindStringSubmatch(page)
		if m == nil {
			t.Fatalf("connect page without a CSRF token: %s", page)
		}
		form := url.Values{"csrf": {m[1]}}
		if replace {
			form.Set("replace", "1")
		}
		return send(http.MethodPost, "/connect/"+grant, pass, form)
	}
	if code, _ := connect("jira-prod", "", false); code != http.StatusUnauthorized {
		t.Errorf("connect without credentials: %d, want 401", code)
	}
	if code, _ := connect("jira-prod", "wrong password!", false); code != http.StatusUnauthorized {
		t.Errorf("connect with a wrong password: %d, want 401", code)
	}
	// The browser holds a CSRF cookie (the page set it), but the form's
	// token is not it.
	if code, _ := get("/connect/jira-prod", c.creds.password); code != http.StatusOK {
		t.Fatalf("connect page: %d", code)
	}
	if u, _ := url.Parse(srv.URL); len(jar.Cookies(u)) == 0 {
		t.Fatal("the connect page set no CSRF cookie")
	}
	if code, _ := send(http.MethodPost, "/connect/jira-prod", c.creds.password, url.Values{"csrf": {"guessed"}}); code != http.StatusForbidden {
		t.Errorf("connect with a wrong CSRF token: %d, want 403", code)
	}
	code, body := connect("jira-prod", c.creds.password, false)
	if code != http.StatusOK || !strings.Contains(body, "<b>jira-prod</b> connected") {
		t.Fatalf("connect flow ended with %d: %s", code, body)
	}
	m := w.manager(tokenmgr.Atlassian)
	tok, err := m.Token(t.Context(), "jira-prod")
	if err != nil || !w.idp.AccessTokenValid(tok.AccessToken) {
		t.Fatalf("worker cannot use the connected grant: %v", err)
	}
	if s := w.idp.Stats(); s.AuthCodeExchanges != 1 {
		t.Errorf("IdP exchanges %d", s.AuthCodeExchanges)
	}
	// Replay of the same callback, even from the same browser: single use.
	u, _ := url.Parse(lastCallback)
	jar.SetCookies(u, []*http.Cookie{{Name: stateCookieName(u.Query().Get("state")), Value: u.Query().Get("state"), Path: "/"}})
	if code, _ := get(strings.TrimPrefix(lastCallback, srv.URL), ""); code != http.StatusBadRequest {
		t.Errorf("replayed state answered %d, want 400", code)
	}
	// The callback link opened in another browser (no cookie).
	resp, err := http.Get(lastCallback)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("callback without the cookie answered %d, want 400", resp.StatusCode)
	}
	q := u.Query()
	q.Set("state", "forged-state")
	u.RawQuery = q.Encode()
	jar.SetCookies(u, []*http.Cookie{{Name: stateCookieName("forged-state"), Value: "forged-state", Path: "/"}})
	if code, _ := get(strings.TrimPrefix(u.String(), srv.URL), ""); code != http.StatusBadRequest {
		t.Errorf("forged state answered %d, want 400", code)
	}
	if st, _ := m.Status(t.Context(), "jira-prod"); st.Version != 1 {
		t.Errorf("replay changed the grant: version %d", st.Version)
	}
	// A healthy grant is replaced only on purpose.
	if code, _ := connect("jira-prod", c.creds.password, false); code != http.StatusConflict {
		t.Errorf("connect over a healthy grant: %d, want 409", code)
	}
	if code, _ := connect("jira-prod", c.creds.password, true); code != http.StatusOK {
		t.Errorf("connect with replace=1: %d", code)
	}
	if st, _ := m.Status(t.Context(), "jira-prod"); st.Version != 2 {
		t.Errorf("after replace: version %d, want 2", st.Version)
	}
}

// --grant limits a refresher to that grant; others in the shared schedule
// are left to their own refreshers.
func TestSchedulerOnlyItsGrants(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	c := defaultRun()
	c.common.Grant = "mine"
	rf := w.single(c, tokenmgr.Strict)
	for _, g := range []string{"mine", "theirs"} {
		tok := w.idp.NewGrant("")
		tok.Expiry = w.clock.Now().Add(time.Hour)
		if _, err := rf.m.Seed(t.Context(), g, tok, tokenmgr.SeedOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	w.clock.Advance(55 * time.Minute)
	tickAndWait(t.Context(), rf.sched)
	mine, _ := rf.m.Status(t.Context(), "mine")
	theirs, _ := rf.m.Status(t.Context(), "theirs")
	if mine.Version != 2 || theirs.Version != 1 {
		t.Errorf("versions mine=%d theirs=%d, want 2 and 1", mine.Version, theirs.Version)
	}
}

func TestConfigFile(t *testing.T) {
	dir := t.TempDir()
	write := func(body string) string {
		p := filepath.Join(dir, fmt.Sprintf("c%d.json", time.Now().UnixNano()))
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	env := map[string]string{"TOKENMGR_REDIS_URL": "redis://127.0.0.1:1", "JIRA_SECRET": "s1", "XERO_SECRET": "s2", "TOKENMGR_ENCRYPTION_KEY": testKey}
	getenv := func(k string) string { return env[k] }
	good := write(`{"registrations": [
		{"name": "jira", "provider": "atlassian", "client_id": "a", "client_secret_env": "JIRA_SECRET", "grants": ["jira-prod", "jira-stage"], "scopes": "read:jira-work"},
		{"name": "xero", "provider": "xero", "token_url": "https://identity.xero.com/connect/token", "client_id": "b", "client_secret_env": "XERO_SECRET", "auth_style": "header", "http_timeout": "5s", "grants": ["books"]}]}`)
	c, err := parseRunFlags([]string{"--config", good}, getenv, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.regs) != 2 || c.regs[0].common.OAuth2Config().ClientSecret != "s1" || c.regs[1].common.OAuth2Config().Endpoint.AuthStyle != oauth2.AuthStyleInHeader {
		t.Errorf("registrations %+v", c.regs)
	}
	for body, want := range map[string]string{
		`{"registrations": []}`: "no registrations",
		`{"registrations": [{"name": "x", "provider": "atlassian", "client_id": "a", "client_secret_env": "JIRA_SECRET"}]}`:                             "no grants",
		`{"registrations": [{"name": "x", "provider": "atlassian", "client_id": "a", "client_secret_env": "NOPE", "grants": ["g"]}]}`:                   "no client secret",
		`{"registrations": [{"name": "x", "provider": "google", "client_id": "a", "client_secret_env": "JIRA_SECRET", "grants": ["g"]}]}`:               "--provider",
		`{"registrations": [{"name": "x", "provider": "atlassian", "client_id": "a", "client_secret_env": "JIRA_SECRET", "grants": ["g"], "typo": 1}]}`: "unknown field",
		`{"registrations": [{"name": "x", "provider": "atlassian", "client_id": "a", "client_secret_env": "JIRA_SECRET", "grants": ["g"]},
		                    {"name": "y", "provider": "atlassian", "client_id": "b", "client_secret_env": "JIRA_SECRET", "grants": ["g"]}]}`: "in registrations x and y",
		`{"registrations": [`: "unexpected EOF",
	} {
		if _, err := parseRunFlags([]string{"--config", write(body)}, getenv, io.Discard); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("config %s: %v, want %q", body, err, want)
		}
	}
	if _, err := parseRunFlags([]string{"--config", good, "--redirect-url", "https://r.example/callback"}, getenv, io.Discard); err == nil || !strings.Contains(err.Error(), "needs the operator surface") {
		t.Errorf("/connect without an admin password: %v", err)
	}
	// Every grant is checked, not only the first; a missing secret names
	// the registration's variable; and none falls back to
	// TOKENMGR_CLIENT_SECRET (another registration's secret, perhaps).
	env["TOKENMGR_CLIENT_SECRET"] = "someone-elses-secret"
	for body, want := range map[string]string{
		`{"registrations": [{"name": "x", "provider": "atlassian", "client_id": "a", "client_secret_env": "JIRA_SECRET", "grants": ["good", "bad name"]}]}`: `registration x: grants: tokenmgr: invalid grant name "bad name"`,
		`{"registrations": [{"name": "x", "provider": "atlassian", "client_id": "a", "client_secret_env": "NOPE", "grants": ["g"]}]}`:                       "registration x: no client secret: NOPE is unset or empty",
		`{"registrations": [{"name": "x", "provider": "atlassian", "client_id": "a", "grants": ["g"]}]}`:                                                    "registration x: set client_secret_file or client_secret_env",
	} {
		_, err := parseRunFlags([]string{"--config", write(body)}, getenv, io.Discard)
		if err == nil || !strings.Contains(err.Error(), want) || strings.Contains(err.Error(), "TOKENMGR_CLIENT_SECRET") {
			t.Errorf("config %s: %v, want %q and no word of TOKENMGR_CLIENT_SECRET", body, err, want)
		}
	}
}

// Exit status 0 for -h, 2 for a command line that does not parse, 1 for
// any other error, as the README says.
func TestExitStatus(t *testing.T) {
	env := map[string]string{"TOKENMGR_REDIS_URL": "redis://127.0.0.1:1", "TOKENMGR_ENCRYPTION_KEY": testKey}
	for _, tc := range []struct {
		args []string
		want int
	}{
		{[]string{"help"}, 0},
		{[]string{"run", "-h"}, 0},
		{[]string{"status", "--help"}, 0},
		{nil, 2},
		{[]string{"frobnicate"}, 2},
		{[]string{"status", "--nope"}, 2},
		{[]string{"run", "--tick", "often"}, 2},
		{[]string{"status", "stray"}, 2},
		{[]string{"status", "--grant", "bad grant"}, 1},
		{[]string{"run", "--max-refresh-fraction", "0.9"}, 1},
		{[]string{"seed", "--grant", "g", "--consented-at", "yesterday"}, 1},
	} {
		_, _, err := command(t, env, "", tc.args...)
		if got := cli.Exit("refresher", err, io.Discard); got != tc.want {
			t.Errorf("refresher %v: exit %d (%v), want %d", tc.args, got, err, tc.want)
		}
	}
}

var testKey = func() string { k, _ := tokenmgr.GenerateKey("k1"); return k.Encode() }()

var singleHandler http.Handler

// Someone who can write Redis (a worker with the old README ACL) cannot
// complete a login of their own making: a pending state written directly
// to Redis, or a genuine one rewritten for another grant, is refused at
// /callback, and the grant is untouched.
func TestConnectRefusesForgedState(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	rf, srv := dashboardServer(t, w, []string{"jira", "new"}, func(c *runConfig) { c.pkce = new(true) })
	if _, err := rf.m.Seed(t.Context(), "jira", w.idp.NewGrant(""), tokenmgr.SeedOptions{}); err != nil {
		t.Fatal(err)
	}
	noRedirect := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	// callback drives the provider with state (as the attacker's browser
	// would) and returns /callback's answer to a browser holding the
	// state's cookie.
	callback := func(state, verifier string) (int, string) {
		t.Helper()
		cfg := w.idp.OAuthConfig(oauth2.AuthStyleInParams)
		cfg.RedirectURL = srv.URL + "/callback"
		resp, err := noRedirect.Get(cfg.AuthCodeURL(state, oauth2.S256ChallengeOption(verifier)))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		back, _ := url.Parse(resp.Header.Get("Location"))
		r, body := do(t, srv, request{path: "/callback?" + back.RawQuery, header: http.Header{"Cookie": {stateCookieName(state) + "=" + state}}})
		return r.StatusCode, body
	}
	verifier := oauth2.GenerateVerifier()
	forged, _ := json.Marshal(pendingConnect{Grant: "jira", Verifier: verifier, Started: w.clock.Now(), Replace: true})
	state := "attacker-chosen-state-0123456789"
	w.mr.Set("tm:connect:"+state, string(forged))
	if code, body := callback(state, verifier); code != http.StatusBadRequest || !strings.Contains(body, "not signed by this refresher") {
		t.Errorf("a state written to Redis directly: %d %s, want 400 not signed", code, body)
	}

	// A genuine login for "new", its record rewritten to replace "jira".
	page, _ := do(t, srv, request{path: "/", header: operator})
	csrf := page.Cookies()[0].Value
	resp, _ := do(t, srv, request{method: http.MethodPost, path: "/connect/new", form: url.Values{"csrf": {csrf}},
		header: http.Header{"Authorization": operator["Authorization"], "Cookie": {csrfCookie + "=" + csrf}}})
	authorize, _ := url.Parse(resp.Header.Get("Location"))
	genuine := authorize.Query().Get("state")
	stored, err := w.mr.Get("tm:connect:" + genuine)
	if err != nil {
		t.Fatal(err)
	}
	tag, js, _ := strings.Cut(stored, ".")
	var p pendingConnect
	_ = json.Unmarshal([]byte(js), &p)
	p.Grant, p.Replace, p.Verifier = "jira", true, verifier
	rewritten, _ := json.Marshal(p)
	w.mr.Set("tm:connect:"+genuine, tag+"."+string(rewritten))
	if code, body := callback(genuine, verifier); code != http.StatusBadRequest || !strings.Contains(body, "not signed by this refresher") {
		t.Errorf("a signed state rewritten for another grant: %d %s, want 400 not signed", code, body)
	}
	if st, _ := rf.m.Status(t.Context(), "jira"); st.Version != 1 {
		t.Errorf("the forged logins replaced the grant: version %d", st.Version)
	}
	if s := w.idp.Stats(); s.AuthCodeExchanges != 0 {
		t.Errorf("%d code exchanges for forged logins, want 0", s.AuthCodeExchanges)
	}
}

// Members of the schedule that cannot name a grant are parked at its end
// with one log line each, before the dead grants' score, so that three of
// them at the head of a batch of three do not keep a real grant from
// being refreshed.
func TestSchedulerParksInvalidNames(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	c := defaultRun()
	c.batch, c.jitter = 3, 0
	logs := &testbin.Buffer{}
	o := w.options(tokenmgr.Strict)
	o.Logger = slog.New(slog.NewTextHandler(logs, nil))
	rf, err := newSingle(t.Context(), c, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = rf.m.Close(context.Background()) })
	tok := w.idp.NewGrant("")
	tok.Expiry = w.clock.Now().Add(time.Hour)
	if _, err := rf.m.Seed(t.Context(), "real", tok, tokenmgr.SeedOptions{}); err != nil {
		t.Fatal(err)
	}
	invalid := []string{"{a}", "{b}", "{c}\x1b[2J"}
	for _, m := range invalid {
		w.mr.ZAdd("tm:due", float64(w.clock.Now().UnixMilli()), m) // due long before "real"
	}
	w.clock.Advance(55 * time.Minute)
	for range 3 {
		tickAndWait(t.Context(), rf.sched)
	}
	if st, _ := rf.m.Status(t.Context(), "real"); st.Version != 2 {
		t.Errorf("real grant behind three invalid names: version %d, want 2 (refreshed)", st.Version)
	}
	for _, m := range invalid {
		if score, _ := w.mr.ZScore("tm:due", m); int64(score) != invalidParked.UnixMilli() {
			t.Errorf("%q is at %v in the schedule, want parked at %v", m, time.UnixMilli(int64(score)), invalidParked)
		}
	}
	if n := strings.Count(logs.String(), "parked an invalid grant name"); n != len(invalid) || strings.Contains(logs.String(), "\x1b") {
		t.Errorf("%d log lines for %d invalid names (want one each, no ESC):\n%s", n, len(invalid), logs.String())
	}
	if n, _ := rf.m.DeadGrants(t.Context()); n != 0 {
		t.Errorf("the invalid names count as %d grants needing re-consent", n)
	}
}

// After a worker's rotation that the ACL kept out of the schedule, the
// refresher puts the grant at its new expiry.
func TestSchedulerCorrectsStaleSchedule(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	rf := w.single(defaultRun(), tokenmgr.Strict)
	tok := w.idp.NewGrant("")
	tok.Expiry = w.clock.Now().Add(time.Hour)
	if _, err := rf.m.Seed(t.Context(), "g", tok, tokenmgr.SeedOptions{}); err != nil {
		t.Fatal(err)
	}
	old, _ := w.mr.ZScore("tm:due", "g")
	w.clock.Advance(30 * time.Minute)
	worker := w.manager(tokenmgr.Strict)
	if _, err := worker.Rotate(t.Context(), "g"); err != nil {
		t.Fatal(err)
	}
	w.mr.ZAdd("tm:due", old, "g")     // the worker's ZADD refused, as the README's ACL does
	w.clock.Advance(25 * time.Minute) // the old expiry is due, the new one is not
	tickAndWait(t.Context(), rf.sched)
	st, _ := rf.m.Status(t.Context(), "g")
	if score, _ := w.mr.ZScore("tm:due", "g"); int64(score) != st.Expiry.UnixMilli() || st.Version != 2 {
		t.Errorf("schedule at %v, version %d; want the new expiry %v and no refresh", time.UnixMilli(int64(score)), st.Version, st.Expiry)
	}
}
