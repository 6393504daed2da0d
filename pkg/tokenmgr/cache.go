package tokenmgr

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

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
	// bgNotBefore (unix nanos) holds back background refreshes after a
	// failure, so a Redis or provider outage does not start one per call.
	bgNotBefore atomic.Int64
	// announced is the version last announced by a rotation message or a
	// poll. A flight that read Redis before the announcement and
	// installed an older version runs again.
	announced atomic.Int64
	// flushMu serialises writes of the held pair (flusher, Close, update).
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
	// held is a rotated pair the provider gave us that Redis has not
	// accepted yet (invariant 4: held and retried, never dropped).
	held *heldWrite
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

// entry is an immutable snapshot of a usable (or dead) grant.
type entry struct {
	tok    *oauth2.Token // shared with callers, who must not modify it
	v      int64
	softAt time.Time // after this, refresh in the background and keep serving
	hardAt time.Time // after this, the token is not served: wait for a new one
	err    error     // non-nil: the grant is dead; returned at once
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

// rejects reports whether the caller saw a version rejected.
func (w want) rejects() bool { return w.mode == wantNewer || w.mode == wantForced }

func (m *Manager) satisfies(e *entry, w want) bool {
	if e == nil {
		return false
	}
	if e.err != nil {
		return true
	}
	if w.rejects() && e.v == w.rejected {
		return false
	}
	return m.opts.Now().Before(e.hardAt)
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
	ctx, cancel := context.WithTimeout(m.base, m.opts.WaitTimeout)
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
// usable; callers keep getting the current token meanwhile.
func (m *Manager) refreshInBackground(g *grantState, now time.Time) {
	if now.UnixNano() < g.bgNotBefore.Load() || !g.bgRefresh.CompareAndSwap(false, true) {
		return
	}
	started := m.goBackground(func() {
		defer g.bgRefresh.Store(false)
		if _, err := m.obtain(m.base, g, want{mode: wantRefreshIfDue}); err != nil {
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
func (m *Manager) install(g *grantState, rec *record) *entry {
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
		e.softAt, e.hardAt = m.policy.deadlines(rec, randomSpread())
	}
	g.entry.Store(e)
	if m.opts.OnVersion != nil && g.reportedV.Swap(e.v) != e.v {
		m.opts.OnVersion(g.name, e.v)
	}
	return e
}
