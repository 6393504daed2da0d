package tokenmgr

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/trace"
	"golang.org/x/oauth2"
)

// grantState is the in-process state of one grant: the entry the hot path
// reads, the flight that refreshes it, and the newest pair this process
// holds.
type grantState struct {
	name string
	keys keys

	// entry is what the hot path reads: one atomic load. nil means "ask
	// Redis" (never loaded, or dropped by a rotation message).
	entry atomic.Pointer[entry]
	// bgRefresh is set while a background refresh runs, so the hot path
	// starts at most one.
	bgRefresh atomic.Bool
	// bgNotBefore (unix nanos) holds back background refreshes after an
	// attempt that left the token due (a backoff, Redis down, a corrupt
	// record, a refresher that will rotate), so that no outage starts one
	// per call: at most one per backoff step (invariant 12).
	bgNotBefore atomic.Int64
	// bgFailures counts background attempts in a row that left the token
	// due: the exponent of the next step.
	bgFailures atomic.Int64
	// forcedStreak counts refreshes forced by 401s since a request last
	// succeeded; forcedNotBefore (unix nanos) holds back the next one
	// (exponential backoff while 401s persist, invariant 12).
	forcedStreak    atomic.Int64
	forcedNotBefore atomic.Int64
	// badAnswers counts provider answers in a row whose access token could
	// not be used: the exponent of the backoff before the next refresh.
	badAnswers atomic.Int64
	// announced is the version last announced by a rotation message or a
	// poll. A flight that read Redis before the announcement and
	// installed an older version runs again.
	announced atomic.Int64
	// flushMu serialises writes of the held pair (flusher, Close, update).
	flushMu sync.Mutex
	// reportedV is the last version given to Options.OnVersion.
	reportedV atomic.Int64
	// subUp: the grant's own subscription is up (sharded messages).
	subUp atomic.Bool
	// lostAnnounced is the version whose lost tokens this process last
	// told the fleet of (once per version); lostHeard (unix nanos) when it
	// last read the record because another process did (once a second).
	lostAnnounced atomic.Int64
	lostHeard     atomic.Int64

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
	// held is a rotated pair the provider gave us that Redis has not
	// accepted yet (invariant 4: held and retried, never dropped).
	held *heldWrite
	// lostAttempt is the version (and family) of this process's last
	// attempt whose outcome is unknown: its answer is known lost, since it
	// would be held otherwise. nil: none.
	lostAttempt *record
}

func (g *grantState) setLostAttempt(rec *record) {
	g.mu.Lock()
	g.lostAttempt = &record{V: rec.V, Family: rec.Family}
	g.mu.Unlock()
}

func (g *grantState) clearLostAttempt() {
	g.mu.Lock()
	g.lostAttempt = nil
	g.mu.Unlock()
}

// lostAttemptWas reports whether this process's own attempt at rec's
// version got no answer.
func (g *grantState) lostAttemptWas(rec *record) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.lostAttempt != nil && g.lostAttempt.V == rec.V && g.lostAttempt.Family == rec.Family
}

func newGrantState(prefix, name string) *grantState {
	return &grantState{name: name, keys: grantKeys(prefix, name), changed: make(chan struct{})}
}

// changedChan is closed at the grant's next rotation message.
func (g *grantState) changedChan() <-chan struct{} {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.changed
}

// wake wakes every waiter on changedChan.
func (g *grantState) wake() {
	g.mu.Lock()
	close(g.changed)
	g.changed = make(chan struct{})
	g.mu.Unlock()
}

func (g *grantState) newestRecord() *record {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.newest
}

// entry is a snapshot of a usable (or dead) grant. Only its state changes:
// fresh, then due at softAt, then expired at hardAt, flipped by timers when
// the Manager has a Clock, so that the hot path reads no clock.
type entry struct {
	state   atomic.Uint32 // entryFresh, entryDue, entryExpired
	stops   []func() bool // the state's timers
	tok     *oauth2.Token // shared with callers, who must not modify it
	v       int64
	family  string
	softAt  time.Time // after this, refresh in the background and keep serving
	floorAt time.Time // after this, refresh even while a live refresher serves the grant
	hardAt  time.Time // after this, the token is not served: wait for a new one
	retryAt time.Time // the fleet backs off until then (the record's retry_at)
	// err is returned at once: the grant is dead (dead is set), or its
	// record is corrupt until recheckAt, when it is read again.
	err       error
	dead      bool
	recheckAt time.Time
}

// The states of an entry's token.
const (
	entryFresh   uint32 = iota // served as is
	entryDue                   // served, and refreshed in the background
	entryExpired               // not served: the caller waits for a new one
)

// stateAt is e's state at now, from its deadlines.
func (e *entry) stateAt(now time.Time) uint32 {
	switch {
	case now.Before(e.softAt):
		return entryFresh
	case now.Before(e.hardAt):
		return entryDue
	}
	return entryExpired
}

// stopTimers cancels the timers of an entry that was replaced.
func (e *entry) stopTimers() {
	for _, stop := range e.stops {
		stop()
	}
}

// flight is one load or refresh of a grant, shared by every caller in the
// process that needs it meanwhile.
type flight struct {
	done chan struct{}
	e    *entry
	err  error
}

// want is what a caller of obtain needs.
type want struct {
	mode wantMode
	// rejected is the version a 401 rejected (modes wantNewer and
	// wantForced); 0 otherwise.
	rejected int64
	// reason is the rejecting 401's challenge (wantNewer).
	reason string
	// caller is the span of the caller that started the flight, so that
	// the flight's spans join its trace.
	caller trace.SpanContext
}

type wantMode int

const (
	// wantUsable: a token still inside its hard deadline (Token).
	wantUsable wantMode = iota
	// wantRefreshIfDue: refresh a token that is still usable but due (the
	// background refresh, RefreshIfDue).
	wantRefreshIfDue
	// wantNewer: a version newer than rejected (the 401 rule, invariant 5).
	wantNewer
	// wantForced: as wantNewer, ignoring MinForcedRefreshAge (Rotate).
	wantForced
)

func (m wantMode) String() string {
	switch m {
	case wantRefreshIfDue:
		return "refresh_if_due"
	case wantNewer:
		return "newer_than_rejected"
	case wantForced:
		return "forced"
	}
	return "usable"
}

// rejects reports whether the caller saw a version rejected.
func (w want) rejects() bool { return w.mode == wantNewer || w.mode == wantForced }

func (m *Manager) satisfies(e *entry, w want) bool {
	if e == nil {
		return false
	}
	if e.err != nil {
		return e.dead
	}
	if w.rejects() && e.v == w.rejected {
		return false
	}
	return e.stateAt(m.opts.Now()) != entryExpired
}

// obtain joins or starts the grant's flight and waits for a usable entry.
// The flight runs under the Manager's context, not the caller's: a caller
// that gives up does not abort a refresh whose response must not be lost.
func (m *Manager) obtain(ctx context.Context, g *grantState, w want) (*entry, error) {
	for attempt := 0; ; attempt++ {
		g.mu.Lock()
		f := g.flight
		if f == nil {
			f = &flight{done: make(chan struct{})}
			w.caller = trace.SpanContextFromContext(ctx)
			if !m.goBackground(func() { m.runFlight(g, f, w) }) {
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
		if m.satisfies(f.e, w) || attempt > 0 {
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

// runFlight brings the grant up to date for f's callers, then ends f.
func (m *Manager) runFlight(g *grantState, f *flight, w want) {
	ctx, cancel := context.WithTimeout(trace.ContextWithSpanContext(m.base, w.caller), m.opts.WaitTimeout)
	defer cancel()
	f.e, f.err = m.update(ctx, g, w)
	for range 3 {
		// A rotation announced while this flight was reading: what it
		// installed may already be superseded (and revoked).
		if f.err != nil || f.e == nil || f.e.err != nil || f.e.v >= g.announced.Load() {
			break
		}
		f.e, f.err = m.update(ctx, g, want{})
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
// usable; callers keep getting the current token meanwhile. It starts at
// most one per grant at a time, and after an attempt that left the token
// due, none before the next backoff step.
func (m *Manager) refreshInBackground(g *grantState, now time.Time) {
	if now.UnixNano() < g.bgNotBefore.Load() || !g.bgRefresh.CompareAndSwap(false, true) {
		return
	}
	started := m.goBackground(func() {
		defer g.bgRefresh.Store(false)
		before := g.entry.Load()
		if before != nil && m.leftToRefresher(g, before) {
			// A live refresher will rotate it (invariant 11): look again
			// at the floor, or in a second if the refresher goes.
			next := m.opts.Now().Add(refresherCheckEvery)
			if before.floorAt.Before(next) {
				next = before.floorAt
			}
			g.bgNotBefore.Store(next.UnixNano())
			m.stats.leftToRefresher.Add(1)
			return
		}
		_, err := m.obtain(m.base, g, want{mode: wantRefreshIfDue})
		after := g.entry.Load()
		now := m.opts.Now()
		if after != nil && after.err == nil && now.Before(after.softAt) {
			g.bgFailures.Store(0) // a fresh token: done
			return
		}
		// Still due: a backoff, Redis down, a corrupt record, a lease
		// held elsewhere. Wait one step before the next attempt.
		step := m.policy.backoff(g.bgFailures.Add(1))
		var re *RefreshError
		if errors.As(err, &re) && re.RetryAfter > step {
			step = re.RetryAfter
		}
		next := now.Add(step)
		if after != nil && after.retryAt.After(next) {
			next = after.retryAt
		}
		g.bgNotBefore.Store(next.UnixNano())
		if err != nil && !errors.Is(err, ErrClosed) && !errors.Is(err, context.Canceled) {
			m.log.Warn("background refresh failed; serving the current token until it expires", "grant", g.name, "retry_in", next.Sub(now), "err", err)
		}
	})
	if !started {
		g.bgRefresh.Store(false)
	}
}

// install publishes rec as the grant's entry and returns it. It is the one
// place entries are made, and it is monotonic (invariant 9): a record older
// than the newest this process has served or written is never installed;
// the newest stays, and the next read repairs the store.
func (m *Manager) install(g *grantState, rec *record) *entry {
	g.mu.Lock()
	if g.newest != nil && g.newest.newerThan(rec) {
		newest := g.newest
		g.mu.Unlock()
		m.stats.olderRefused.Add(1)
		if e := g.entry.Load(); e != nil && e.v == newest.V && e.family == newest.Family {
			return e
		}
		return m.publish(g, newest)
	}
	g.newest = rec
	g.mu.Unlock()
	return m.publish(g, rec)
}

// publish makes rec's entry the one the hot path reads.
func (m *Manager) publish(g *grantState, rec *record) *entry {
	e := &entry{v: rec.V, family: rec.Family, retryAt: rec.RetryAt}
	if rec.Status == StatusReauthRequired {
		e.err = &ReauthRequiredError{Grant: g.name, Reason: rec.Reason}
		e.dead = true
	} else {
		e.tok = rec.token()
		// Callers get the access token only: with the refresh token, a
		// caller's own oauth2.Config.TokenSource would refresh outside
		// the lease, and a logged token would leak it.
		e.tok.RefreshToken = ""
		e.softAt, e.floorAt, e.hardAt = m.policy.deadlines(rec, randomSpread())
	}
	if e.err == nil {
		now := m.opts.Now()
		e.state.Store(e.stateAt(now))
		if m.opts.Clock != nil {
			// Flip the state at each deadline still ahead; a timer of a
			// replaced entry flips nothing anyone reads.
			if d := e.softAt.Sub(now); d > 0 && e.softAt != farFuture {
				e.stops = append(e.stops, m.opts.Clock.AfterFunc(d, func() { e.state.CompareAndSwap(entryFresh, entryDue) }))
			}
			if d := e.hardAt.Sub(now); d > 0 && e.hardAt != farFuture {
				e.stops = append(e.stops, m.opts.Clock.AfterFunc(d, func() { e.state.Store(entryExpired) }))
			}
		}
	}
	if old := g.entry.Swap(e); old != nil {
		old.stopTimers()
	}
	if m.opts.OnVersion != nil && g.reportedV.Swap(e.v) != e.v {
		m.opts.OnVersion(g.name, e.v)
	}
	return e
}

// installCorrupt makes every caller get err at once, without a read, until
// recheckAt; a rotation message or the poll brings the next read sooner.
func (m *Manager) installCorrupt(g *grantState, err error) {
	if old := g.entry.Swap(&entry{err: err, recheckAt: m.opts.Now().Add(m.corruptRecheck())}); old != nil {
		old.stopTimers()
	}
}

// corruptRecheck is how long a corrupt record's error is served before the
// record is read again.
func (m *Manager) corruptRecheck() time.Duration {
	return max(m.opts.PollInterval, 100*time.Millisecond)
}
