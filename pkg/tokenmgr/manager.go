package tokenmgr

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-redsync/redsync/v4"
	redsyncredis "github.com/go-redsync/redsync/v4/redis"
	"github.com/go-redsync/redsync/v4/redis/goredis/v9"
	"github.com/redis/go-redis/v9"
	"golang.org/x/oauth2"
)

// Manager hands out access tokens of OAuth 2.0 grants stored in Redis, and
// refreshes them so that a whole fleet of Managers sharing one Redis makes
// exactly one provider call per rotation. It is safe for concurrent use.
//
// Each process (pod) should have one Manager, shared by all its goroutines.
// Close it when done.
type Manager struct {
	// Admin holds the defaulted options, the logger and the store (opts,
	// log, store are its fields), and gives Status, Grants, DueGrants and
	// Postpone; Seed is overridden below.
	*Admin

	locks *redsync.Redsync
	oauth *oauth2.Config

	// warnedUncounted: the "rotation not counted" warning (old ACL) is
	// logged once per Manager, not per rotation.
	warnedUncounted atomic.Bool

	// grants maps a grant name to its state. Copy-on-write: the hot path
	// loads the map without a lock; grantsMu serialises writers.
	grants   atomic.Pointer[map[string]*grant]
	grantsMu sync.Mutex

	base   context.Context // lives until Close; background work runs under it
	cancel context.CancelFunc
	wg     sync.WaitGroup // background goroutines
	bgMu   sync.Mutex     // guards closed against wg.Add racing Close's wg.Wait
	closed bool

	subUp atomic.Bool // the rotation subscription is live
	stats counters
}

// grant is the in-process state of one grant.
type grant struct {
	name string
	keys keys

	// entry is what the hot path reads: one atomic load. nil means "ask
	// Redis" (never loaded, or dropped by a rotation message).
	entry atomic.Pointer[entry]
	// bgRefresh is set while a background refresh runs, so the hot path
	// starts at most one.
	bgRefresh atomic.Bool
	// bgNotBefore (unix nanos) holds back background refreshes after a
	// failure, so a Redis or provider outage does not start one per call.
	bgNotBefore atomic.Int64
	// announced is the version last announced by a rotation message or a
	// poll. A flight that read Redis before the announcement and
	// installed an older version runs again.
	announced atomic.Int64
	// flushMu serialises writes of the pending pair (flusher, Close, sync).
	flushMu sync.Mutex
	// reportedV is the last version given to Options.OnVersion.
	reportedV atomic.Int64

	mu sync.Mutex // guards the fields below
	// flight is the load or refresh in progress, shared by every caller in
	// this process (single-flight).
	flight *flight
	// changed is closed and replaced when a rotation message for this grant
	// arrives; waiters for another holder's refresh select on it.
	changed chan struct{}
	// newest is the newest record this process has seen or written,
	// refresh token included: what it restores if Redis loses the record.
	newest *record
	// pending is a rotated pair the provider gave us that Redis has not
	// accepted yet (invariant 4: held and retried, never dropped).
	pending *pendingWrite
}

// entry is an immutable snapshot of a usable (or dead) grant.
type entry struct {
	tok    *oauth2.Token // shared with callers, who must not modify it
	v      int64
	softAt time.Time // after this, refresh in the background and keep serving
	hardAt time.Time // after this, the token is not served: wait for a new one
	err    error     // non-nil: the grant is dead; returned at once
}

type flight struct {
	done chan struct{}
	e    *entry
	err  error
}

type pendingWrite struct {
	fromV   int64
	rec     *record
	written bool // guarded by grant.flushMu
}

// New builds a Manager and starts its rotation subscription. ctx bounds
// nothing but the construction; the Manager's background work lives until
// Close.
func New(ctx context.Context, opts Options) (*Manager, error) {
	o, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	sealer := o.Sealer
	if sealer == nil {
		sealer = plaintext{}
		o.Logger.Error("tokenmgr: no Sealer configured: tokens are stored in Redis UNENCRYPTED")
	}
	lockClients := o.LockRedis
	if len(lockClients) == 0 {
		lockClients = []redis.UniversalClient{o.Redis}
	}
	pools := make([]redsyncredis.Pool, len(lockClients))
	for i, c := range lockClients {
		pools[i] = goredis.NewPool(c)
	}
	cfg := *o.OAuth2 // our own copy: the caller may reuse theirs
	o.Sealer = sealer
	m := &Manager{
		Admin: newAdmin(o),
		locks: redsync.New(pools...),
		oauth: &cfg,
	}
	empty := map[string]*grant{}
	m.grants.Store(&empty)
	m.base, m.cancel = context.WithCancel(context.WithoutCancel(ctx))
	m.startSubscription()
	return m, nil
}

// Close stops background work. A rotated pair that Redis has not accepted
// yet is written one last time within ctx; if that fails too it is lost,
// and Close says so in its error.
func (m *Manager) Close(ctx context.Context) error {
	m.bgMu.Lock()
	m.closed = true
	m.bgMu.Unlock()
	m.cancel()
	// In-flight provider calls and their writes run to completion (they
	// are not cancelled by Close); wait for them, then write what Redis
	// refused meanwhile.
	m.wg.Wait()
	var errs []error
	for _, g := range m.allGrants() {
		if p := g.pendingWrite(); p != nil {
			if err := m.flushPending(ctx, g, p); err != nil {
				errs = append(errs, fmt.Errorf("tokenmgr: grant %q: rotated pair from version %d could not be written to Redis and is lost: %w", g.name, p.fromV, err))
			}
		}
	}
	return errors.Join(errs...)
}

// goBackground runs fn in a goroutine that Close waits for; false after Close.
func (m *Manager) goBackground(fn func()) bool {
	m.bgMu.Lock()
	defer m.bgMu.Unlock()
	if m.closed {
		return false
	}
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		fn()
	}()
	return true
}

// Token returns a valid access token for grant. On a fresh cached token it
// is an atomic load and a clock read: no Redis round trip, no lock, no
// allocation. The returned token is shared and must not be modified.
//
// Errors: *ReauthRequiredError (ErrReauthRequired) for a dead grant, at once;
// *NotFoundError (ErrGrantNotFound); *RefreshError when the provider failed
// transiently and no valid token is left; *StoreError (ErrStoreUnavailable)
// when Redis is unreachable and the cached token has expired; ctx.Err().
func (m *Manager) Token(ctx context.Context, grantName string) (*oauth2.Token, error) {
	e, err := m.current(ctx, grantName)
	if err != nil {
		return nil, err
	}
	return e.tok, nil
}

// current is Token with the version, for the 401 rule.
func (m *Manager) current(ctx context.Context, grantName string) (*entry, error) {
	g := m.lookup(grantName)
	if g == nil {
		var err error
		if g, err = m.addGrant(grantName); err != nil {
			return nil, err
		}
	}
	if e := g.entry.Load(); e != nil {
		if e.err != nil {
			return nil, e.err
		}
		now := m.opts.Now()
		if now.Before(e.softAt) {
			return e, nil
		}
		if now.Before(e.hardAt) {
			m.refreshInBackground(g, now)
			return e, nil
		}
	}
	return m.obtain(ctx, g, need{})
}

func (m *Manager) lookup(name string) *grant {
	return (*m.grants.Load())[name]
}

func (m *Manager) addGrant(name string) (*grant, error) {
	if err := ValidateGrantName(name); err != nil {
		return nil, err
	}
	m.grantsMu.Lock()
	defer m.grantsMu.Unlock()
	old := *m.grants.Load()
	if g := old[name]; g != nil {
		return g, nil
	}
	g := &grant{name: name, keys: grantKeys(m.opts.KeyPrefix, name), changed: make(chan struct{})}
	next := make(map[string]*grant, len(old)+1)
	for k, v := range old {
		next[k] = v
	}
	next[name] = g
	m.grants.Store(&next)
	return g, nil
}

func (m *Manager) allGrants() []*grant {
	mp := *m.grants.Load()
	out := make([]*grant, 0, len(mp))
	for _, g := range mp {
		out = append(out, g)
	}
	return out
}

// need says what a caller of obtain wants.
type need struct {
	// staleV, when non-zero, is a version the caller saw rejected with a
	// 401: it wants a newer one (invariant 5).
	staleV int64
	// refreshDue asks to refresh a token that is still usable but past its
	// refresh time (the background refresh).
	refreshDue bool
	// force skips MinForcedRefreshAge (an operator's Rotate).
	force bool
}

func (m *Manager) satisfies(e *entry, n need) bool {
	if e == nil {
		return false
	}
	if e.err != nil {
		return true
	}
	if n.staleV != 0 && e.v == n.staleV {
		return false
	}
	return m.opts.Now().Before(e.hardAt)
}

// obtain joins or starts the grant's flight and waits for a usable entry.
// The flight runs under the Manager's context, not the caller's: a caller
// that gives up does not abort a refresh whose response must not be lost.
func (m *Manager) obtain(ctx context.Context, g *grant, n need) (*entry, error) {
	for attempt := 0; ; attempt++ {
		g.mu.Lock()
		f := g.flight
		if f == nil {
			f = &flight{done: make(chan struct{})}
			if !m.goBackground(func() { m.fly(g, f, n) }) {
				g.mu.Unlock()
				return nil, ErrClosed
			}
			g.flight = f
		}
		g.mu.Unlock()
		select {
		case <-f.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if f.err != nil {
			return nil, f.err
		}
		if m.satisfies(f.e, n) || attempt > 0 {
			// A second flight that still does not satisfy the caller
			// (e.g. a forced refresh held back by MinForcedRefreshAge)
			// returns what there is rather than loop.
			if f.e.err != nil {
				return nil, f.e.err
			}
			return f.e, nil
		}
	}
}

func (m *Manager) fly(g *grant, f *flight, n need) {
	ctx, cancel := context.WithTimeout(m.base, m.opts.WaitTimeout)
	defer cancel()
	f.e, f.err = m.sync(ctx, g, n)
	for range 3 {
		// A rotation announced while this flight was reading: what it
		// installed may already be superseded (and revoked).
		if f.err != nil || f.e == nil || f.e.err != nil || f.e.v >= g.announced.Load() {
			break
		}
		f.e, f.err = m.sync(ctx, g, need{})
	}
	if errors.Is(f.err, context.Canceled) && m.base.Err() != nil {
		f.err = ErrClosed
	}
	g.mu.Lock()
	g.flight = nil
	g.mu.Unlock()
	close(f.done)
}

// refreshInBackground starts one refresh of a token that is due but still
// usable; callers keep getting the current token meanwhile.
func (m *Manager) refreshInBackground(g *grant, now time.Time) {
	if now.UnixNano() < g.bgNotBefore.Load() || !g.bgRefresh.CompareAndSwap(false, true) {
		return
	}
	started := m.goBackground(func() {
		defer g.bgRefresh.Store(false)
		if _, err := m.obtain(m.base, g, need{refreshDue: true}); err != nil {
			wait := time.Second
			var re *RefreshError
			if errors.As(err, &re) && re.RetryAfter > wait {
				wait = re.RetryAfter
			}
			g.bgNotBefore.Store(m.opts.Now().Add(wait).UnixNano())
			if !errors.Is(err, ErrClosed) && !errors.Is(err, context.Canceled) {
				m.log.Warn("background refresh failed; serving the current token until it expires", "grant", g.name, "err", err)
			}
		}
	})
	if !started {
		g.bgRefresh.Store(false)
	}
}

// install publishes rec as the grant's entry and returns it.
func (m *Manager) install(g *grant, rec *record) *entry {
	g.mu.Lock()
	if g.newest == nil || rec.V >= g.newest.V {
		g.newest = rec
	}
	g.mu.Unlock()
	e := &entry{v: rec.V}
	if rec.Status == StatusReauthRequired {
		e.err = &ReauthRequiredError{Grant: g.name, Reason: rec.Reason}
	} else {
		e.tok = rec.token()
		// Callers get the access token only: with the refresh token, a
		// caller's own oauth2.Config.TokenSource would refresh outside
		// the lease, and a logged token would leak it.
		e.tok.RefreshToken = ""
		e.softAt, e.hardAt = m.deadlines(rec, true)
	}
	g.entry.Store(e)
	if m.opts.OnVersion != nil && g.reportedV.Swap(e.v) != e.v {
		m.opts.OnVersion(g.name, e.v)
	}
	return e
}

// deadlines returns when rec's token is due for refresh and when it stops
// being served. The refresh margin is RefreshBefore, capped at
// MaxRefreshFraction of the token's lifetime. With jitter, each Manager
// picks its soft deadline in the later half of the margin, so a fleet does
// not rush the lease at one instant: the first one refreshes and the
// others hear the rotation before their turn.
func (m *Manager) deadlines(rec *record, jitter bool) (soft, hard time.Time) {
	if rec.Expiry.IsZero() {
		far := time.Unix(1<<40, 0)
		return far, far
	}
	margin := m.margin(rec)
	skew := min(10*time.Second, margin/4)
	hard = rec.Expiry.Add(-skew)
	if jitter {
		margin = time.Duration(float64(margin) * (0.5 + 0.5*rand.Float64()))
	}
	soft = rec.Expiry.Add(-margin)
	return soft, hard
}

func (m *Manager) margin(rec *record) time.Duration {
	margin := m.opts.RefreshBefore
	if !rec.RotatedAt.IsZero() {
		if life := rec.Expiry.Sub(rec.RotatedAt); life > 0 {
			margin = min(margin, time.Duration(float64(life)*m.opts.MaxRefreshFraction))
		}
	}
	return margin
}

// due reports whether rec should be refreshed now (full margin, no jitter).
func (m *Manager) due(rec *record, now time.Time) bool {
	soft, _ := m.deadlines(rec, false)
	return !now.Before(soft)
}

func (m *Manager) usable(rec *record, now time.Time) bool {
	_, hard := m.deadlines(rec, false)
	return rec.Status == StatusOK && now.Before(hard)
}

// Logger is the Manager's logger (with its component and holder).
func (m *Manager) Logger() *slog.Logger { return m.log }

// Holder is the name this Manager writes in intents and rotated_by.
func (m *Manager) Holder() string { return m.opts.Holder }

// Stats returns the Manager's counters since it was built.
func (m *Manager) Stats() Stats { return m.stats.snapshot() }
