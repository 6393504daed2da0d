package tokenmgr

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/oauth2"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

// Invariant 5: a request that met a 401 because the fleet rotated is retried
// once with the newer version, with no refresh of its own.
func testUnauthorizedNewerVersion(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	rotator := e.manager(Strict, nil)
	worker := e.pollingManager(Strict, func(o *Options) { o.PollInterval = time.Hour })
	e.seed(rotator)
	rotated := false
	api := &apiTransport{before: func() {
		if !rotated {
			rotated = true
			if _, err := rotator.Rotate(context.Background(), e.grant); err != nil { // revokes the worker's token (strict)
				t.Errorf("Rotate: %v", err)
			}
		}
	}}
	client := &http.Client{Transport: worker.Transport(e.grant, api)}
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, e.idp.APIURL(), strings.NewReader(`{"replayable":true}`))
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d after the 401 rule, want 200", resp.StatusCode)
	}
	ws := worker.Stats()
	if ws.Unauthorized != 1 || ws.UnauthorizedAfterRetry != 0 || ws.Refreshes != 0 {
		t.Errorf("worker stats %+v, want one 401, retried with the stored version, no refresh", ws)
	}
	if s := e.idp.Stats(); s.RefreshOK != 1 {
		t.Errorf("IdP refreshes %d, want 1 (the rotator's)", s.RefreshOK)
	}
}

// Invariant 5: a 401 on the newest version triggers one fenced refresh of that
// version; a body that cannot be replayed is not retried.
func testUnauthorizedSameVersion(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Atlassian)
	m := e.manager(Atlassian, nil)
	e.seed(m)
	e.clock.Advance(time.Minute) // older than MinForcedRefreshAge
	fail := atomic.Int64{}
	fail.Store(1)
	api := &apiTransport{status401: &fail}
	client := &http.Client{Transport: m.Transport(e.grant, api)}
	resp, err := client.Get(e.idp.APIURL())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d, want 200 after one refresh", resp.StatusCode)
	}
	if s := e.idp.Stats(); s.RefreshOK != 1 {
		t.Errorf("IdP refreshes %d, want 1", s.RefreshOK)
	}
	// A 401 right after a rotation does not refresh again.
	fail.Store(1)
	resp, err = client.Get(e.idp.APIURL())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if s := e.idp.Stats(); s.RefreshOK != 1 {
		t.Errorf("a 401 on a fresh version refreshed again: %d refreshes", s.RefreshOK)
	}
	// Non-replayable body: 401 returned as is, the next request works.
	e.clock.Advance(time.Minute)
	fail.Store(1)
	req, _ := http.NewRequest(http.MethodGet, e.idp.APIURL(), onlyReader{strings.NewReader("x")})
	resp, err = client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("non-replayable request got %d, want its 401", resp.StatusCode)
	}
	resp, err = client.Get(e.idp.APIURL())
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Errorf("next request: %v %v", resp, err)
	}
	resp.Body.Close()
}

// oauth2.NewClient wraps the source in a ReuseTokenSource; a rotation (and
// the strict provider's revocation) must still reach it within seconds.
func testTokenSourceNewClient(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	m := e.manager(Strict, nil)
	rotator := e.manager(Strict, nil)
	e.seed(m)
	client := oauth2.NewClient(t.Context(), m.TokenSource(e.grant))
	get := func() int {
		resp, err := client.Get(e.idp.APIURL())
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := get(); code != http.StatusOK {
		t.Fatalf("first call: %d", code)
	}
	if _, err := rotator.Rotate(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	eventually(t, "oauth2.NewClient to use the rotated token", func() bool { return get() == http.StatusOK })
}

// Invariant 12: 401s that a refresh does not cure (Jira's "scope does not
// match") rotate the grant once: the version that refresh produced is
// marked with the 401's challenge, and the same 401 on it is the API's
// answer, returned to the caller. Reasons that vary are bounded by the
// per-grant backoff of forced refreshes.
func testPersistent401sRotateOnce(t *testing.T, b backend) {
	for _, tc := range []struct {
		name      string
		challenge func(i int) string
		max       int64
	}{
		{"same reason", func(int) string { return `Bearer error="invalid_token", error_description="scope does not match"` }, 1},
		// 30s, 60s, 120s, 240s of backoff in 6 minutes: at most 5.
		{"changing reasons", func(i int) string {
			return fmt.Sprintf(`Bearer error="invalid_token", error_description="scope does not match (%d)"`, i)
		}, 5},
		{"insufficient_scope", func(int) string { return `Bearer error="insufficient_scope", scope="write:jira-work"` }, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, b, tokenmgrtest.Atlassian)
			m := e.manager(Atlassian, nil)
			e.seed(m)
			client := m.Client(e.grant)
			before := e.idp.Stats().Rotations
			for i := range 60 { // one request every 6 s for 6 minutes
				e.clock.Advance(6 * time.Second)
				e.idp.SetAPIChallenge(tc.challenge(i))
				resp, err := client.Get(e.idp.APIURL())
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
				if resp.StatusCode != http.StatusUnauthorized {
					t.Fatalf("request %d: %d, want the API's 401", i, resp.StatusCode)
				}
			}
			rotations := e.idp.Stats().Rotations - before
			t.Logf("%s: 60 persistent 401s over 6 minutes: %d rotations", tc.name, rotations)
			if rotations > tc.max {
				t.Errorf("%d rotations, want at most %d", rotations, tc.max)
			}
			e.idp.SetAPIChallenge("")
			resp, err := client.Get(e.idp.APIURL())
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				t.Errorf("once the API accepts again: %d", resp.StatusCode)
			}
		})
	}
}
