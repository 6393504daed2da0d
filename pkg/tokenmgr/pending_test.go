package tokenmgr

import (
	"testing"
	"time"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

// Invariant 4: Redis refuses the write of a rotated pair; the pair is held,
// served, and written once Redis is back.
func testPendingWrite(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	m := e.manager(Strict, nil)
	e.seed(m)
	ht := &hookTransport{before: func(*hookTransport) { e.down.Store(true) }}
	m.opts.IdPTransport = ht
	e.clock.Advance(time.Hour)
	tok, err := m.Token(t.Context(), e.grant)
	if err != nil {
		t.Fatalf("Token: %v", err)
	}
	if !e.idp.AccessTokenValid(tok.AccessToken) {
		t.Fatalf("the held pair is not the new one")
	}
	if m.Stats().PendingWrites != 1 {
		t.Fatalf("pending writes = %d, want 1", m.Stats().PendingWrites)
	}
	e.down.Store(false)
	eventually(t, "the held pair to reach Redis", func() bool {
		st, err := m.Status(t.Context(), e.grant)
		return err == nil && st.Version == 2
	})
	other := e.manager(Strict, nil)
	got, err := other.Token(t.Context(), e.grant)
	if err != nil || got.AccessToken != tok.AccessToken {
		t.Errorf("another manager does not see the held pair: %v", err)
	}
	if s := e.idp.Stats(); s.Rotations != 1 || s.ReuseDetected != 0 {
		t.Errorf("IdP %+v", s)
	}
}

// Invariant 4 at shutdown: a pair Redis refused is written by Close.
func testCloseWritesHeldPair(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	o := e.options(Strict)
	o.Provider.HTTPTimeout = 2 * time.Second
	ht := &hookTransport{before: func(*hookTransport) { e.down.Store(true) }}
	o.IdPTransport = ht
	m, err := New(t.Context(), o)
	if err != nil {
		t.Fatal(err)
	}
	e.seed(m)
	e.clock.Advance(time.Hour)
	if _, err := m.Token(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	e.down.Store(false)
	if err := m.Close(t.Context()); err != nil {
		t.Fatalf("Close: %v", err)
	}
	check := e.manager(Strict, nil)
	if st := e.status(check); st.Version != 2 {
		t.Errorf("after Close the stored version is %d, want 2 (the held pair)", st.Version)
	}
}
