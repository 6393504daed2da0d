//go:build integration

package integration

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/tokenmgr/tokenmgr/internal/redisserver"
	"github.com/tokenmgr/tokenmgr/internal/testbin"
)

// chromium finds the browser. CI sets TOKENMGR_REQUIRE_BROWSER so that a
// missing browser fails instead of skipping.
func chromium(t *testing.T) string {
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("TOKENMGR_REQUIRE_BROWSER") != "" {
		t.Fatal("chromium not found and TOKENMGR_REQUIRE_BROWSER is set (apt-get install -y chromium)")
	}
	t.Skip("chromium not found (apt-get install -y chromium); set TOKENMGR_REQUIRE_BROWSER to fail instead")
	return ""
}

// artifactDir is where screenshots are kept: $TOKENMGR_ARTIFACTS, else a
// directory under the system's temporary directory (logged).
func artifactDir(t *testing.T) string {
	dir := os.Getenv("TOKENMGR_ARTIFACTS")
	if dir == "" {
		dir = filepath.Join(os.TempDir(), "tokenmgr-artifacts")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// The operator dashboard in a real headless Chromium: two grants served by
// a refresher with its own admin listener; one is killed by a foreign
// rotation (strict) and its row turns to "needs re-consent" without a
// reload; Re-connect walks through the fake IdP's consent page and the row
// turns healthy. No issued token ever appears in the page or its JSON.
func TestDashboardInBrowser(t *testing.T) {
	browser := chromium(t)
	f := newFleet(t, "strict", "--consent-page")
	f.seedGrant("confluence")

	port, err := redisserver.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	admin := fmt.Sprintf("127.0.0.1:%d", port)
	base := "http://" + admin
	const password = "browser-test-password"
	cmd := exec.Command(filepath.Join(binDir, "refresher"), "run", "--listen", "127.0.0.1:0", "--admin-listen", admin,
		"--tick", "100ms", "--jitter", "0s", "--log-level", "debug", "--provider", "strict", "--http-timeout", "2s",
		"--token-url", f.idpURL+"/oauth/token", "--auth-url", f.idpURL+"/authorize", "--redirect-url", base+"/callback")
	cmd.Env = append(f.env(), "TOKENMGR_ADMIN_PASSWORD="+password)
	logs := &testbin.Buffer{}
	cmd.Stdout, cmd.Stderr = io.Discard, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _, _ = cmd.Process.Wait() })
	auth := "Basic " + base64.StdEncoding.EncodeToString([]byte("admin:"+password))
	waitHTTP(t, base+"/api/grants", auth)

	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(browser), chromedp.NoSandbox, chromedp.DisableGPU,
		chromedp.Flag("disable-quic", true), chromedp.Flag("disable-component-update", true), chromedp.Flag("disable-sync", true),
		chromedp.UserDataDir(t.TempDir()), chromedp.WindowSize(1500, 520))
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancelAlloc()
	bctx, cancelBrowser := chromedp.NewContext(actx, chromedp.WithLogf(t.Logf))
	defer cancelBrowser()
	// The first action starts the browser: no timeout on its context.
	if err := chromedp.Do(bctx, chromedp.Navigate("about:blank")); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(bctx, 2*time.Minute)
	defer cancel()

	row := func(grant string) string { return `tr[data-grant="` + grant + `"]` }
	state := func(grant string) (string, error) {
		return chromedp.Run(ctx, chromedp.Text(row(grant)+" td.state", chromedp.NodeVisible))
	}
	// waitState waits for the row's state text to start with want, with
	// no reload: only the page's polling can change it.
	waitState := func(grant, want string, within time.Duration) {
		t.Helper()
		deadline := time.Now().Add(within)
		for {
			s, err := state(grant)
			if err == nil && strings.HasPrefix(s, want) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("row %s: state %q (%v) after %s, want %q", grant, s, err, within, want)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	dir := artifactDir(t)
	screenshot := func(name string) {
		t.Helper()
		png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, png, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("screenshot: %s", p)
	}
	// checkNoToken scans the live DOM and the JSON for every token the
	// fake IdP has issued so far (asked after reading both).
	checkNoToken := func(when string) {
		t.Helper()
		html, err := chromedp.Run(ctx, chromedp.OuterHTML("html"))
		if err != nil {
			t.Fatal(err)
		}
		js := getBody(t, base+"/api/grants", auth)
		if tok := f.issuedTokenIn(html, js); tok != "" {
			t.Fatalf("%s: an issued token (%d bytes) appears in the page or /api/grants", when, len(tok))
		}
	}

	// The operator logs in as a browser does: the page answers 401 with a
	// Basic challenge, and the browser answers it with the credentials in
	// the URL, then keeps them for the origin (the page's polling too).
	login := "http://admin:" + password + "@" + admin + "/"
	if err := chromedp.Do(ctx,
		chromedp.Navigate(login),
		chromedp.WaitVisible(row("confluence")),
	); err != nil {
		t.Fatal(err)
	}
	waitState(f.grant, "ok", 10*time.Second)
	waitState("confluence", "ok", 10*time.Second)
	f.waitRotations(4) // the refresher rotates both (2 s tokens)
	checkNoToken("both healthy")

	if _, err := f.foreignRotation("confluence"); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	waitState("confluence", "needs re-consent", 15*time.Second)
	shownIn := time.Since(killed)
	if err := chromedp.Do(ctx, chromedp.WaitVisible(row("confluence")+" button.reconnect")); err != nil {
		t.Fatal(err)
	}
	reason, _ := chromedp.Run(ctx, chromedp.Text(row("confluence")+" .reason"))
	if !strings.Contains(reason, "invalid_grant") {
		t.Errorf("the dead row's reason %q does not say why", reason)
	}
	if s, _ := state(f.grant); !strings.HasPrefix(s, "ok") {
		t.Errorf("the other grant's row is %q, want ok", s)
	}
	screenshot("dashboard-reconsent.png")
	checkNoToken("one grant dead")
	exchangesBefore := f.stats()["auth_code_exchanges"]

	// Re-connect: the fake IdP's consent page, then back to the dashboard.
	if err := chromedp.Do(ctx,
		chromedp.Click(row("confluence")+" button.reconnect"),
		chromedp.WaitVisible("#allow"),
	); err != nil {
		t.Fatal(err)
	}
	screenshot("idp-consent.png")
	allowed := time.Now()
	if err := chromedp.Do(ctx,
		chromedp.Click("#allow"),
		chromedp.WaitVisible("#flash"),
	); err != nil {
		t.Fatal(err)
	}
	location, err := chromedp.Run(ctx, chromedp.Location())
	if err != nil {
		t.Fatal(err)
	}
	flash, err := chromedp.Run(ctx, chromedp.Text("#flash"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(location, base+"/?connected=confluence") || !strings.Contains(flash, "confluence connected") {
		t.Errorf("after consent the browser is at %s showing %q; want the dashboard saying confluence connected", location, flash)
	}
	waitState("confluence", "ok", 10*time.Second)
	healthyIn := time.Since(allowed)
	fmt.Printf("DASHBOARD needs-re-consent shown %s after the foreign rotation (2 s tokens, 3 s polling); row healthy %s after Allow\n",
		shownIn.Round(10*time.Millisecond), healthyIn.Round(10*time.Millisecond))
	if n := f.stats()["auth_code_exchanges"] - exchangesBefore; n != 1 {
		t.Errorf("%d code exchanges for one Re-connect, want 1", n)
	}
	buttons, err := chromedp.Run(ctx, chromedp.Evaluate[int](`document.querySelectorAll("button.reconnect").length`))
	if err != nil {
		t.Fatal(err)
	}
	if buttons != 0 {
		t.Errorf("%d Re-connect buttons left with both grants healthy", buttons)
	}
	f.waitRotations(f.stats()["rotations"] + 2) // the grants keep rotating
	screenshot("dashboard-healthy.png")
	checkNoToken("reconnected")
	if tok := f.issuedTokenIn(logs.String()); tok != "" {
		t.Errorf("an issued token appears in the refresher's debug logs")
	}
	if !strings.Contains(logs.String(), `"grant connected"`) {
		t.Errorf("the refresher's debug log has no 'grant connected' line: is it the log at all?")
	}
}

// issuedTokenIn returns a token the fake IdP has issued that appears in
// one of texts, or "".
func (f *fleet) issuedTokenIn(texts ...string) string {
	var issued []string
	if err := json.Unmarshal([]byte(getBody(f.t, f.idpURL+"/admin/issued", "")), &issued); err != nil || len(issued) == 0 {
		f.t.Fatalf("the fake IdP's issued tokens: %d, %v", len(issued), err)
	}
	for _, tok := range issued {
		for _, text := range texts {
			if strings.Contains(text, tok) {
				return tok
			}
		}
	}
	return ""
}

func getBody(t testing.TB, url, auth string) string {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s = %d %s", url, resp.StatusCode, b)
	}
	return string(b)
}

// waitHTTP waits until url answers 200.
func waitHTTP(t *testing.T, url, auth string) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		req, _ := http.NewRequest(http.MethodGet, url, nil)
		req.Header.Set("Authorization", auth)
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not come up: %v", url, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
