package tokenmgr

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/trace"
	"golang.org/x/oauth2"
)

// Manager hands out access tokens of OAuth 2.0 grants stored in Redis, and
// refreshes them so that a whole fleet of Managers sharing one Redis makes
// exactly one provider call per rotation. It is safe for concurrent use.
//
// Each process (pod) should have one Manager, shared by all its goroutines.
// Close it when done. Besides tokens, it has the operator methods of an
// Admin (Status, Seed, the schedule), and Rotate.
type Manager struct {
	core
	policy policy
	leases *leases
	oauth  *oauth2.Config
	// previous is the registration with Options.PreviousClientSecret (nil
	// without one).
	previous *oauth2.Config
	tracer   trace.Tracer

	// warnedUncounted: the "rotation not counted" warning (old ACL) is
	// logged once per Manager, not per rotation.
	warnedUncounted atomic.Bool

	// grants maps a grant name to its state. Copy-on-write: the hot path
	// loads the map without a lock; grantsMu serialises writers.
	grants   atomic.Pointer[map[string]*grantState]
	grantsMu sync.Mutex
	// lastGrant is the first grant looked up by name.
	lastGrant atomic.Pointer[grantState]

	base   context.Context // lives until Close; background work runs under it
	cancel context.CancelFunc
	wg     sync.WaitGroup // background goroutines
	bgMu   sync.Mutex     // guards closed against wg.Add racing Close's wg.Wait
	closed bool

	timed     bool        // Options.Clock is set: entries flip by timer, the hot path reads no clock
	subscribe bool        // receive rotation messages (tests turn it off to exercise the poll)
	subUp     atomic.Bool // the rotation subscription is live
	stats     counters

	refreshers refreshers // the live refreshers, as last read
	shards     shards     // the sharded subscriptions, one per server
}

// New builds a Manager and starts its rotation subscription. ctx bounds
// nothing but the construction; the Manager's background work lives until
// Close.
func New(ctx context.Context, opts Options) (*Manager, error) {
	return newManager(ctx, opts, true)
}

// newManager is New; subscribe false leaves rotations to the version poll.
func newManager(ctx context.Context, opts Options, subscribe bool) (*Manager, error) {
	o, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	if o.Sealer == nil { // AllowPlaintext: withDefaults refuses it otherwise
		o.Sealer = plaintext{}
		o.Logger.Error("tokenmgr: AllowPlaintext and no Sealer: tokens are stored in Redis UNENCRYPTED")
	}
	cfg := *o.OAuth2 // our own copy: the caller may reuse theirs
	m := &Manager{core: newCore(o), policy: newPolicy(o), oauth: &cfg, subscribe: subscribe, tracer: newTracer(o.TracerProvider), timed: o.Clock != nil}
	if o.PreviousClientSecret != "" {
		prev := cfg
		prev.ClientSecret = o.PreviousClientSecret
		m.previous = &prev
	}
	m.leases = newLeases(o, m.log, &m.stats)
	if d := m.store.durable; d != nil {
		logLate := d.late
		d.late = func(acked int64) { m.stats.replicaAckTimeouts.Add(1); logLate(acked) }
	}
	empty := map[string]*grantState{}
	m.grants.Store(&empty)
	m.base, m.cancel = context.WithCancel(context.WithoutCancel(ctx))
	m.chooseMessages(ctx)
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
		if p := g.heldPair(); p != nil {
			if err := m.flushHeld(ctx, g, p); err != nil {
				errs = append(errs, fmt.Errorf("tokenmgr: grant %q: rotated pair from version %d could not be written to Redis and is lost: %w", g.name, p.fromV, err))
				p.lease.release(ctx) // a successor finds the intent in doubt and decides
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
// is a few atomic loads: no Redis round trip, no lock, no allocation, and
// with a Clock (the default) no clock read. The returned token is shared
// and must not be modified.
//
// Errors: *ReauthRequiredError (ErrReauthRequired) for a dead grant, at once;
// *NotFoundError (ErrGrantNotFound); *RefreshError when the provider failed
// transiently and no valid token is left; *StoreError (ErrStoreUnavailable)
// when Redis is unreachable and the cached token has expired; ctx.Err().
func (m *Manager) Token(ctx context.Context, grant string) (*oauth2.Token, error) {
	g, err := m.state(grant)
	if err != nil {
		return nil, err
	}
	e, err := m.current(ctx, g)
	if err != nil {
		return nil, err
	}
	return e.tok, nil
}

// current is the hot path: the cached entry while it is fresh (refreshing
// in the background once it is due), else a flight. It returns the entry
// with its version, for the 401 rule.
func (m *Manager) current(ctx context.Context, g *grantState) (*entry, error) {
	if e := g.entry.Load(); e != nil {
		if e.err != nil {
			if e.dead || m.opts.Now().Before(e.recheckAt) {
				return nil, e.err
			}
			return m.obtain(ctx, g, want{}) // a corrupt record, due for a re-read
		}
		state := e.state.Load() // flipped by timers (invariant 7)
		if !m.timed {
			state = e.stateAt(m.opts.Now()) // a Now without timers: read it
		}
		switch state {
		case entryFresh:
			return e, nil
		case entryDue:
			if !g.bgRefresh.Load() { // one already running: no clock read
				m.refreshInBackground(g, m.opts.Now())
			}
			return e, nil
		}
	}
	return m.obtain(ctx, g, want{})
}

// Grant returns a handle on one grant, with its name checked and bound
// once; its Token skips the lookup that Manager.Token makes per call.
func (m *Manager) Grant(name string) *Grant {
	g, err := m.state(name)
	return &Grant{m: m, name: name, g: g, err: err}
}

// state returns the grant's state, creating it on first use.
func (m *Manager) state(name string) (*grantState, error) {
	// Most processes serve one grant: the first one looked up answers
	// without hashing its name.
	if g := m.lastGrant.Load(); g != nil && g.name == name {
		return g, nil
	}
	g := (*m.grants.Load())[name]
	if g == nil {
		var err error
		if g, err = m.addGrant(name); err != nil {
			return nil, err
		}
	}
	m.lastGrant.CompareAndSwap(nil, g) // the first; never rewritten, so no cache line bounces
	return g, nil
}

func (m *Manager) lookup(name string) *grantState {
	return (*m.grants.Load())[name]
}

func (m *Manager) addGrant(name string) (*grantState, error) {
	if err := ValidateGrantName(name); err != nil {
		return nil, err
	}
	m.grantsMu.Lock()
	defer m.grantsMu.Unlock()
	old := *m.grants.Load()
	if g := old[name]; g != nil {
		return g, nil
	}
	g := newGrantState(m.opts.KeyPrefix, name)
	next := make(map[string]*grantState, len(old)+1)
	for k, v := range old {
		next[k] = v
	}
	next[name] = g
	m.grants.Store(&next)
	m.subscribeGrant(g)
	return g, nil
}

func (m *Manager) allGrants() []*grantState {
	mp := *m.grants.Load()
	out := make([]*grantState, 0, len(mp))
	for _, g := range mp {
		out = append(out, g)
	}
	return out
}

// Rotate forces one fenced refresh of grant's current version now, as a
// 401 would, ignoring MinForcedRefreshAge. It returns the new version. If
// another process rotates first, that rotation counts.
func (m *Manager) Rotate(ctx context.Context, grant string) (int64, error) {
	st, err := m.Status(ctx, grant)
	if err != nil {
		return 0, err
	}
	if st.Status != StatusOK {
		return 0, &ReauthRequiredError{Grant: grant, Reason: st.Reason}
	}
	g, err := m.state(grant)
	if err != nil {
		return 0, err
	}
	e, err := m.obtain(ctx, g, want{mode: wantForced, rejected: st.Version})
	if err != nil {
		return 0, err
	}
	return e.v, nil
}

// RefreshIfDue refreshes grant, fenced and under the lease like any
// refresh, if its token expires within RefreshBefore (capped at
// MaxRefreshFraction of its lifetime); otherwise it only reads it. This is
// what the refresher calls for each grant the schedule says is due; give
// its Manager a larger RefreshBefore than the workers', so that workers
// never wait on the provider.
func (m *Manager) RefreshIfDue(ctx context.Context, grant string) (GrantStatus, error) {
	g, err := m.state(grant)
	if err != nil {
		return GrantStatus{}, err
	}
	if _, err := m.obtain(ctx, g, want{mode: wantRefreshIfDue}); err != nil {
		return GrantStatus{}, err
	}
	return m.Status(ctx, grant)
}

// RefreshDueAt is when a Manager with these options considers st's token
// due: RefreshBefore before expiry, capped at MaxRefreshFraction of its
// lifetime.
func (m *Manager) RefreshDueAt(st GrantStatus) time.Time {
	if st.Expiry.IsZero() {
		return parked
	}
	return st.Expiry.Add(-m.policy.margin(&record{Expiry: st.Expiry, RotatedAt: st.RotatedAt}))
}

// Seed imports a token pair for grant, as Admin.Seed does, and starts
// serving it at once.
func (m *Manager) Seed(ctx context.Context, grant string, tok *oauth2.Token, so SeedOptions) (int64, error) {
	rec, err := m.seed(ctx, grant, tok, so)
	if err != nil {
		return 0, err
	}
	if g := m.lookup(grant); g != nil {
		m.install(g, rec)
	}
	return rec.V, nil
}

// Status reads grant's metadata from Redis, as Admin.Status does.
func (m *Manager) Status(ctx context.Context, grant string) (GrantStatus, error) {
	return m.status(ctx, grant)
}

// Statuses reads the metadata of many grants in one round trip, as
// Admin.Statuses does.
func (m *Manager) Statuses(ctx context.Context, grants []string) (sts []GrantStatus, errs []error) {
	return m.statuses(ctx, grants)
}

// DueGrants returns up to limit grants whose access token expires before
// t, soonest first, as Admin.DueGrants does.
func (m *Manager) DueGrants(ctx context.Context, t time.Time, limit int64) ([]ScheduledGrant, error) {
	return m.dueGrants(ctx, t, limit)
}

// DeadGrants counts the grants that need re-consent, as Admin.DeadGrants
// does.
func (m *Manager) DeadGrants(ctx context.Context) (int64, error) {
	return m.deadGrants(ctx)
}

// Grants lists every grant in the schedule, as Admin.Grants does.
func (m *Manager) Grants(ctx context.Context) ([]string, error) {
	return m.scheduled(ctx)
}

// Postpone moves grant's place in the schedule to t, as Admin.Postpone
// does.
func (m *Manager) Postpone(ctx context.Context, grant string, t time.Time) error {
	return m.postpone(ctx, grant, t)
}

// Logger is the Manager's logger (with its component and holder).
func (m *Manager) Logger() *slog.Logger { return m.log }

// Holder is the name this Manager writes in intents and rotated_by.
func (m *Manager) Holder() string { return m.opts.Holder }

// Stats returns the Manager's counters since it was built.
func (m *Manager) Stats() Stats { return m.stats.snapshot() }
