package tokenmgr

import (
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/oauth2"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

// Invariant 2: a fleet refreshes once per rotation; the others re-read.
func testRotationOneRefresh(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	ms := []*Manager{e.manager(Strict, nil), e.manager(Strict, nil), e.manager(Strict, nil)}
	first := e.seed(ms[0])
	for _, m := range ms {
		if _, err := m.Token(t.Context(), e.grant); err != nil {
			t.Fatal(err)
		}
	}
	e.clock.Advance(time.Hour) // every cached token expired at once
	var wg sync.WaitGroup
	toks := make([]string, len(ms))
	for i, m := range ms {
		wg.Go(func() {
			tok, err := m.Token(t.Context(), e.grant)
			if err != nil {
				t.Errorf("manager %d: %v", i, err)
				return
			}
			toks[i] = tok.AccessToken
		})
	}
	wg.Wait()
	for i := range toks {
		if toks[i] == first.AccessToken || toks[i] != toks[0] {
			t.Fatalf("managers disagree or kept the old token after the rotation")
		}
	}
	s := e.idp.Stats()
	if s.RefreshOK != 1 || s.Rotations != 1 || s.ReuseDetected != 0 {
		t.Errorf("IdP saw %+v, want exactly one refresh and no reuse", s)
	}
	if st := e.status(ms[0]); st.Version != 2 || st.RefreshCount != 1 {
		t.Errorf("stored version %d refresh_count %d, want 2 and 1", st.Version, st.RefreshCount)
	}
}

// Invariant 4: the IdP rotated but the answer was lost; inside the leeway the
// same refresh token is replayed and the grant lives.
func testDroppedResponseAtlassian(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Atlassian)
	m := e.manager(Atlassian, nil)
	e.seed(m)
	e.idp.DropResponses(1)
	e.clock.Advance(time.Hour)
	_, err := m.Token(t.Context(), e.grant)
	var re *RefreshError
	if !errors.As(err, &re) || errors.Is(err, ErrReauthRequired) {
		t.Fatalf("first Token = %v, want a transient RefreshError", err)
	}
	if st := e.status(m); st.RetryAt.IsZero() {
		t.Errorf("no fleet-wide retry_at stored after a transient failure")
	}
	e.clock.Advance(re.RetryAfter + time.Second)
	tok, err := m.Token(t.Context(), e.grant)
	if err != nil {
		t.Fatalf("Token after backoff: %v", err)
	}
	if !e.idp.AccessTokenValid(tok.AccessToken) {
		t.Errorf("recovered token is not valid at the IdP")
	}
	s := e.idp.Stats()
	if s.Rotations != 1 || s.ReuseDetected != 0 || s.Dropped != 1 {
		t.Errorf("IdP %+v, want 1 rotation, 1 dropped, no reuse", s)
	}
	if st := e.status(m); st.Version != 2 || st.Status != StatusOK {
		t.Errorf("stored %+v, want ok at version 2", st)
	}
}

// Invariant 4 where there is no leeway: the grant is reported as needing
// re-consent, with the reason.
func testDroppedResponseStrict(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	m := e.manager(Strict, nil)
	e.seed(m)
	e.idp.DropResponses(1)
	e.clock.Advance(time.Hour)
	_, err := m.Token(t.Context(), e.grant)
	var re *RefreshError
	if !errors.As(err, &re) {
		t.Fatalf("first Token = %v, want a transient RefreshError", err)
	}
	e.clock.Advance(re.RetryAfter + time.Second)
	_, err = m.Token(t.Context(), e.grant)
	var dead *ReauthRequiredError
	if !errors.As(err, &dead) {
		t.Fatalf("Token = %v, want ReauthRequiredError", err)
	}
	if !strings.Contains(dead.Reason, "got no answer") || !strings.Contains(dead.Reason, "allows no reuse") {
		t.Errorf("reason %q does not explain the interrupted refresh", dead.Reason)
	}
}

// Invariant 4: a holder died after spending the refresh token; the next one
// finds its intent and replays the token inside the leeway.
func testCrashedHolderIntent(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Atlassian)
	m := e.manager(Atlassian, nil)
	seeded := e.seed(m)
	k := grantKeys(m.opts.KeyPrefix, e.grant)
	// The crashed holder, near expiry: intent recorded, token spent, answer
	// never stored.
	e.clock.Advance(55 * time.Minute)
	if _, ok, err := m.store.beginRefresh(t.Context(), k, 1, e.status(m).Family, "crashed-pod", e.clock.Now(), time.Hour); err != nil || !ok {
		t.Fatalf("intent: %v %v", ok, err)
	}
	cfg := e.idp.OAuthConfig(oauth2.AuthStyleInHeader)
	if _, err := cfg.TokenSource(t.Context(), &oauth2Token{RefreshToken: seeded.RefreshToken}).Token(); err != nil {
		t.Fatal(err)
	}
	e.clock.Advance(6 * time.Minute) // token expired, its lease long gone, still inside the 10m leeway
	tok, err := m.Token(t.Context(), e.grant)
	if err != nil {
		t.Fatalf("Token: %v", err)
	}
	if !e.idp.AccessTokenValid(tok.AccessToken) || e.idp.Stats().ReuseDetected != 0 {
		t.Errorf("recovery did not replay within the leeway: %+v", e.idp.Stats())
	}
	if !strings.Contains(e.logs.String(), "crashed-pod") {
		t.Errorf("the recovery was not logged with the earlier holder")
	}
}

// Invariant 4: Redis loses the record; a process holding the newest pair
// restores it, and an older pair never wins.
func testRestore(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	old := e.pollingManager(Strict, func(o *Options) { o.PollInterval = time.Hour })
	newer := e.manager(Strict, nil)
	e.seed(newer)
	if _, err := old.Token(t.Context(), e.grant); err != nil { // old holds v1
		t.Fatal(err)
	}
	v2, err := newer.Rotate(t.Context(), e.grant) // newer holds v2
	if err != nil || v2 != 2 {
		t.Fatalf("Rotate: %d %v", v2, err)
	}
	k := grantKeys(newer.opts.KeyPrefix, e.grant)
	e.client().Del(t.Context(), k.record)

	// The older process restores first (it still holds v1)...
	e.clock.Advance(time.Hour)
	old.lookup(e.grant).entry.Store(nil)
	if _, err := old.read(t.Context(), old.lookup(e.grant)); err != nil {
		t.Fatal(err)
	}
	// ...then the newer one: its pair must win.
	if _, err := newer.read(t.Context(), newer.lookup(e.grant)); err != nil {
		t.Fatal(err)
	}
	// And the older one cannot put v1 back.
	if _, err := old.read(t.Context(), old.lookup(e.grant)); err != nil {
		t.Fatal(err)
	}
	st := e.status(newer)
	if st.Version != 2 || !st.Restored {
		t.Fatalf("restored version %d (restored=%v), want 2", st.Version, st.Restored)
	}
	tok, err := newer.Token(t.Context(), e.grant)
	if err != nil || !e.idp.AccessTokenValid(tok.AccessToken) {
		t.Errorf("after restore: %v", err)
	}
	if s := e.idp.Stats(); s.ReuseDetected != 0 {
		t.Errorf("reuse after restore: %+v", s)
	}
}

// A provider that does not rotate: the refresh token is kept, and said so.
func testNonRotating(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.NonRotating)
	m := e.manager(NonRotating, nil)
	e.seed(m)
	for i := range 3 {
		e.clock.Advance(time.Hour)
		tok, err := m.Token(t.Context(), e.grant)
		if err != nil || !e.idp.AccessTokenValid(tok.AccessToken) {
			t.Fatalf("rotation %d: %v %+v %+v", i, err, e.status(m), e.idp.Stats())
		}
	}
	st := e.status(m)
	if st.Version != 4 || !st.HasRefreshToken {
		t.Errorf("status %+v, want version 4 with the refresh token kept", st)
	}
	if s := e.idp.Stats(); s.RefreshOK != 3 || s.RefreshFailed != 0 {
		t.Errorf("IdP %+v, want 3 successful refreshes with the one refresh token", s)
	}
}
