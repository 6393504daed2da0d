package tokenmgr

import (
	"errors"
	"net/http"
	"testing"
	"time"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

func testSeedAndServe(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Atlassian)
	m := e.manager(Atlassian, nil)
	seeded := e.seed(m)
	tok, err := m.Token(t.Context(), e.grant)
	if err != nil {
		t.Fatalf("Token: %v", err)
	}
	if tok.AccessToken != seeded.AccessToken {
		t.Errorf("Token returned another access token than the seeded one")
	}
	st := e.status(m)
	if st.Version != 1 || st.Status != StatusOK || !st.HasRefreshToken || st.AbsoluteExpiry.IsZero() {
		t.Errorf("status = %+v, want version 1, ok, a refresh token and an absolute expiry", st)
	}
	resp, err := m.Client(e.grant).Get(e.idp.APIURL())
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("API through the managed client: %v %v", resp, err)
	}
	resp.Body.Close()
	if _, err := m.Token(t.Context(), "unknown-grant"); !errors.Is(err, ErrGrantNotFound) {
		t.Errorf("Token(unknown) = %v, want ErrGrantNotFound", err)
	}
	if _, err := m.Token(t.Context(), "bad{grant}"); err == nil {
		t.Errorf("Token(bad name) succeeded")
	}
}

// Operators see a refresh in flight (the intent of the current version) and
// the fleet's rotations of the last hour.
func testStatusRefreshingAndLastHour(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Atlassian)
	m := e.manager(Atlassian, func(o *Options) { o.Holder = "pod-a" })
	e.seed(m)
	if st := e.status(m); st.Refreshing || st.RefreshesLastHour != 0 {
		t.Fatalf("after seed: refreshing %v, %d refreshes in the last hour; want none", st.Refreshing, st.RefreshesLastHour)
	}
	var during GrantStatus
	m.opts.IdPTransport = &hookTransport{before: func(*hookTransport) { during = e.status(m) }}
	for i := range 3 {
		if _, err := m.Rotate(t.Context(), e.grant); err != nil {
			t.Fatal(err)
		}
		if !during.Refreshing || during.RefreshHolder != "pod-a" || !during.RefreshStartedAt.Equal(e.clock.Now().Truncate(time.Millisecond)) {
			t.Errorf("during the provider call: refreshing %v by %q since %v; want true, pod-a, %v",
				during.Refreshing, during.RefreshHolder, during.RefreshStartedAt, e.clock.Now())
		}
		if st := e.status(m); st.Refreshing || st.RefreshesLastHour != int64(i+1) {
			t.Errorf("after rotation %d: refreshing %v, %d in the last hour", i+1, st.Refreshing, st.RefreshesLastHour)
		}
		e.clock.Advance(20 * time.Minute)
	}
	// 60 minutes after the first rotation it has left the window.
	if st := e.status(m); st.RefreshesLastHour != 2 {
		t.Errorf("an hour after the first rotation: %d in the last hour, want 2", st.RefreshesLastHour)
	}
	e.clock.Advance(time.Hour)
	if st := e.status(m); st.RefreshesLastHour != 0 {
		t.Errorf("two hours on: %d in the last hour, want 0", st.RefreshesLastHour)
	}
	// A rotation trims what left the window, so the set stays small.
	m.opts.IdPTransport = nil
	if _, err := m.Rotate(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	k := grantKeys(m.opts.KeyPrefix, e.grant)
	if n, err := m.opts.Redis.ZCard(t.Context(), k.rotations).Result(); err != nil || n != 1 {
		t.Errorf("rotations set holds %d members (%v), want 1 after trimming", n, err)
	}
	// Statuses reads many grants at once, with an error per grant.
	sts, errs := m.Statuses(t.Context(), []string{e.grant, "missing", "bad{name}"})
	if errs[0] != nil || sts[0].Version != 5 || !errors.Is(errs[1], ErrGrantNotFound) || errs[2] == nil {
		t.Errorf("Statuses = %+v, %v; want version 5, not found, invalid name", sts, errs)
	}
}
