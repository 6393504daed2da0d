package tokenmgr

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

// Invariants 1, 3, 4: a holder whose lease is lost mid-call still writes its
// pair, fenced; a second holder working on the same version loses the CAS.
func testLeaseLost(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Atlassian)
	a := e.manager(Atlassian, nil)
	b2 := e.manager(Atlassian, nil)
	e.seed(a)
	k := grantKeys(a.opts.KeyPrefix, e.grant)
	e.idp.SetLatency(1500 * time.Millisecond) // longer than one extension period (1s)
	started := make(chan struct{})
	var once sync.Once
	ht := &hookTransport{before: func(*hookTransport) { once.Do(func() { close(started) }) }}
	setIdPTransport(t, a, ht)

	done := make(chan error, 1)
	go func() { _, err := a.Rotate(context.Background(), e.grant); done <- err }()
	<-started
	// The lease expires under A (as after a long GC pause): B takes it and
	// refreshes the same version.
	if err := a.opts.Redis.Del(t.Context(), k.lock).Err(); err != nil {
		t.Fatal(err)
	}
	if _, err := b2.Rotate(t.Context(), e.grant); err != nil {
		t.Fatalf("B: %v", err)
	}
	if err := <-done; err != nil {
		t.Fatalf("A: %v", err)
	}
	st := e.status(a)
	if st.Version != 2 || st.RefreshCount != 1 {
		t.Errorf("version %d refresh_count %d after two holders raced on version 1; want 2 and 1 (one fenced write wins)", st.Version, st.RefreshCount)
	}
	sa, sb := a.Stats(), b2.Stats()
	if sa.LeasesLost != 1 {
		t.Errorf("A lost %d leases, want 1", sa.LeasesLost)
	}
	if sa.WriteConflicts+sb.WriteConflicts != 1 {
		t.Errorf("write conflicts A=%d B=%d, want 1 in all", sa.WriteConflicts, sb.WriteConflicts)
	}
	// Whatever won, the fleet's token works.
	e.idp.SetLatency(0)
	tok, err := a.Token(t.Context(), e.grant)
	if err != nil || !e.idp.AccessTokenValid(tok.AccessToken) {
		t.Errorf("after the race the stored token is not valid: %v", err)
	}
}
