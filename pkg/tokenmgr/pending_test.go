package tokenmgr

import (
	"context"
	"errors"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
	"golang.org/x/oauth2"
)

// Invariant 4: Redis refuses the write of a rotated pair; the pair is held,
// served, and written once Redis is back.
func testPendingWrite(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	m := e.manager(Strict, nil)
	e.seed(m)
	ht := &hookTransport{before: func(*hookTransport) { e.down.Store(true) }}
	setIdPTransport(t, m, ht)
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

// heldPairScene is a seeded grant on miniredis, another Manager of it,
// and lock servers for heldPair's process.
func heldPairScene(t *testing.T) (e *env, other *Manager, locks func() redis.UniversalClient) {
	t.Helper()
	e = newEnv(t, miniredisBackend, tokenmgrtest.Strict)
	locks = e.lockServer()
	other = e.manager(Strict, nil)
	e.seed(other)
	return e, other, locks
}

// heldPair makes a hold a rotated pair that its Redis refuses: a refreshes
// through a store client that goes down once the provider has answered
// (its leases live on separate lock servers, which it still reaches).
func heldPair(t *testing.T, e *env, locks func() redis.UniversalClient) (a *Manager, aDown *atomic.Bool, tok *oauth2.Token) {
	t.Helper()
	return heldPairBy(t, e, locks, true, nil)
}

// heldPairBy is heldPair with a's subscription on or off and its options
// changed by mod.
func heldPairBy(t *testing.T, e *env, locks func() redis.UniversalClient, subscribe bool, mod func(*Options)) (a *Manager, aDown *atomic.Bool, tok *oauth2.Token) {
	t.Helper()
	aDown = new(atomic.Bool)
	a = e.newManager(Strict, func(o *Options) {
		o.Redis = e.clientDown(aDown)
		o.LockRedis = []redis.UniversalClient{locks()}
		o.IdPTransport = &afterTransport{after: func() { aDown.Store(true) }}
		if mod != nil {
			mod(o)
		}
	}, subscribe)
	e.clock.Advance(time.Hour)
	tok, err := a.Token(t.Context(), e.grant)
	if err != nil {
		t.Fatalf("A's refresh: %v", err)
	}
	if a.Stats().PendingWrites != 1 {
		t.Fatalf("A holds %d pairs, want 1", a.Stats().PendingWrites)
	}
	return a, aDown, tok
}

// Invariant 10: while a process holds a rotated pair Redis refused, it keeps
// the lease, so no successor takes over (and presents the spent token)
// while the only copy of the answer is in that process.
func testHeldPairKeepsLease(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	locks := e.lockServer()
	other := e.manager(Strict, func(o *Options) { o.LockRedis = []redis.UniversalClient{locks()} })
	e.seed(other)
	a, aDown, held := heldPair(t, e, locks)
	// Longer than a lease: without the keep-alive it would have run out.
	ctx, cancel := context.WithTimeout(t.Context(), a.opts.LeaseTTL+time.Second)
	defer cancel()
	if _, err := other.Token(ctx, e.grant); err == nil {
		t.Fatal("another process got a token while the only new pair was held elsewhere")
	}
	if n := other.Stats().Leases; n != 0 {
		t.Errorf("another process took the lease %d times while A held the answer", n)
	}
	aDown.Store(false)
	eventually(t, "the held pair to reach Redis", func() bool {
		tok, err := other.Token(t.Context(), e.grant)
		return err == nil && tok.AccessToken == held.AccessToken
	})
	if s := e.idp.Stats(); s.RefreshOK != 1 || s.ReuseDetected != 0 {
		t.Errorf("IdP %+v, want one refresh and no reuse", s)
	}
	_ = a
}

// Invariant 10: a dead mark (the provider refused the refresh token: its
// family may be revoked) takes a new version, so a pair held from before
// the mark never resurrects the grant.
func testDeadMarkFencesHeldPair(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	locks := e.lockServer()
	other := e.manager(Strict, nil)
	e.seed(other)
	a, aDown, _ := heldPair(t, e, locks)
	st := e.status(other)
	if _, err := other.store.markDead(t.Context(), e.grant, grantKeys("tm", e.grant), 1, st.Family, "provider rejected the refresh token: invalid_grant"); err != nil {
		t.Fatal(err)
	}
	aDown.Store(false)
	eventually(t, "A's held write to be refused", func() bool { return a.Stats().WriteConflicts == 1 })
	if st := e.status(other); st.Status != StatusReauthRequired || st.Version != 2 {
		t.Errorf("after A's held write: %s at version %d, want reauth_required at 2 (the mark's version)", st.Status, st.Version)
	}
	if _, err := a.Token(t.Context(), e.grant); !errors.Is(err, ErrReauthRequired) {
		t.Errorf("A serves %v, want the dead grant's error", err)
	}
}

// Invariant 9: a pair held from one token family never lands on the next
// one, even when the record was lost and the new family restarts at the
// same version.
func testHeldPairOfOldFamilyNeverLands(t *testing.T, b backend) {
	e := newEnv(t, b, tokenmgrtest.Strict)
	locks := e.lockServer()
	other := e.manager(Strict, nil)
	e.seed(other)
	a, aDown, _ := heldPair(t, e, locks)
	if err := e.client().Del(t.Context(), grantKeys("tm", e.grant).record).Err(); err != nil {
		t.Fatal(err)
	}
	fresh := e.idp.NewGrant("")
	if v, err := other.Seed(t.Context(), e.grant, fresh, SeedOptions{}); err != nil || v != 1 {
		t.Fatalf("seed after the loss: %d %v, want version 1", v, err)
	}
	aDown.Store(false)
	eventually(t, "A's held write to be refused", func() bool { return a.Stats().WriteConflicts == 1 })
	tok, err := a.Token(t.Context(), e.grant)
	if err != nil || tok.AccessToken != fresh.AccessToken {
		t.Errorf("A serves another pair than the new family's (%v)", err)
	}
	if st := e.status(other); st.Version != 1 || st.Restored {
		t.Errorf("stored version %d restored=%v, want the seeded 1", st.Version, st.Restored)
	}
}

// A refused held pair is withdrawn before the refusal is counted: no
// caller is served it while the stored record is read, and whoever sees
// WriteConflicts sees the stored record in place. (The count came first
// once, and a caller between the two got the old family's token.) A hears
// of the new seed neither by message nor by poll, so only the write's own
// outcome can replace what it serves.
func TestRefusedHeldPairWithdrawnBeforeCounted(t *testing.T) {
	e, other, locks := heldPairScene(t)
	gate := &readAfterRotateGate{blocked: make(chan struct{}), release: make(chan struct{})}
	a, aDown, held := heldPairBy(t, e, locks, false, func(o *Options) {
		o.PollInterval = time.Hour
		o.Redis.AddHook(gate)
	})
	if err := e.client().Del(t.Context(), grantKeys("tm", e.grant).record).Err(); err != nil {
		t.Fatal(err)
	}
	fresh := e.idp.NewGrant("")
	if _, err := other.Seed(t.Context(), e.grant, fresh, SeedOptions{}); err != nil {
		t.Fatal(err)
	}
	gate.armed.Store(true)
	aDown.Store(false)
	select {
	case <-gate.blocked: // the write was refused; its stored record is being read
	case <-time.After(10 * time.Second):
		t.Fatal("A's held write never reached Redis")
	}
	if tok, err := a.Token(t.Context(), e.grant); err == nil && tok.AccessToken == held.AccessToken {
		t.Error("A served its refused pair after Redis refused it")
	}
	if n := a.Stats().WriteConflicts; n != 0 {
		t.Errorf("WriteConflicts = %d before the stored record was in place", n)
	}
	close(gate.release)
	eventually(t, "A's held write to be counted as refused", func() bool { return a.Stats().WriteConflicts == 1 })
	if tok, err := a.Token(t.Context(), e.grant); err != nil || tok.AccessToken != fresh.AccessToken {
		t.Errorf("A serves another pair than the new family's (%v)", err)
	}
}

// Invariant 4 when a second fault comes during the recovery: Redis lost
// the record while A held its rotated pair, and the restore then fails
// too. The pair stays held, with its lease, and is restored at the next
// attempt. (It was counted as written before the restore, so a failed
// restore dropped the only copy of the new refresh token.)
func TestHeldPairKeptWhenItsRestoreFails(t *testing.T) {
	e, other, locks := heldPairScene(t)
	fail := &failFirstScript{script: restoreScript}
	a, aDown, held := heldPairBy(t, e, locks, true, func(o *Options) { o.Redis.AddHook(fail) })
	k := grantKeys("tm", e.grant)
	if err := e.client().Del(t.Context(), k.record, k.pair).Err(); err != nil {
		t.Fatal(err)
	}
	fail.armed.Store(true)
	aDown.Store(false)
	eventually(t, "the restore to fail once", func() bool { return fail.failed.Load() })
	eventually(t, "the held pair restored", func() bool {
		tok, err := other.Token(t.Context(), e.grant)
		return err == nil && tok.AccessToken == held.AccessToken
	})
	if st := e.status(other); st.Version != 2 || !st.Restored {
		t.Errorf("stored v%d restored=%v, want A's pair restored at v2", st.Version, st.Restored)
	}
	eventually(t, "A to count its restore", func() bool { return a.Stats().Restores == 1 })
	if s := e.idp.Stats(); s.RefreshOK != 1 || s.ReuseDetected != 0 {
		t.Errorf("IdP %+v, want one refresh and no reuse", s)
	}
}

// A held pair's record is read by other goroutines from the moment it is
// installed: its write installs a copy with the stored version and leaves
// the held one as it was (it was changed in place once, a data race with
// any install reading it; the race detector saw it in CI).
func TestHeldPairWrittenAsACopy(t *testing.T) {
	e, other, locks := heldPairScene(t)
	a, aDown, _ := heldPairBy(t, e, locks, true, func(o *Options) { o.PollInterval = time.Hour })
	g := a.lookup(e.grant)
	g.mu.Lock()
	installed := g.newest
	g.mu.Unlock()
	if installed == nil || g.heldPair() == nil || g.heldPair().rec != installed {
		t.Fatal("A does not serve its held pair")
	}
	aDown.Store(false)
	eventually(t, "the held pair written", func() bool {
		return a.Stats().PendingWrites == 1 && g.heldPair() == nil && e.status(other).Version == 2
	})
	eventually(t, "the written pair installed", func() bool {
		g.mu.Lock()
		defer g.mu.Unlock()
		return g.newest != nil && g.newest.V == 2 && g.newest != installed
	})
}

// failFirstScript fails the first run of script once armed, as a Redis
// that goes away between two commands.
type failFirstScript struct {
	script        *redis.Script
	armed, failed atomic.Bool
}

func (f *failFirstScript) DialHook(next redis.DialHook) redis.DialHook { return next }
func (f *failFirstScript) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if f.armed.Load() && runs(cmd, f.script) && f.failed.CompareAndSwap(false, true) {
			err := errors.New("injected: connection reset by peer")
			cmd.SetErr(err)
			return err
		}
		return next(ctx, cmd)
	}
}
func (f *failFirstScript) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// readAfterRotateGate holds the first record read that follows a rotate
// script, once armed, until release is closed.
type readAfterRotateGate struct {
	armed, rotated, held atomic.Bool
	blocked, release     chan struct{}
}

func runs(cmd redis.Cmder, s *redis.Script) bool {
	args := cmd.Args()
	return cmd.Name() == "evalsha" && len(args) > 1 && args[1] == s.Hash()
}

func (g *readAfterRotateGate) DialHook(next redis.DialHook) redis.DialHook { return next }
func (g *readAfterRotateGate) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if g.armed.Load() && runs(cmd, rotateScript) {
			g.rotated.Store(true)
		} else if g.rotated.Load() && runs(cmd, readScript) {
			if g.held.CompareAndSwap(false, true) { // the first only: later reads pass
				close(g.blocked)
				<-g.release
			}
		}
		return next(ctx, cmd)
	}
}
func (g *readAfterRotateGate) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// afterTransport runs after() once the IdP has answered a request.
type afterTransport struct{ after func() }

func (a *afterTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := http.DefaultTransport.RoundTrip(r)
	if a.after != nil {
		a.after()
	}
	return resp, err
}
