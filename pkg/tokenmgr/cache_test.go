package tokenmgr

import (
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

func testSingleFlight(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	m := e.manager(Strict, nil)
	e.seed(m)
	e.clock.Advance(time.Hour)
	var wg sync.WaitGroup
	for range 100 {
		wg.Go(func() {
			if _, err := m.Token(t.Context(), e.grant); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if s := e.idp.Stats(); s.RefreshOK != 1 {
		t.Errorf("100 callers in one process made %d refresh calls, want 1", s.RefreshOK)
	}
	if st := m.Stats(); st.Leases != 1 {
		t.Errorf("took %d leases, want 1", st.Leases)
	}
}

// Invariant 8 and 2: what callers get has no refresh token, so nobody can
// refresh outside the lease (or log it).
func testNoRefreshTokenToCallers(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	m := e.manager(Strict, nil)
	e.seed(m)
	tok, err := m.Token(t.Context(), e.grant)
	if err != nil {
		t.Fatal(err)
	}
	if tok.RefreshToken != "" {
		t.Errorf("Token() exposes the refresh token")
	}
	ts, err := m.TokenSource(e.grant).Token()
	if err != nil || ts.RefreshToken != "" {
		t.Errorf("TokenSource exposes the refresh token (%v)", err)
	}
}

// Redis unreachable: cached tokens serve until they expire, then a clear
// error; service resumes when Redis does.
func testRedisOutage(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Atlassian)
	m := e.manager(Atlassian, nil)
	seeded := e.seed(m)
	if _, err := m.Token(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	e.down.Store(true)
	e.clock.Advance(58 * time.Minute) // due, still valid
	for range 10 {
		tok, err := m.Token(t.Context(), e.grant)
		if err != nil || tok.AccessToken != seeded.AccessToken {
			t.Fatalf("during the outage a valid cached token was not served: %v", err)
		}
	}
	e.clock.Advance(5 * time.Minute) // expired
	_, err := m.Token(t.Context(), e.grant)
	if !errors.Is(err, ErrStoreUnavailable) {
		t.Fatalf("Token after expiry during the outage = %v, want ErrStoreUnavailable", err)
	}
	if s := e.idp.Stats(); s.RefreshOK+s.RefreshFailed != 0 {
		t.Errorf("the IdP was called while Redis was down: %+v", s)
	}
	e.down.Store(false)
	eventually(t, "service after Redis returns", func() bool {
		_, err := m.Token(t.Context(), e.grant)
		return err == nil
	})
}

// Invariant 12: a token past its soft deadline that cannot be refreshed now
// (the fleet backs off, Redis is down, the record is corrupt) costs one
// background attempt per backoff step, not a Redis read and a goroutine
// per call.
func testBackgroundRefreshBounded(t *testing.T, b backend) {
	for _, tc := range []struct {
		name  string
		fault func(e *env, m *Manager)
		heal  func(e *env)
	}{
		{"fleet backing off", func(e *env, m *Manager) {
			if err := m.store.deferRefresh(t.Context(), e.grant, grantKeys("tm", e.grant), 1, e.status(m).Family, e.clock.Now().Add(time.Hour)); err != nil {
				t.Fatal(err)
			}
		}, nil},
		{"Redis down", func(e *env, m *Manager) { e.down.Store(true) }, func(e *env) { e.down.Store(false) }},
		{"corrupt record", func(e *env, m *Manager) {
			if err := e.client().HSet(t.Context(), grantKeys("tm", e.grant).record, fExpiry, "soon").Err(); err != nil {
				t.Fatal(err)
			}
		}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, b, tokenmgrtest.Strict)
			m := e.manager(Strict, nil)
			seeded := e.seed(m)
			if _, err := m.Token(t.Context(), e.grant); err != nil {
				t.Fatal(err)
			}
			tc.fault(e, m)
			e.clock.Advance(58 * time.Minute) // due, still usable
			before := e.commands.Load()
			g := m.lookup(e.grant)
			for range 100 {
				tok, err := m.Token(t.Context(), e.grant)
				if err != nil || tok.AccessToken != seeded.AccessToken {
					t.Fatalf("the usable token was not served: %v", err)
				}
				// Calls spread over time: each finds the last attempt over.
				for g.bgRefresh.Load() {
					time.Sleep(time.Millisecond)
				}
			}
			n := e.commands.Load() - before
			t.Logf("%s: 100 Token() calls on a due token: %d Redis commands", tc.name, n)
			if n > 10 {
				t.Errorf("100 calls on a due token sent %d Redis commands, want one background attempt's few", n)
			}
			if tc.heal != nil {
				tc.heal(e)
			}
		})
	}
}

// Invariant 12: a corrupt record with no usable token left is read once per
// re-check interval, not once per request; its error is served meanwhile.
func testCorruptRecordCached(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	// Seeded by another process before m starts: m must not hear the
	// seed's message, whose record (a usable token) it would adopt
	// whenever the message arrives, and then rightly serve.
	e.seed(e.manager(Strict, nil))
	if err := e.client().HSet(t.Context(), grantKeys("tm", e.grant).record, fV, "x").Err(); err != nil {
		t.Fatal(err)
	}
	m := e.manager(Strict, nil)
	if _, err := m.Token(t.Context(), e.grant); err == nil {
		t.Fatal("a corrupt record served a token")
	}
	eventually(t, "the grant's subscription", m.Subscribed) // its own, with sharded messages
	before := e.commands.Load()
	for range 1000 {
		if _, err := m.Token(t.Context(), e.grant); !errors.As(err, new(*CorruptRecordError)) {
			t.Fatalf("Token = %v, want the corrupt record's error", err)
		}
	}
	n := e.commands.Load() - before
	t.Logf("1000 Token() calls on a corrupt record: %d Redis commands", n)
	if n > 3 {
		t.Errorf("1000 calls on a corrupt record sent %d Redis commands, want 1", n)
	}
	e.clock.Advance(m.corruptRecheck())
	before = e.commands.Load()
	if _, err := m.Token(t.Context(), e.grant); err == nil {
		t.Fatal("a corrupt record served a token")
	}
	if n := e.commands.Load() - before; n == 0 {
		t.Errorf("the record was not read again after the re-check interval")
	}
	e.seed(m) // an operator repairs it
	eventually(t, "the repaired grant", func() bool {
		_, err := m.Token(t.Context(), e.grant)
		return err == nil
	})
}
