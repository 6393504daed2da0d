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

// The behaviour suite runs on miniredis and again on a real redis-server.
var suite = []struct {
	name string
	run  func(*testing.T, backend)
}{
	{"SeedAndServe", testSeedAndServe},
	{"RotationOneRefreshAcrossManagers", testRotationOneRefresh},
	{"SingleFlightInProcess", testSingleFlight},
	{"FencedWriteRefusesStaleVersion", testFencedWrite},
	{"LeaseLostDuringCallStillFenced", testLeaseLost},
	{"InvalidGrantRecheckedAgainstRedis", testInvalidGrantRecheck},
	{"DeadGrantFailsFast", testDeadGrantFailsFast},
	{"DroppedResponseRecoveredWithinLeeway", testDroppedResponseAtlassian},
	{"DroppedResponseStrictNeedsReconsent", testDroppedResponseStrict},
	{"CrashedHolderIntentRecovered", testCrashedHolderIntent},
	{"RedisOutageServesCacheThenFailsClearly", testRedisOutage},
	{"RedisRefusesWriteHeldAndRetried", testPendingWrite},
	{"LostRecordRestoredNeverOlder", testRestore},
	{"NonRotatingKeepsRefreshToken", testNonRotating},
	{"UnauthorizedNewerVersionRetried", testUnauthorizedNewerVersion},
	{"UnauthorizedSameVersionRefreshesOnce", testUnauthorizedSameVersion},
	{"VersionPollWhenNoSubscription", testVersionPoll},
	{"TransientErrorBacksOffFleetWide", testTransientBackoff},
	{"ConfigErrorBacksOffFleetWide", testConfigErrorBackoff},
	{"CallersNeverGetTheRefreshToken", testNoRefreshTokenToCallers},
	{"TokenSourceWithNewClientFollowsRotation", testTokenSourceNewClient},
	{"CloseWritesHeldPair", testCloseWritesHeldPair},
	{"StatusShowsRefreshingAndLastHour", testStatusRefreshingAndLastHour},
}

func TestMiniredis(t *testing.T) {
	for _, tc := range suite {
		t.Run(tc.name, func(t *testing.T) { tc.run(t, miniredisBackend) })
	}
}

func TestRealRedis(t *testing.T) {
	for _, tc := range suite {
		t.Run(tc.name, func(t *testing.T) { tc.run(t, realBackend) })
	}
}

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

// Invariant 1, at the store: a write fenced on a version that moved on is
// refused, and the version rises by exactly one per rotation.
func testFencedWrite(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	m := e.manager(Strict, nil)
	e.seed(m)
	k := grantKeys(m.opts.KeyPrefix, e.grant)
	a := &record{Status: StatusOK, AccessToken: "A-access", RefreshToken: "A-refresh", TokenType: "Bearer", Expiry: e.clock.Now().Add(time.Hour)}
	bb := &record{Status: StatusOK, AccessToken: "B-access", RefreshToken: "B-refresh", TokenType: "Bearer", Expiry: e.clock.Now().Add(time.Hour)}
	res, v, _, err := m.store.rotate(t.Context(), e.grant, k, 1, a)
	if err != nil || res != casWritten || v != 2 {
		t.Fatalf("first write: %v %d %v, want written at 2", res, v, err)
	}
	res, v, _, err = m.store.rotate(t.Context(), e.grant, k, 1, bb)
	if err != nil || res != casConflict || v != 2 {
		t.Fatalf("stale write: %v %d %v, want a conflict at 2", res, v, err)
	}
	rec, err := m.store.read(t.Context(), e.grant, k)
	if err != nil {
		t.Fatal(err)
	}
	if rec.V != 2 || rec.AccessToken != "A-access" || rec.RefreshCount != 1 {
		t.Errorf("stored v=%d refresh_count=%d, first writer's pair=%v; want 2, 1, true", rec.V, rec.RefreshCount, rec.AccessToken == "A-access")
	}
	if n, _ := m.opts.Redis.Exists(t.Context(), k.intent).Result(); n != 0 {
		t.Errorf("the fenced write left the intent behind")
	}
}

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
	a.opts.IdPTransport = ht

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

// Invariant 5: invalid_grant is re-checked against Redis before the grant is
// declared dead.
func testInvalidGrantRecheck(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.GraceOkta)
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
		next := &record{Status: StatusOK, AccessToken: secret(fresh.AccessToken), RefreshToken: secret(fresh.RefreshToken), TokenType: "Bearer", Expiry: fresh.Expiry, RotatedAt: e.clock.Now()}
		if res, _, _, err := other.store.rotate(context.Background(), e.grant, k, 1, next); err != nil || res != casWritten {
			t.Errorf("foreign write: %v %v", res, err)
		}
		e.clock.Advance(time.Minute) // outside the 30s grace period
	}
	m.opts.IdPTransport = ht
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
	if _, ok, err := m.store.beginRefresh(t.Context(), k, 1, "crashed-pod", e.clock.Now(), time.Hour); err != nil || !ok {
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

// Invariant 4: Redis loses the record; a process holding the newest pair
// restores it, and an older pair never wins.
func testRestore(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	old := e.manager(Strict, func(o *Options) { o.noSubscribe = true; o.PollInterval = time.Hour })
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
	if _, err := old.readOrRestore(t.Context(), old.lookup(e.grant)); err != nil {
		t.Fatal(err)
	}
	// ...then the newer one: its pair must win.
	if _, err := newer.readOrRestore(t.Context(), newer.lookup(e.grant)); err != nil {
		t.Fatal(err)
	}
	// And the older one cannot put v1 back.
	if _, err := old.readOrRestore(t.Context(), old.lookup(e.grant)); err != nil {
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

// Invariant 5: a request that met a 401 because the fleet rotated is retried
// once with the newer version, with no refresh of its own.
func testUnauthorizedNewerVersion(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	rotator := e.manager(Strict, nil)
	worker := e.manager(Strict, func(o *Options) { o.noSubscribe = true; o.PollInterval = time.Hour })
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

// Invariant 7 fallback: with no subscription, a rotation is noticed by the
// version poll.
func testVersionPoll(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	rotator := e.manager(Strict, nil)
	worker := e.manager(Strict, func(o *Options) { o.noSubscribe = true; o.PollInterval = 20 * time.Millisecond })
	e.seed(rotator)
	if _, err := worker.Token(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	if _, err := rotator.Rotate(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the poll to pick up version 2", func() bool {
		e := worker.lookup("jira-prod").entry.Load()
		return e != nil && e.v == 2
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
