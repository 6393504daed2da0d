package tokenmgr

import (
	"testing"
	"time"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

// Invariant 11: while a live refresher serves the grant, a worker whose
// token is above the floor leaves the refresh to it; at the floor, or once
// the refresher stops announcing itself, the worker refreshes.
func testWorkersLeaveRefreshToRefresher(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	refresher := e.manager(Strict, func(o *Options) { o.Holder = "refresher-pod" })
	worker := e.manager(Strict, nil)
	e.seed(refresher)
	if _, err := worker.Token(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	if err := refresher.Announce(t.Context(), []string{"other", e.grant}, time.Minute); err != nil {
		t.Fatal(err)
	}
	g := worker.lookup(e.grant)
	settle := func() {
		for g.bgRefresh.Load() {
			time.Sleep(time.Millisecond)
		}
	}
	call := func() {
		t.Helper()
		if _, err := worker.Token(t.Context(), e.grant); err != nil {
			t.Fatal(err)
		}
		settle()
	}
	// Past every soft deadline (the worker's margin is 5 min of the hour),
	// above the floor (the last 1.5 min).
	e.clock.Advance(58 * time.Minute)
	for range 5 {
		call()
		e.clock.Advance(time.Second) // the next background look
	}
	if s := e.idp.Stats(); s.RefreshOK != 0 || worker.Stats().LeftToRefresher == 0 {
		t.Fatalf("the worker refreshed (%d) while a live refresher served the grant (left %d)", s.RefreshOK, worker.Stats().LeftToRefresher)
	}
	// At the floor the worker no longer waits.
	e.clock.Advance(40 * time.Second)
	call()
	if s := e.idp.Stats(); s.RefreshOK != 1 || worker.Stats().Refreshes != 1 {
		t.Fatalf("at the floor: IdP refreshes %d, worker's %d; want the worker's one", s.RefreshOK, worker.Stats().Refreshes)
	}

	// The refresher goes away: its announcement runs out, and the worker
	// refreshes at its soft deadline again.
	if err := refresher.Announce(t.Context(), nil, 200*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	time.Sleep(refresherCheckEvery + 300*time.Millisecond) // the announcement and the worker's cache run out
	e.clock.Advance(58 * time.Minute)
	call()
	if s := e.idp.Stats(); s.RefreshOK != 2 {
		t.Errorf("with no live refresher the worker did not refresh at its soft deadline (IdP refreshes %d)", s.RefreshOK)
	}
}
