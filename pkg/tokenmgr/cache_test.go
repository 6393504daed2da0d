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
