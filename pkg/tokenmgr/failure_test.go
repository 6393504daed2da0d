package tokenmgr

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/oauth2"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

// Invariant 5: invalid_grant is re-checked against Redis before the grant is
// declared dead.
func testInvalidGrantRecheck(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Okta)
	m := e.manager(Okta, nil)
	other := e.manager(Okta, nil)
	seeded := e.seed(m)
	k := grantKeys(m.opts.KeyPrefix, e.grant)
	// Just before m's call reaches the IdP, another holder rotates the same
	// version and stores its pair, and the leeway passes.
	ht := &hookTransport{}
	ht.before = func(h *hookTransport) {
		if h.calls.Load() != 1 {
			return
		}
		cfg := e.idp.OAuthConfig(oauth2.AuthStyleInHeader)
		fresh, err := cfg.TokenSource(context.Background(), &oauth2Token{RefreshToken: seeded.RefreshToken}).Token()
		if err != nil {
			t.Errorf("foreign refresh: %v", err)
			return
		}
		next := &record{Family: e.status(m).Family, Status: StatusOK, AccessToken: secret(fresh.AccessToken), RefreshToken: secret(fresh.RefreshToken), TokenType: "Bearer", Expiry: fresh.Expiry, RotatedAt: e.clock.Now()}
		if res, _, _, err := other.store.rotate(context.Background(), e.grant, k, 1, next); err != nil || res != casWritten {
			t.Errorf("foreign write: %v %v", res, err)
		}
		e.clock.Advance(time.Minute) // outside the 30s grace period
	}
	setIdPTransport(t, m, ht)
	if _, err := m.Rotate(t.Context(), e.grant); err != nil {
		t.Fatalf("Rotate: %v (the grant was declared dead although Redis held a newer pair?)", err)
	}
	if s := e.idp.Stats(); s.RefreshFailed != 1 {
		t.Fatalf("IdP failures = %d; the test did not provoke invalid_grant", s.RefreshFailed)
	}
	st := e.status(m)
	if st.Status != StatusOK || st.Version != 2 {
		t.Errorf("status %s version %d, want ok at 2", st.Status, st.Version)
	}
	if m.Stats().MarkedDead != 0 {
		t.Errorf("grant marked dead")
	}
}

// Invariant 6: a dead grant fails fast everywhere, with no more IdP calls,
// until it is re-seeded.
func testDeadGrantFailsFast(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Atlassian)
	ms := []*Manager{e.manager(Atlassian, nil), e.manager(Atlassian, nil), e.manager(Atlassian, nil)}
	tok := e.idp.NewGrant("")
	tok.RefreshToken = "unknown-to-the-idp"
	if _, err := ms[0].Seed(t.Context(), e.grant, tok, SeedOptions{}); err != nil {
		t.Fatal(err)
	}
	e.clock.Advance(2 * time.Hour)
	_, err := ms[0].Token(t.Context(), e.grant)
	var re *ReauthRequiredError
	if !errors.As(err, &re) || !errors.Is(err, ErrReauthRequired) || !strings.Contains(re.Reason, "invalid_grant") {
		t.Fatalf("Token = %v, want a ReauthRequiredError naming invalid_grant", err)
	}
	before := e.idp.Stats()
	eventually(t, "every manager to see the dead status", func() bool {
		for _, m := range ms {
			if _, err := m.Token(t.Context(), e.grant); !errors.Is(err, ErrReauthRequired) {
				return false
			}
		}
		return true
	})
	var wg sync.WaitGroup
	var wrong atomic.Int64
	for _, m := range ms {
		for range 50 {
			wg.Go(func() {
				for range 20 {
					if _, err := m.Token(t.Context(), e.grant); !errors.Is(err, ErrReauthRequired) {
						wrong.Add(1)
					}
				}
			})
		}
	}
	wg.Wait()
	if wrong.Load() != 0 {
		t.Errorf("%d calls did not get ErrReauthRequired", wrong.Load())
	}
	if after := e.idp.Stats(); after.RefreshOK+after.RefreshFailed != before.RefreshOK+before.RefreshFailed {
		t.Errorf("a dead grant made %d more IdP calls", after.RefreshOK+after.RefreshFailed-before.RefreshOK-before.RefreshFailed)
	}
	if st := e.status(ms[1]); st.Status != StatusReauthRequired || st.Reason == "" {
		t.Errorf("status %+v, want reauth_required with a reason", st)
	}
	// An operator re-seeds: every manager recovers.
	e.seed(ms[2])
	eventually(t, "every manager to see the re-seeded grant", func() bool {
		for _, m := range ms {
			if _, err := m.Token(t.Context(), e.grant); err != nil {
				return false
			}
		}
		return true
	})
}

// A 429 with Retry-After: the fleet waits it out, then refreshes.
func testTransientBackoff(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	a := e.manager(Strict, nil)
	other := e.manager(Strict, nil)
	e.seed(a)
	e.idp.Fail429(1, 30*time.Second)
	e.clock.Advance(time.Hour)
	_, err := a.Token(t.Context(), e.grant)
	var re *RefreshError
	if !errors.As(err, &re) || re.RetryAfter != 30*time.Second {
		t.Fatalf("Token = %v, want RefreshError with RetryAfter 30s", err)
	}
	var rerr *oauth2RetrieveError
	if !errors.As(err, &rerr) || rerr.Response.StatusCode != http.StatusTooManyRequests {
		t.Errorf("the IdP's RetrieveError is not reachable: %v", err)
	}
	// Another process respects the fleet-wide retry_at without calling.
	if _, err := other.Token(t.Context(), e.grant); !errors.As(err, &re) {
		t.Errorf("other Token = %v, want the backoff", err)
	}
	if s := e.idp.Stats(); s.RefreshOK+s.RefreshFailed+s.Injected429 != 1 {
		t.Errorf("IdP calls during backoff: %+v", s)
	}
	e.clock.Advance(31 * time.Second)
	if _, err := other.Token(t.Context(), e.grant); err != nil {
		t.Errorf("after Retry-After: %v", err)
	}
}

// A wrong client secret is a configuration error, not a dead grant; the
// fleet backs off instead of asking again and again.
func testConfigErrorBackoff(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Atlassian)
	good := e.manager(Atlassian, nil)
	e.seed(good)
	bad := func(o *Options) { cfg := *o.OAuth2; cfg.ClientSecret = "wrong"; o.OAuth2 = &cfg }
	a, other := e.manager(Atlassian, bad), e.manager(Atlassian, bad)
	e.clock.Advance(time.Hour)
	_, err := a.Token(t.Context(), e.grant)
	var re *RefreshError
	if !errors.As(err, &re) || !re.Config || errors.Is(err, ErrReauthRequired) {
		t.Fatalf("Token = %v, want a RefreshError with Config set", err)
	}
	if _, err := other.Token(t.Context(), e.grant); !errors.As(err, &re) {
		t.Fatalf("other Token = %v, want the fleet-wide backoff", err)
	}
	if s := e.idp.Stats(); s.RefreshFailed != 1 {
		t.Errorf("IdP saw %d failed refreshes, want 1 (the others wait)", s.RefreshFailed)
	}
	if st := e.status(a); st.Status != StatusOK {
		t.Errorf("a configuration error marked the grant %s", st.Status)
	}
}

// RFC 6749 5.2: invalid_request is not a configuration error. Ory Hydra
// answers it to concurrent refreshes under load without rotating, and the
// same refresh token then works: it is retried under the same lease, after
// a re-read, and beyond that backs the fleet off briefly, as transient.
func testRetryableBadRequest(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	m := e.manager(Strict, nil)
	e.seed(m)
	e.idp.FailBusy(retriesInLease)
	e.clock.Advance(time.Hour)
	if _, err := m.Token(t.Context(), e.grant); err != nil {
		t.Fatalf("Token through %d busy answers: %v", retriesInLease, err)
	}
	if s := e.idp.Stats(); s.InjectedBusy != retriesInLease || s.Rotations != 1 || s.ReuseDetected != 0 {
		t.Errorf("IdP %+v, want %d busy answers, then one rotation, no reuse", s, retriesInLease)
	}
	if st := e.status(m); !st.RetryAt.IsZero() || m.Stats().Leases != 1 {
		t.Errorf("retry_at %v, %d leases: want the retries inside one lease, no fleet backoff", st.RetryAt, m.Stats().Leases)
	}
	// More than the retries in a lease: a transient error, not a
	// configuration one, with the first backoff step.
	e.idp.FailBusy(10)
	e.clock.Advance(time.Hour)
	_, err := m.Token(t.Context(), e.grant)
	var re *RefreshError
	if !errors.As(err, &re) || re.Config || re.RetryAfter > 2*time.Second {
		t.Fatalf("Token = %v, want a transient RefreshError with a short backoff", err)
	}
	e.idp.FailBusy(0)
	e.clock.Advance(re.RetryAfter)
	if _, err := m.Token(t.Context(), e.grant); err != nil {
		t.Errorf("after the backoff: %v", err)
	}
}
