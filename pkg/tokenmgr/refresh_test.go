package tokenmgr

import (
	"context"
	"errors"
	"strconv"
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

	// The older process restores first (it still holds v1)... The tokens
	// stay fresh: an expired one would have newer refresh in the background
	// when it hears of the restored v1, racing the checks below.
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
	// restore.lua holds the line too, for a restore decided on a read from
	// before the newer record landed: neither an older version of the
	// family nor any version of an older family replaces it.
	for _, rec := range []*record{
		{V: 1, Family: st.Family},
		{V: 9, Family: "1." + strings.Repeat("0", 32)},
	} {
		rec.Status, rec.AccessToken, rec.RefreshToken, rec.Expiry = StatusOK, "stale-a", "stale-r", e.clock.Now().Add(time.Hour)
		if written, err := old.store.restore(t.Context(), e.grant, k, rec); err != nil || written {
			t.Errorf("restore.lua put v%d of family %s over v2 of %s (written=%v, err=%v)", rec.V, rec.Family, st.Family, written, err)
		}
	}
	if after := e.status(newer); after.Version != 2 || after.Family != st.Family {
		t.Errorf("stored v%d of %s after the stale restores, want v2 of %s", after.Version, after.Family, st.Family)
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

// crashedAttempt plays a holder that recorded its intent for version 1,
// spent the refresh token at the provider and never wrote the answer,
// which it returns.
func crashedAttempt(t *testing.T, e *env, m *Manager, holder string, spent *oauth2.Token) *oauth2.Token {
	t.Helper()
	k := grantKeys(m.opts.KeyPrefix, e.grant)
	if _, ok, err := m.store.beginRefresh(t.Context(), k, 1, e.status(m).Family, holder, e.clock.Now(), time.Hour); err != nil || !ok {
		t.Fatalf("intent: %v %v", ok, err)
	}
	cfg := e.idp.OAuthConfig(oauth2.AuthStyleInHeader)
	answer, err := cfg.TokenSource(t.Context(), &oauth2Token{RefreshToken: spent.RefreshToken}).Token()
	if err != nil {
		t.Fatal(err)
	}
	return answer
}

// Invariant 10: a strict provider's refresh token that another holder may
// have spent is never presented again; after waiting for that holder's
// write the grant is marked for re-consent as an answer lost, naming the
// holder, without a provider call. The mark keeps the version, so the
// holder's late write revives the grant.
func testStrictLostAnswerNotReplayed(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	m := e.manager(Strict, nil)
	seeded := e.seed(m)
	e.clock.Advance(55 * time.Minute)
	answer := crashedAttempt(t, e, m, "gone-pod", seeded)
	e.clock.Advance(10 * time.Minute) // the token expired; the holder's time to write ran out
	before := e.idp.Stats()
	_, err := m.Token(t.Context(), e.grant)
	var dead *ReauthRequiredError
	if !errors.As(err, &dead) || !strings.Contains(dead.Reason, "gone-pod") || !strings.Contains(dead.Reason, "not presented again") {
		t.Fatalf("Token = %v, want a re-consent error naming gone-pod and the lost answer", err)
	}
	after := e.idp.Stats()
	if n := after.RefreshOK + after.RefreshFailed - before.RefreshOK - before.RefreshFailed; n != 0 || after.ReuseDetected != 0 || after.FamiliesRevoked != 0 {
		t.Errorf("%d provider calls after the lost answer, %d reuse, %d families revoked; want none", n, after.ReuseDetected, after.FamiliesRevoked)
	}
	if m.Stats().AnswersLost != 1 {
		t.Errorf("AnswersLost = %d, want 1", m.Stats().AnswersLost)
	}
	// The holder was alive after all and writes its answer.
	rec := &record{Family: e.status(m).Family, Status: StatusOK, AccessToken: secret(answer.AccessToken), RefreshToken: secret(answer.RefreshToken),
		TokenType: "Bearer", Expiry: e.clock.Now().Add(time.Hour), RotatedAt: e.clock.Now(), RotatedBy: "gone-pod"}
	if res, _, _, err := m.store.rotate(t.Context(), e.grant, grantKeys("tm", e.grant), 1, rec); err != nil || res != casWritten {
		t.Fatalf("the late write: %v %v", res, err)
	}
	eventually(t, "the revived grant", func() bool {
		tok, err := m.Token(t.Context(), e.grant)
		return err == nil && tok.AccessToken == answer.AccessToken
	})
}

// Invariant 10: while the earlier holder may still write its answer, the
// successor waits for it instead of presenting the token again.
func testStrictWaitsForHeldAnswer(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	m := e.manager(Strict, nil)
	seeded := e.seed(m)
	e.clock.Advance(time.Hour)
	answer := crashedAttempt(t, e, m, "slow-pod", seeded)
	written := make(chan struct{})
	defer func() { <-written }()
	go func() {
		defer close(written)
		time.Sleep(300 * time.Millisecond) // the other holder gets its write through
		rec := &record{Family: e.status(m).Family, Status: StatusOK, AccessToken: secret(answer.AccessToken), RefreshToken: secret(answer.RefreshToken),
			TokenType: "Bearer", Expiry: e.clock.Now().Add(time.Hour), RotatedAt: e.clock.Now()}
		if _, _, _, err := m.store.rotate(context.Background(), e.grant, grantKeys("tm", e.grant), 1, rec); err != nil {
			t.Errorf("the held write: %v", err)
		}
	}()
	tok, err := m.Token(t.Context(), e.grant)
	if err != nil || tok.AccessToken != answer.AccessToken {
		t.Fatalf("Token = %v, want the earlier holder's answer", err)
	}
	if s := e.idp.Stats(); s.RefreshOK != 1 || s.ReuseDetected != 0 || m.Stats().Refreshes != 0 {
		t.Errorf("IdP %+v, successor refreshes %d: want only the earlier holder's call", s, m.Stats().Refreshes)
	}
}

// Invariant 10: with a reuse leeway, a token in doubt is replayed only
// while the leeway covers a whole call; later it is marked, not presented.
func testLeewayReplayNeedsACallToSpare(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Atlassian)
	m := e.manager(Atlassian, nil)
	seeded := e.seed(m)
	e.clock.Advance(55 * time.Minute)
	crashedAttempt(t, e, m, "gone-pod", seeded)
	// One second of the 10-minute leeway left: less than the 2 s timeout.
	e.clock.Advance(10*time.Minute - time.Second)
	before := e.idp.Stats()
	_, err := m.Token(t.Context(), e.grant)
	var dead *ReauthRequiredError
	if !errors.As(err, &dead) || !strings.Contains(dead.Reason, "leeway has passed") {
		t.Fatalf("Token = %v, want a re-consent error: the leeway no longer covers a call", err)
	}
	if after := e.idp.Stats(); after.RefreshOK+after.RefreshFailed != before.RefreshOK+before.RefreshFailed {
		t.Errorf("the token was presented again at the edge of the leeway")
	}
}

// Invariant 9: a record that goes back in time (a failover to a replica
// that missed the last rotation) is repaired from the newest pair a
// process holds, never obeyed: its spent refresh token is not presented.
func testRollbackRepaired(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	m := e.manager(Strict, nil)
	e.seed(m)
	k := grantKeys("tm", e.grant)
	if _, err := m.Rotate(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	v2 := e.snapshot(k)
	if _, err := m.Rotate(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	served, err := m.Token(t.Context(), e.grant)
	if err != nil {
		t.Fatal(err)
	}
	// The failover: the record is back at version 2, whose refresh token
	// the provider already retired.
	e.rollBack(k, v2)
	m.pollOnce(nil) // as after the subscription comes back
	e.clock.Advance(time.Hour)
	tok, err := m.Token(t.Context(), e.grant)
	if err != nil {
		t.Fatalf("Token after the rollback: %v", err)
	}
	if s := e.idp.Stats(); s.ReuseDetected != 0 || s.FamiliesRevoked != 0 {
		t.Fatalf("the rolled-back refresh token was presented: %+v", s)
	}
	if !e.idp.AccessTokenValid(tok.AccessToken) || tok.AccessToken == served.AccessToken {
		t.Errorf("after the repair the fleet did not rotate from version 3")
	}
	if m.Stats().RollbacksRepaired != 1 {
		t.Errorf("RollbacksRepaired = %d, want 1", m.Stats().RollbacksRepaired)
	}
	if st := e.status(m); st.Version != 4 {
		t.Errorf("stored version %d, want 4 (3 repaired, then rotated)", st.Version)
	}
}

// Invariants 9 and 10 together: after a failover rolled the record back
// two versions, a process with no memory of the newer ones spent the
// rolled-back refresh token, the strict provider revoked the family and the
// grant was marked dead at a version below the one the holder still has.
// The holder's newer pair is of that revoked family: it must not be
// restored over the mark (status flapping back to ok, then one more refused
// call), and the holder fails fast.
func testDeadMarkStandsAfterRollback(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	holder := e.manager(Strict, nil)
	e.seed(holder)
	k := grantKeys("tm", e.grant)
	if _, err := holder.Rotate(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	v2 := e.snapshot(k)
	for range 2 {
		if _, err := holder.Rotate(t.Context(), e.grant); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := holder.Token(t.Context(), e.grant); err != nil { // holds v4
		t.Fatal(err)
	}
	e.rollBack(k, v2)
	fresh := e.manager(Strict, nil) // started after the failover
	if _, err := fresh.Rotate(t.Context(), e.grant); !errors.Is(err, ErrReauthRequired) {
		t.Fatalf("the rolled-back token was not refused: %v", err)
	}
	marked := e.status(fresh)
	if marked.Status != StatusReauthRequired || marked.Version != 3 {
		t.Fatalf("stored %s at v%d, want reauth_required at v3", marked.Status, marked.Version)
	}
	calls := e.idp.Stats().RefreshOK + e.idp.Stats().RefreshFailed
	holder.pollOnce(nil)
	e.clock.Advance(time.Hour)
	if _, err := holder.Token(t.Context(), e.grant); !errors.Is(err, ErrReauthRequired) {
		t.Errorf("the holder's Token = %v, want the dead mark", err)
	}
	if n := holder.Stats().RollbacksRepaired; n != 0 {
		t.Errorf("the holder restored its pair of the revoked family over the dead mark (%d repairs)", n)
	}
	if st := e.status(holder); st.Status != StatusReauthRequired || st.Version != 3 {
		t.Errorf("stored %s at v%d after the holder looked, want the mark at v3 to stand", st.Status, st.Version)
	}
	if after := e.idp.Stats().RefreshOK + e.idp.Stats().RefreshFailed; after != calls {
		t.Errorf("%d provider calls after the dead mark", after-calls)
	}
	// The script holds the line too, for a restore decided on a read from
	// before the mark landed.
	v4 := &record{V: 4, Family: marked.Family, Status: StatusOK, AccessToken: "a4", RefreshToken: "r4", Expiry: e.clock.Now().Add(time.Hour)}
	if written, err := holder.store.restore(t.Context(), e.grant, k, v4); err != nil || written {
		t.Errorf("restore.lua put a pair of the refused family over the dead mark (written=%v, err=%v)", written, err)
	}
}

// Invariant 9: a Manager never installs a version older than one it served.
func TestInstallIsMonotonic(t *testing.T) {
	e := newEnv(t, miniredisBackend, tokenmgrtest.Strict)
	m := e.manager(Strict, nil)
	e.seed(m)
	g, _ := m.state(e.grant)
	newer := &record{V: 5, Family: e.status(m).Family, Status: StatusOK, AccessToken: "v5", Expiry: e.clock.Now().Add(time.Hour)}
	older := &record{V: 4, Family: newer.Family, Status: StatusOK, AccessToken: "v4", Expiry: e.clock.Now().Add(time.Hour)}
	m.install(g, newer)
	if e := m.install(g, older); e.v != 5 || e.tok.AccessToken != "v5" {
		t.Errorf("installing version 4 after 5 served version %d", e.v)
	}
	if tok, _ := m.Token(t.Context(), e.grant); tok.AccessToken != "v5" {
		t.Errorf("Token serves an older version than one served")
	}
	if m.Stats().OlderRefused != 1 {
		t.Errorf("OlderRefused = %d, want 1", m.Stats().OlderRefused)
	}
	// A later family is newer whatever its version.
	next := &record{V: 1, Family: strconv.FormatInt(familyEpoch(newer.Family)+1, 10) + ".ab", Status: StatusOK, AccessToken: "f2", Expiry: e.clock.Now().Add(time.Hour)}
	if e := m.install(g, next); e.tok.AccessToken != "f2" {
		t.Errorf("a re-seeded family was refused")
	}
}

// Invariant 12: expires_in counts from when the request left, so a slow
// answer does not make the Manager serve a token past its real expiry.
func testExpiryAnchoredAtSend(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	m := e.manager(Strict, func(o *Options) {
		o.IdPTransport = &afterTransport{after: func() { e.clock.Advance(1500 * time.Millisecond) }}
	})
	e.seed(m)
	e.clock.Advance(time.Hour)
	sent := e.clock.Now()
	if _, err := m.Token(t.Context(), e.grant); err != nil {
		t.Fatal(err)
	}
	// The fake IdP issued an hour's token when the request arrived.
	if st := e.status(m); st.Expiry.After(sent.Add(time.Hour)) {
		t.Errorf("expiry %s after the provider's %s: counted from the answer", st.Expiry.Sub(sent), time.Hour)
	}
}
