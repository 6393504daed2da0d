package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/oauth2"

	"github.com/redis/go-redis/v9"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

const testPassword = "correct horse battery"

// dashboardServer serves a one-registration refresher for grants, with
// /connect on and admin credentials set; mod adjusts the flags first.
func dashboardServer(t *testing.T, w *world, grants []string, mod func(*runConfig)) (*single, *httptest.Server) {
	c := defaultRun()
	c.creds.password = testPassword
	var h http.Handler
	srv := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) { h.ServeHTTP(rw, r) }))
	t.Cleanup(srv.Close)
	c.redirectURL = srv.URL + "/callback"
	c.regs = []*registration{{name: "jira", grants: grants}}
	if mod != nil {
		mod(c)
	}
	o := w.options(tokenmgr.Strict)
	o.OAuth2.Endpoint.AuthURL = w.idp.AuthURL()
	// A strict provider with Atlassian's limits, for the countdowns.
	o.Provider.IdleExpiry, o.Provider.AbsoluteExpiry = 90*24*time.Hour, 365*24*time.Hour
	o.Holder = "refresher-1"
	rf, err := newSingle(t.Context(), c, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = rf.m.Close(context.Background()) })
	h = rf.handler
	return rf, srv
}

type request struct {
	method, path string
	header       http.Header
	form         url.Values
}

func do(t *testing.T, srv *httptest.Server, r request) (*http.Response, string) {
	t.Helper()
	req, _ := http.NewRequest(r.method, srv.URL+r.path, strings.NewReader(r.form.Encode()))
	if r.method == "" {
		req.Method = http.MethodGet
	}
	if r.form != nil {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	for k, v := range r.header {
		req.Header[k] = v
	}
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp, string(body)
}

func basic(user, pass string) http.Header {
	r, _ := http.NewRequest(http.MethodGet, "/", nil)
	r.SetBasicAuth(user, pass)
	return http.Header{"Authorization": r.Header["Authorization"]}
}

var operator = basic("admin", testPassword)

// The operator surface is off unless an operator turns it on.
func TestDashboardOffWithoutAdminConfig(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	_, srv := dashboardServer(t, w, nil, func(c *runConfig) { c.creds.password, c.redirectURL = "", "" })
	for _, path := range []string{"/", "/api/grants", "/connect/jira", "/callback?state=x", "/assets/dashboard.js"} {
		if resp, _ := do(t, srv, request{path: path, header: operator}); resp.StatusCode != http.StatusNotFound {
			t.Errorf("GET %s = %d with no admin configuration, want 404", path, resp.StatusCode)
		}
	}
	if resp, _ := do(t, srv, request{path: "/healthz"}); resp.StatusCode != http.StatusOK {
		t.Errorf("/healthz = %d", resp.StatusCode)
	}
}

func TestDashboardAccessControl(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	const token = "a-bearer-token-of-some-length"
	withToken := func(c *runConfig) { c.creds.token = token }
	for _, tc := range []struct {
		name   string
		header http.Header
		want   int
	}{
		{"no credentials", nil, http.StatusUnauthorized},
		{"wrong password", basic("admin", "wrong password!"), http.StatusUnauthorized},
		{"wrong user", basic("root", testPassword), http.StatusUnauthorized},
		{"password", operator, http.StatusOK},
		{"bearer token", http.Header{"Authorization": {"Bearer " + token}}, http.StatusOK},
		{"token as basic-auth password", basic("admin", token), http.StatusOK},
		{"wrong bearer token", http.Header{"Authorization": {"Bearer " + token + "x"}}, http.StatusUnauthorized},
		{"password as bearer token", http.Header{"Authorization": {"Bearer " + testPassword}}, http.StatusUnauthorized},
	} {
		_, srv := dashboardServer(t, w, nil, withToken) // its own failure budget
		for _, path := range []string{"/", "/api/grants", "/assets/dashboard.js", "/connect/jira"} {
			resp, _ := do(t, srv, request{path: path, header: tc.header})
			if resp.StatusCode != tc.want {
				t.Errorf("%s: GET %s = %d, want %d", tc.name, path, resp.StatusCode, tc.want)
			}
		}
	}
}

// Guessing is throttled per source address, right guesses included; the
// operator's polling is not, nor is anyone elsewhere, and the login
// challenge is never withheld.
func TestDashboardThrottlesGuessing(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	rf, _ := dashboardServer(t, w, nil, nil)
	h := rf.handler
	for i := range 30 {
		if code := operatorFrom(h, "10.0.0.1", ""); code != http.StatusOK {
			t.Fatalf("the operator's poll %d answered %d", i, code)
		}
	}
	if limited := guessFrom(h, "10.0.0.66", "", 30); limited < 15 {
		t.Errorf("30 wrong passwords in a row from one address: %d throttled, want most", limited)
	}
	if code := operatorFrom(h, "10.0.0.66", ""); code != http.StatusTooManyRequests {
		t.Errorf("the right password from the guessing address answered %d, want 429 (else guessing goes on)", code)
	}
	if rec := sendFrom(h, "10.0.0.66", "", nil); rec.Code != http.StatusUnauthorized || rec.Header().Get("WWW-Authenticate") == "" {
		t.Errorf("without credentials the guessing address got %d, want the 401 challenge", rec.Code)
	}
	if code := operatorFrom(h, "10.0.0.1", ""); code != http.StatusOK {
		t.Errorf("the operator elsewhere was locked out by the guesser: %d", code)
	}
}

// sendFrom serves GET /api/grants from addr, through a proxy that says
// X-Forwarded-For: xff when xff is set, with header.
func sendFrom(h http.Handler, addr, xff string, header http.Header) *httptest.ResponseRecorder {
	r := httptest.NewRequest(http.MethodGet, "/api/grants", nil)
	r.RemoteAddr = net.JoinHostPort(addr, "40000")
	for k, v := range header {
		r.Header[k] = v
	}
	if xff != "" {
		r.Header.Set("X-Forwarded-For", xff)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, r)
	return rec
}

// guessFrom sends n wrong passwords and returns how many were throttled.
func guessFrom(h http.Handler, addr, xff string, n int) (throttled int) {
	for i := range n {
		if sendFrom(h, addr, xff, basic("admin", "guess-"+strconv.Itoa(i))).Code == http.StatusTooManyRequests {
			throttled++
		}
	}
	return throttled
}

// operatorFrom sends the right password and returns the status code.
func operatorFrom(h http.Handler, addr, xff string) int { return sendFrom(h, addr, xff, operator).Code }

// An IPv6 client is one /64, not one address per guess; behind a trusted
// proxy the client is the nearest untrusted X-Forwarded-For hop, and a
// client's own X-Forwarded-For means nothing unless a trusted proxy sent it.
func TestThrottleSources(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	rf, _ := dashboardServer(t, w, nil, func(c *runConfig) { c.trustedProxies = []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")} })
	h := rf.handler
	throttled := 0
	for i := range 30 {
		throttled += guessFrom(h, fmt.Sprintf("2001:db8:0:1::%x", i+1), "", 1)
	}
	if throttled < 15 {
		t.Errorf("30 guesses from 30 addresses of one IPv6 /64: %d throttled, want most", throttled)
	}
	if code := operatorFrom(h, "2001:db8:0:2::1", ""); code != http.StatusOK {
		t.Errorf("another /64 was locked out: %d", code)
	}
	// Behind the trusted proxy 10.1.0.5: the guesser is 203.0.113.9.
	if n := guessFrom(h, "10.1.0.5", "203.0.113.9", 30); n < 15 {
		t.Errorf("a guesser behind the trusted proxy: %d of 30 throttled", n)
	}
	if code := operatorFrom(h, "10.1.0.5", "198.51.100.7"); code != http.StatusOK {
		t.Errorf("the operator behind the same proxy was locked out: %d", code)
	}
	// A spoofed chain through the proxy: the nearest untrusted hop counts.
	if code := operatorFrom(h, "10.1.0.5", "198.51.100.7, 203.0.113.9"); code != http.StatusTooManyRequests {
		t.Errorf("the guesser escaped by prepending an address: %d", code)
	}
	// From an untrusted peer, X-Forwarded-For is ignored.
	if n := guessFrom(h, "192.0.2.1", "", 30); n < 15 {
		t.Errorf("direct guesser: %d of 30 throttled", n)
	}
	if code := operatorFrom(h, "192.0.2.1", "198.51.100.8"); code != http.StatusTooManyRequests {
		t.Errorf("a direct guesser escaped with its own X-Forwarded-For: %d", code)
	}
}

// When the budgets are full of recent failures, a new source shares one
// budget rather than resetting anyone's: a throttled guesser stays
// throttled however many addresses join.
func TestThrottleFullMap(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	rf, _ := dashboardServer(t, w, nil, nil)
	h := rf.handler
	if n := guessFrom(h, "192.0.2.1", "", 30); n < 15 {
		t.Fatalf("guesser: %d of 30 throttled", n)
	}
	for i := range maxFailureSources {
		guessFrom(h, netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}).String(), "", 1)
	}
	if code := operatorFrom(h, "192.0.2.1", ""); code != http.StatusTooManyRequests {
		t.Errorf("the guesser's budget was reset by %d other sources: %d", maxFailureSources, code)
	}
	if code := operatorFrom(h, "198.51.100.1", ""); code != http.StatusOK {
		t.Errorf("a new source with the right password while the map is full: %d", code)
	}
}

// One row per grant, in the states operators page on, with colours,
// countdowns and the Re-connect button where consent is needed; never a
// token in the page or its JSON.
func TestDashboardRows(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	rf, srv := dashboardServer(t, w, []string{"healthy", "dead", "busy", "never", "forever"}, nil)
	m := rf.m
	ctx := t.Context()
	for _, g := range []string{"healthy", "dead"} {
		if _, err := m.Seed(ctx, g, w.idp.NewGrant("read:jira-work"), tokenmgr.SeedOptions{ConsentedAt: w.clock.Now().Add(-360 * 24 * time.Hour)}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := m.Seed(ctx, "busy", w.idp.NewGrant("read:jira-work"), tokenmgr.SeedOptions{}); err != nil {
		t.Fatal(err)
	}
	// A provider that gives no expiry: nothing to count down, nothing late.
	noExpiry := w.idp.NewGrant("")
	noExpiry.Expiry = time.Time{}
	if _, err := m.Seed(ctx, "forever", noExpiry, tokenmgr.SeedOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Rotate(ctx, "healthy"); err != nil {
		t.Fatal(err)
	}
	// "dead": another consumer spends its refresh token (strict), so the
	// fleet's next refresh is refused and the grant is marked.
	rt := refreshTokenOf(t, w, "dead")
	if _, err := w.idp.OAuthConfig(oauth2.AuthStyleInParams).TokenSource(ctx, &oauth2.Token{RefreshToken: rt}).Token(); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Rotate(ctx, "dead"); err == nil {
		t.Fatal("rotating a grant whose token another consumer spent succeeded")
	}
	// "busy": a holder recorded its intent two minutes ago and never wrote.
	busy := "tm:{busy}:intent"
	w.mr.HSet(busy, "holder", "worker-7", "from_v", "1", "started_at", strconv.FormatInt(w.clock.Now().Add(-2*time.Minute).UnixMilli(), 10), "attempts", "1")

	var d dashboardData
	resp, body := do(t, srv, request{path: "/api/grants", header: operator})
	if resp.StatusCode != http.StatusOK || json.Unmarshal([]byte(body), &d) != nil {
		t.Fatalf("/api/grants = %d %s", resp.StatusCode, body)
	}
	rows := map[string]dashboardRow{}
	var order []string
	for _, r := range d.Grants {
		rows[r.Grant] = r
		order = append(order, r.Grant)
	}
	if strings.Join(order, ",") != "busy,dead,forever,healthy,never" || !d.ConnectEnabled || d.Holder != "refresher-1" {
		t.Fatalf("rows %v connect %v holder %q; want busy,dead,forever,healthy,never sorted, connect on, holder refresher-1", order, d.ConnectEnabled, d.Holder)
	}
	check := func(got dashboardRow, state, level string, connect bool) {
		t.Helper()
		if got.State != state || got.Level != level || got.Connect != connect {
			t.Errorf("%s: state %q level %q connect %v; want %q %q %v (row %+v)", got.Grant, got.State, got.Level, got.Connect, state, level, connect, got)
		}
	}
	// healthy: consented 360 days ago, so its absolute expiry (365 days)
	// is 5 days away: red.
	h := rows["healthy"]
	check(h, stateOK, levelCrit, false)
	if h.Version != 2 || h.RefreshesLastHour == nil || *h.RefreshesLastHour != 1 || h.RotatedBy != "refresher-1" || h.ExpiryLevel != levelOK || h.AbsoluteLevel != levelCrit || h.Registration != "jira" {
		t.Errorf("healthy row %+v: want version 2, 1 refresh in the hour by refresher-1, expiry ok, absolute crit", h)
	}
	dead := rows["dead"]
	check(dead, stateReconsent, levelCrit, true)
	if !strings.Contains(dead.Reason, "invalid_grant") {
		t.Errorf("the dead row's reason %q does not say why", dead.Reason)
	}
	b := rows["busy"]
	check(b, stateRefreshing, levelWarn, false) // stalled: amber
	if b.RefreshHolder != "worker-7" || !strings.Contains(b.Reason, "may have died") {
		t.Errorf("busy row %+v: want holder worker-7 and a stalled refresh", b)
	}
	check(rows["never"], stateNotConnected, levelCrit, true)
	check(rows["forever"], stateOK, levelOK, false)

	// Past the refresher's due time the expiry turns amber; past expiry, red.
	w.clock.Advance(time.Hour - 5*time.Minute)
	if r := rowOf(t, srv, "healthy"); r.ExpiryLevel != levelWarn {
		t.Errorf("5 minutes before expiry, long past the refresher's due time: expiry level %q, want warn", r.ExpiryLevel)
	}
	w.clock.Advance(10 * time.Minute)
	if r := rowOf(t, srv, "healthy"); r.ExpiryLevel != levelCrit {
		t.Errorf("after expiry: expiry level %q, want crit", r.ExpiryLevel)
	}

	resp, page := do(t, srv, request{path: "/", header: operator})
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET / = %d", resp.StatusCode)
	}
	for _, want := range []string{`<tr data-grant="dead" class="level-crit">`, `<td class="state">needs re-consent`, `<form method="post" action="connect/dead">`,
		`class="reconnect" type="submit">Re-connect</button>`, `<meta name="csrf-token" content="`, `<tr data-grant="never"`, `>Connect</button>`} {
		if !strings.Contains(page, want) {
			t.Errorf("page lacks %s", want)
		}
	}
	// Relative links only: a proxy may serve the pages under a path.
	if abs := regexp.MustCompile(`(href|src|action)="/`).FindString(page); abs != "" {
		t.Errorf("the page has an absolute link (%s...): it breaks under a proxy path", abs)
	}
	if n := strings.Count(page, `class="reconnect"`); n != 2 {
		t.Errorf("%d Re-connect buttons, want 2 (dead, never)", n)
	}
	for _, h := range []string{"Content-Security-Policy", "X-Frame-Options", "Cache-Control"} {
		if resp.Header.Get(h) == "" {
			t.Errorf("the page has no %s header", h)
		}
	}
	if !strings.Contains(resp.Header.Get("Content-Security-Policy"), "frame-ancestors 'none'") {
		t.Errorf("CSP %q lets other sites frame the page", resp.Header.Get("Content-Security-Policy"))
	}
	_, body = do(t, srv, request{path: "/api/grants", header: operator})
	for _, tok := range w.idp.IssuedTokens() {
		if strings.Contains(page, tok) || strings.Contains(body, tok) {
			t.Fatal("an issued token appears in the dashboard or its JSON")
		}
	}
	// The note after a login comes from its signed cookie only (see
	// TestConnectedNoteIsSigned): a crafted link shows nothing.
	for q, want := range map[string]string{
		"?connected=dead&version=7":                      "",
		"?connected=dead&version=7+visit+evil.example":   "",
		"?connected=visit-evil.example-to-fix&version=1": "",
	} {
		_, page := do(t, srv, request{path: "/" + q, header: operator})
		if got := regexp.MustCompile(`Grant <b>.*?</b> connected[^<]*`).FindString(page); got != want {
			t.Errorf("%s: the page says %q, want %q", q, got, want)
		}
	}
}

func rowOf(t *testing.T, srv *httptest.Server, grant string) dashboardRow {
	t.Helper()
	var d dashboardData
	_, body := do(t, srv, request{path: "/api/grants", header: operator})
	if err := json.Unmarshal([]byte(body), &d); err != nil {
		t.Fatal(err)
	}
	for _, r := range d.Grants {
		if r.Grant == grant {
			return r
		}
	}
	t.Fatalf("no row for %s", grant)
	return dashboardRow{}
}

// refreshTokenOf reads a plaintext record's refresh token, as a foreign
// consumer with Redis access would.
func refreshTokenOf(t *testing.T, w *world, grant string) string {
	t.Helper()
	raw := w.mr.HGet("tm:{"+grant+"}:tok", "refresh_token")
	rt, ok := strings.CutPrefix(raw, "plain:")
	if !ok {
		t.Fatalf("refresh token field %q is not plaintext", raw[:min(len(raw), 6)])
	}
	return rt
}

// State changes (starting a login) are POSTs that must come from the
// dashboard itself: another origin is refused, and so is a form without
// the browser's CSRF token.
func TestConnectRefusesCrossSiteRequests(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	_, srv := dashboardServer(t, w, []string{"jira"}, nil)
	// An operator's browser: the page sets the CSRF cookie and embeds it.
	resp, page := do(t, srv, request{path: "/", header: operator})
	cookie := resp.Cookies()
	m := regexp.MustCompile(`name="csrf-token" content="([^"]+)"`).FindStringSubmatch(page)
	if len(cookie) == 0 || m == nil || cookie[0].Value != m[1] || cookie[0].SameSite != http.SameSiteStrictMode || !cookie[0].HttpOnly {
		t.Fatalf("the page did not set a strict, HttpOnly CSRF cookie matching its token: %v", cookie)
	}
	withCookie := func(extra http.Header) http.Header {
		h := http.Header{"Authorization": operator["Authorization"], "Cookie": {csrfCookie + "=" + m[1]}}
		for k, v := range extra {
			h[k] = v
		}
		return h
	}
	good := url.Values{"csrf": {m[1]}}
	for _, tc := range []struct {
		name   string
		header http.Header
		form   url.Values
		want   int
	}{
		{"cross-site (Sec-Fetch-Site)", withCookie(http.Header{"Sec-Fetch-Site": {"cross-site"}}), good, http.StatusForbidden},
		{"foreign Origin", withCookie(http.Header{"Origin": {"https://evil.example"}}), good, http.StatusForbidden},
		{"no CSRF field", withCookie(nil), url.Values{}, http.StatusForbidden},
		{"wrong CSRF field", withCookie(nil), url.Values{"csrf": {m[1] + "x"}}, http.StatusForbidden},
		{"no CSRF cookie", operator, good, http.StatusForbidden},
		{"no credentials", http.Header{"Cookie": {csrfCookie + "=" + m[1]}}, good, http.StatusUnauthorized},
		{"the dashboard's own form", withCookie(http.Header{"Sec-Fetch-Site": {"same-origin"}, "Origin": {srv.URL}}), good, http.StatusSeeOther},
	} {
		resp, body := do(t, srv, request{method: http.MethodPost, path: "/connect/jira", header: tc.header, form: tc.form})
		if resp.StatusCode != tc.want {
			t.Errorf("%s: POST /connect/jira = %d %s, want %d", tc.name, resp.StatusCode, strings.TrimSpace(body), tc.want)
		}
	}
	// GET /connect/{grant} changes nothing: it only shows the form.
	before := len(w.mr.Keys())
	if resp, page := do(t, srv, request{path: "/connect/jira", header: operator}); resp.StatusCode != http.StatusOK || !strings.Contains(page, `method="post"`) {
		t.Errorf("GET /connect/jira = %d", resp.StatusCode)
	}
	if after := len(w.mr.Keys()); after != before {
		t.Errorf("GET /connect wrote to Redis: %d keys, then %d", before, after)
	}
}

// Without credentials the surface is on loopback only, and answers only to
// loopback names: a page whose DNS is rebound to 127.0.0.1 gets nothing.
func TestOpenAdminListenerRefusesOtherHosts(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	rf, _ := dashboardServer(t, w, []string{"jira"}, func(c *runConfig) { c.creds.password, c.operatorListen = "", "127.0.0.1:0" })
	if rf.operator == nil {
		t.Fatal("--admin-listen without credentials did not turn the surface on")
	}
	if rec := serve(rf.handler, http.MethodGet, "127.0.0.1:8080", "/"); rec.Code != http.StatusNotFound {
		t.Errorf("--listen serves the dashboard (%d) although --admin-listen is set", rec.Code)
	}
	for host, want := range map[string]int{
		"127.0.0.1:9090": http.StatusOK, "localhost:9090": http.StatusOK, "[::1]:9090": http.StatusOK,
		"attacker.example:9090": http.StatusMisdirectedRequest, "10.0.0.5:9090": http.StatusMisdirectedRequest,
	} {
		for _, path := range []string{"/", "/api/grants", "/connect/jira"} {
			if rec := serve(rf.operator, http.MethodGet, host, path); rec.Code != want {
				t.Errorf("Host %s, GET %s: %d, want %d", host, path, rec.Code, want)
			}
		}
	}
}

// serveAs serves one request with header from a loopback client.
func serveAs(h http.Handler, method, path string, header http.Header) *httptest.ResponseRecorder {
	r := httptest.NewRequest(method, path, nil)
	r.RemoteAddr = "127.0.0.1:40000"
	for k, v := range header {
		r.Header[k] = v
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, r)
	return rec
}

func serve(h http.Handler, method, host, path string) *httptest.ResponseRecorder {
	r := httptest.NewRequest(method, path, nil)
	r.Host = host
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, r)
	return rec
}

func TestAdminFlags(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	long, short := write("long", "a-long-enough-secret\n"), write("short", "tiny\n")
	base := []string{"--grant", "jira", "--provider", "atlassian", "--token-url", "https://idp.example/token", "--encryption-key-file", write("key", testKey), "--listen", "127.0.0.1:8080"}
	env := func(k string) string {
		return map[string]string{"TOKENMGR_CLIENT_ID": "id", "TOKENMGR_CLIENT_SECRET": "s", "TOKENMGR_REDIS_URL": "redis://127.0.0.1:1/0"}[k]
	}
	for _, tc := range []struct {
		args []string
		want string // "" = valid
	}{
		{nil, ""},
		{[]string{"--admin-listen", "127.0.0.1:9090"}, ""},
		{[]string{"--admin-listen", "localhost:9090"}, ""},
		{[]string{"--admin-listen", "[::1]:9090"}, ""},
		{[]string{"--admin-listen", ":9090"}, "must be a loopback address"},
		{[]string{"--admin-listen", "0.0.0.0:9090"}, "must be a loopback address"},
		{[]string{"--admin-listen", "0.0.0.0:9090", "--admin-password-file", long}, ""},
		{[]string{"--admin-listen", "0.0.0.0:9090", "--admin-token-file", long}, ""},
		{[]string{"--admin-listen", "127.0.0.1:8080"}, "must differ from --listen"},
		{[]string{"--admin-password-file", short}, "12+ characters"},
		{[]string{"--admin-token-file", short}, "12+ characters"},
		{[]string{"--admin-token-file", filepath.Join(dir, "missing")}, "--admin-token-file"},
		{[]string{"--redirect-url", "https://r.example/callback"}, "needs the operator surface"},
		{[]string{"--redirect-url", "https://r.example/callback", "--admin-token-file", long}, ""},
		{[]string{"--redirect-url", "http://127.0.0.1:9090/callback", "--admin-listen", "127.0.0.1:9090"}, ""},
		{[]string{"--admin-password-file", long, "--admin-trusted-proxies", "10.0.0.0/8, fd00::/8"}, ""},
		{[]string{"--admin-password-file", long, "--admin-trusted-proxies", "10.0.0.0/33"}, "want CIDRs"},
	} {
		c, err := parseRunFlags(append(append([]string{}, base...), tc.args...), env, io.Discard)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%v: %v", tc.args, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%v: %v, want an error with %q", tc.args, err, tc.want)
		case tc.want != "" && strings.Contains(err.Error(), "a-long-enough-secret"):
			t.Errorf("%v: the error shows the secret", tc.args)
		case err == nil && c.operatorOn() != (len(tc.args) > 0):
			t.Errorf("%v: operator surface on = %v", tc.args, c.operatorOn())
		}
	}
}

func TestCountdownLevel(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		at   time.Time
		want string
	}{
		{time.Time{}, levelOK},
		{now.Add(-time.Hour), levelCrit},
		{now.Add(2 * 24 * time.Hour), levelCrit},
		{now.Add(10 * 24 * time.Hour), levelWarn},
		{now.Add(20 * 24 * time.Hour), levelOK},
	} {
		if got := countdownLevel(now, tc.at, idleWarn, idleCrit); got != tc.want {
			t.Errorf("countdown to %v: %s, want %s", tc.at, got, tc.want)
		}
	}
	if worst(levelOK, levelWarn, levelOK) != levelWarn || worst(levelWarn, levelCrit) != levelCrit || worst() != levelOK {
		t.Error("worst picks the wrong level")
	}
}

// Two Re-connects in flight in one browser (two grants after an incident)
// both complete: each login has its own state cookie.
func TestTwoLoginsAtOnce(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	_, srv := dashboardServer(t, w, []string{"a", "b"}, nil)
	jar, _ := cookiejar.New(nil)
	browser := &http.Client{Jar: jar, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	send := func(method, target string, form url.Values) *http.Response {
		t.Helper()
		req, _ := http.NewRequest(method, target, strings.NewReader(form.Encode()))
		if form != nil {
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		}
		if strings.HasPrefix(target, srv.URL) {
			req.SetBasicAuth("admin", testPassword)
		}
		resp, err := browser.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode >= 400 {
			t.Fatalf("%s %s: %d %s", method, target, resp.StatusCode, body)
		}
		return resp
	}
	send(http.MethodGet, srv.URL+"/", nil) // the dashboard sets the CSRF cookie
	u, _ := url.Parse(srv.URL)
	var csrf string
	for _, c := range jar.Cookies(u) {
		if c.Name == csrfCookie {
			csrf = c.Value
		}
	}
	authorize := map[string]string{}
	for _, g := range []string{"a", "b"} {
		authorize[g] = send(http.MethodPost, srv.URL+"/connect/"+g, url.Values{"csrf": {csrf}}).Header.Get("Location")
	}
	for _, g := range []string{"a", "b"} {
		callback := send(http.MethodGet, authorize[g], nil).Header.Get("Location")
		done := send(http.MethodGet, callback, nil)
		if loc := done.Header.Get("Location"); done.StatusCode != http.StatusSeeOther || !strings.HasPrefix(loc, "./?connected="+g) {
			t.Errorf("login of %s ended with %d to %q, want 303 back to the dashboard", g, done.StatusCode, loc)
		}
	}
	if s := w.idp.Stats(); s.AuthCodeExchanges != 2 {
		t.Errorf("%d code exchanges, want 2", s.AuthCodeExchanges)
	}
}

// Behind a proxy that serves the refresher under /refresher/, every link
// of the pages, the Re-connect form and the return from /callback stay
// under that path.
func TestDashboardUnderProxyPath(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	var h http.Handler
	proxy := httptest.NewServer(http.StripPrefix("/refresher", http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) { h.ServeHTTP(rw, r) })))
	defer proxy.Close()
	rf, _ := dashboardServer(t, w, []string{"jira"}, func(c *runConfig) { c.redirectURL = proxy.URL + "/refresher/callback" })
	h = rf.handler
	jar, _ := cookiejar.New(nil)
	var visited []string
	browser := &http.Client{Jar: jar, CheckRedirect: func(req *http.Request, _ []*http.Request) error {
		visited = append(visited, req.URL.String())
		if strings.HasPrefix(req.URL.String(), proxy.URL) {
			req.SetBasicAuth("admin", testPassword)
		}
		return nil
	}}
	open := func(method, target string, form url.Values) (*http.Response, string) {
		t.Helper()
		req, _ := http.NewRequest(method, target, strings.NewReader(form.Encode()))
		if form != nil {
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		}
		req.SetBasicAuth("admin", testPassword)
		resp, err := browser.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("%s %s ended at %s with %d: %s", method, target, resp.Request.URL, resp.StatusCode, body)
		}
		return resp, string(body)
	}
	base, _ := url.Parse(proxy.URL + "/refresher/")
	_, page := open(http.MethodGet, base.String(), nil)
	for _, m := range regexp.MustCompile(`(?:href|src)="([^"]+)"`).FindAllStringSubmatch(page, -1) {
		ref, _ := url.Parse(m[1])
		open(http.MethodGet, base.ResolveReference(ref).String(), nil) // the style sheet and the script
	}
	action := regexp.MustCompile(`<form method="post" action="([^"]+)">`).FindStringSubmatch(page)
	token := regexp.MustCompile(`name="csrf" value="([^"]+)"`).FindStringSubmatch(page)
	if action == nil || token == nil {
		t.Fatalf("no Connect form on the page: %s", page)
	}
	ref, _ := url.Parse(action[1])
	resp, landing := open(http.MethodPost, base.ResolveReference(ref).String(), url.Values{"csrf": {token[1]}})
	if got := resp.Request.URL; got.Path != "/refresher/" || got.Query().Get("connected") != "jira" || !strings.Contains(landing, "<b>jira</b> connected") {
		t.Errorf("after consent the browser is at %s (visited %v); want the dashboard under /refresher/ saying jira connected", got, visited)
	}
	if st, err := rf.m.Status(t.Context(), "jira"); err != nil || st.Status != tokenmgr.StatusOK {
		t.Errorf("grant after the login: %+v %v", st, err)
	}
}

// A wrong Redis password shows as no access to Redis, never as grants
// that are not connected (which would offer to replace them).
func TestDashboardRedisRefusesCredentials(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	w.mr.RequireAuth("the-right-password")
	for _, grants := range [][]string{{"jira"}, nil} {
		c := defaultRun()
		c.creds.password = testPassword
		c.redirectURL = "http://127.0.0.1:1/callback"
		c.regs = []*registration{{name: "jira", grants: grants}}
		o := w.options(tokenmgr.Strict)
		o.Redis = redis.NewClient(&redis.Options{Addr: w.mr.Addr(), Password: "a-wrong-password"})
		t.Cleanup(func() { o.Redis.Close() })
		rf, err := newSingle(t.Context(), c, o)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = rf.m.Close(context.Background()) })
		rec := sendFrom(rf.handler, "127.0.0.1", "", operator)
		var d dashboardData
		if err := json.Unmarshal(rec.Body.Bytes(), &d); err != nil {
			t.Fatal(err)
		}
		if grants == nil {
			if !strings.Contains(d.Error, "Redis refused the credentials") {
				t.Errorf("every-grant registration with a wrong password: error %q, want the refused credentials", d.Error)
			}
			continue
		}
		if len(d.Grants) != 1 || d.Grants[0].State != stateNoAccess || d.Grants[0].Connect || !strings.Contains(d.Grants[0].Reason, "refused the credentials") {
			t.Errorf("--grant jira with a wrong password: rows %+v, want one %q row without Connect", d.Grants, stateNoAccess)
		}
		// /connect refuses to start or confirm a login it cannot check.
		if rec := serveAs(rf.handler, http.MethodGet, "/connect/jira", operator); rec.Code != http.StatusServiceUnavailable || !strings.Contains(rec.Body.String(), "refused the credentials") {
			t.Errorf("GET /connect/jira with a wrong password: %d %s, want 503 naming the credentials", rec.Code, rec.Body.String())
		}
	}
}

// A record the refresher's key does not open is a corrupt row naming the
// field, with Re-connect, not an ok row; text from Redis reaches the page
// and its JSON without control characters and bounded.
func TestDashboardCorruptAndUntrustedText(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	mine, _ := tokenmgr.GenerateKey("k1")
	other, _ := tokenmgr.GenerateKey("k1") // the same id, other key material
	w.sealer, _ = tokenmgr.NewKeyring(mine)
	rf, srv := dashboardServer(t, w, []string{"fine", "foreign", "noisy"}, nil)
	for _, g := range []string{"fine", "noisy"} {
		if _, err := rf.m.Seed(t.Context(), g, w.idp.NewGrant(""), tokenmgr.SeedOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	otherKeyring, _ := tokenmgr.NewKeyring(other)
	rdb := redis.NewClient(&redis.Options{Addr: w.mr.Addr()})
	t.Cleanup(func() { rdb.Close() })
	elsewhere, _ := tokenmgr.NewAdmin(tokenmgr.Options{Redis: rdb, Sealer: otherKeyring, Now: w.clock.Now, Logger: slog.New(slog.DiscardHandler)})
	if _, err := elsewhere.Seed(t.Context(), "foreign", w.idp.NewGrant(""), tokenmgr.SeedOptions{}); err != nil {
		t.Fatal(err)
	}
	w.mr.HSet("tm:{noisy}:tok", "status", "reauth_required", "reason", "\x1b[2J\x1b]0;owned\x07\rinvalid_grant"+strings.Repeat("A", 1<<20),
		"rotated_by", "worker\x1b[31m-7\u202E")

	resp, body := do(t, srv, request{path: "/api/grants", header: operator})
	var d dashboardData
	if resp.StatusCode != http.StatusOK || json.Unmarshal([]byte(body), &d) != nil || len(d.Grants) != 3 {
		t.Fatalf("/api/grants = %d, %d bytes", resp.StatusCode, len(body))
	}
	if f := d.Grants[1]; f.Grant != "foreign" || f.State != stateCorrupt || !strings.Contains(f.Reason, "field access_token") || !f.Connect {
		t.Errorf("a record sealed with another key: %+v; want %q naming access_token, with Re-connect", f, stateCorrupt)
	}
	if d.Grants[0].State != stateOK {
		t.Errorf("the fine row: %+v", d.Grants[0])
	}
	_, page := do(t, srv, request{path: "/", header: operator})
	for what, text := range map[string]string{"/api/grants": body, "the page": page} {
		if strings.ContainsAny(text, "\x1b\x07\r\u202E") || len(text) > 16<<10 {
			t.Errorf("%s: %d bytes, control characters %v", what, len(text), strings.ContainsAny(text, "\x1b\x07\r\u202E"))
		}
	}
	if n := d.Grants[2]; !strings.Contains(n.Reason, "invalid_grant") || !strings.Contains(n.Reason, "bytes cut]") || n.RotatedBy != "worker?[31m-7?" {
		t.Errorf("the noisy row: reason %.80q..., rotated by %q", n.Reason, n.RotatedBy)
	}
}

// The note after a login names the grant and version its callback signed,
// once and for a minute; a cookie altered, signed with another key, or
// stale, and a crafted link, show nothing.
func TestConnectedNoteIsSigned(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	_, srv := dashboardServer(t, w, []string{"a", "b"}, nil)
	jar, _ := cookiejar.New(nil)
	browser := &http.Client{Jar: jar, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	send := func(target string, form url.Values) *http.Response {
		t.Helper()
		method := http.MethodGet
		if form != nil {
			method = http.MethodPost
		}
		req, _ := http.NewRequest(method, target, strings.NewReader(form.Encode()))
		if form != nil {
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		}
		req.SetBasicAuth("admin", testPassword)
		resp, err := browser.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp
	}
	send(srv.URL+"/", nil)
	u, _ := url.Parse(srv.URL)
	var csrf string
	for _, c := range jar.Cookies(u) {
		if c.Name == csrfCookie {
			csrf = c.Value
		}
	}
	authorize := send(srv.URL+"/connect/a", url.Values{"csrf": {csrf}}).Header.Get("Location")
	callback := send(authorize, nil).Header.Get("Location")
	var note string
	for _, c := range send(callback, nil).Cookies() {
		if c.Name == noteCookie {
			note = c.Value
		}
	}
	if note == "" {
		t.Fatal("the callback set no note cookie")
	}
	key := loginKey(credentials{password: testPassword}, srv.URL+"/callback") // as every replica derives it
	other := loginKey(credentials{password: "another operator password"}, srv.URL+"/callback")
	tag, payload, _ := strings.Cut(note, ".")
	js, _ := base64.RawURLEncoding.DecodeString(payload)
	altered := tag + "." + base64.RawURLEncoding.EncodeToString([]byte(strings.Replace(string(js), `"grant":"a"`, `"grant":"b"`, 1)))
	page := func(cookie string) (string, *http.Response) {
		h := http.Header{"Authorization": operator["Authorization"]}
		if cookie != "" {
			h.Set("Cookie", noteCookie+"="+cookie)
		}
		resp, body := do(t, srv, request{path: "/?connected=b&version=9", header: h})
		return regexp.MustCompile(`Grant <b>.*?</b> connected[^<]*`).FindString(body), resp
	}
	for _, tc := range []struct{ name, cookie, want string }{
		{"no cookie, a crafted link", "", ""},
		{"the callback's cookie", note, "Grant <b>a</b> connected (version 1)."},
		{"altered", altered, ""},
		{"signed with another key", sealNote(other, connectedNote{Grant: "b", Version: 9, Until: w.clock.Now().Add(time.Minute)}), ""},
		{"signed, for a grant not served here", sealNote(key, connectedNote{Grant: "elsewhere", Version: 9, Until: w.clock.Now().Add(time.Minute)}), ""},
		{"signed, by another replica", sealNote(key, connectedNote{Grant: "b", Version: 9, Until: w.clock.Now().Add(time.Minute)}), "Grant <b>b</b> connected (version 9)."},
	} {
		got, resp := page(tc.cookie)
		if got != tc.want {
			t.Errorf("%s: the page says %q, want %q", tc.name, got, tc.want)
		}
		if tc.cookie != "" && !slices.ContainsFunc(resp.Cookies(), func(c *http.Cookie) bool { return c.Name == noteCookie && c.MaxAge < 0 }) {
			t.Errorf("%s: the note cookie was not cleared", tc.name)
		}
	}
	w.clock.Advance(2 * time.Minute)
	if got, _ := page(note); got != "" {
		t.Errorf("two minutes later the note still says %q", got)
	}
}

// /connect refuses a grant name that the pages could only show altered.
func TestConnectRefusesUnprintableNames(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	_, srv := dashboardServer(t, w, nil, nil) // every grant: any valid name routes
	for _, name := range []string{"jira\x1b[2J", "jira\u202Eexe", "jira\x00"} {
		resp, body := do(t, srv, request{path: "/connect/" + url.PathEscape(name), header: operator})
		if resp.StatusCode != http.StatusBadRequest || strings.ContainsAny(body, "\x1b\u202E\x00") {
			t.Errorf("GET /connect/%q: %d %q, want 400 without the name's characters", name, resp.StatusCode, body)
		}
	}
}

// A throttled source's budget refills by the refresher's clock, not by how
// long the test happened to take.
func TestThrottleRefillsByTheClock(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	rf, _ := dashboardServer(t, w, nil, nil)
	guessFrom(rf.handler, "192.0.2.1", "", 30)
	if code := operatorFrom(rf.handler, "192.0.2.1", ""); code != http.StatusTooManyRequests {
		t.Fatalf("after 30 wrong guesses: %d, want 429", code)
	}
	w.clock.Advance(2 * time.Second)
	if code := operatorFrom(rf.handler, "192.0.2.1", ""); code != http.StatusOK {
		t.Errorf("two seconds later (one failure allowed per second): %d, want 200", code)
	}
}

// The dashboard's JSON says null, and the page "?", for rotations of the
// last hour that could not be counted; 0 stays 0.
func TestDashboardUnknownRotations(t *testing.T) {
	w := newWorld(t, tokenmgrtest.Strict)
	rf, _ := dashboardServer(t, w, []string{"jira"}, nil)
	d := &dashboard{now: w.clock.Now}
	for _, tc := range []struct {
		n    int64
		want string
	}{{-1, `"refreshes_last_hour":null`}, {0, `"refreshes_last_hour":0`}, {3, `"refreshes_last_hour":3`}} {
		st := tokenmgr.GrantStatus{Grant: "jira", Status: tokenmgr.StatusOK, Version: 1}
		if tc.n >= 0 {
			st.RefreshesLastHour = new(tc.n)
		}
		row := d.row(w.clock.Now(), "jira", rf.runner, st, nil)
		js, _ := json.Marshal(row)
		if !bytes.Contains(js, []byte(tc.want)) {
			t.Errorf("%d in the last hour: %s, want %s", tc.n, js, tc.want)
		}
		var page bytes.Buffer
		data := struct {
			dashboardData
			CSRF, Connected, ConnectedVersion string
		}{dashboardData: dashboardData{Grants: []dashboardRow{row}}}
		if err := dashboardPage.Execute(&page, data); err != nil {
			t.Fatal(err)
		}
		cell := map[int64]string{-1: `<td class="refreshes">?</td>`, 0: `<td class="refreshes">0</td>`, 3: `<td class="refreshes">3</td>`}[tc.n]
		if !strings.Contains(page.String(), cell) {
			t.Errorf("%d in the last hour: the page lacks %s", tc.n, cell)
		}
	}
}
