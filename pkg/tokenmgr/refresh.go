package tokenmgr

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"golang.org/x/oauth2"
)

// intentTTL bounds how long a refresh intent outlives a holder that never
// came back. Long enough for any provider leeway; the CAS clears it anyway.
const intentTTL = 24 * time.Hour

// update brings the grant's entry up to date: it reads Redis, and refreshes
// when the record needs it. It runs as the grant's single flight.
func (m *Manager) update(ctx context.Context, g *grantState, w want) (*entry, error) {
	if p := g.heldPair(); p != nil {
		if err := m.flushHeld(ctx, g, p); err != nil {
			// Redis still refuses the new pair; it stays installed and served.
			if e := g.entry.Load(); m.satisfies(e, w) {
				return e, nil
			}
			return nil, &StoreError{Grant: g.name, Op: "write rotated pair", Err: err}
		}
	}
	rec, err := m.readOrRestore(ctx, g)
	if err != nil {
		return m.fallback(g, w, "read", err)
	}
	now := m.opts.Now()
	if rec.Status == StatusOK && w.rejects() && w.rejected == rec.V && !m.policy.needsRefresh(rec, w, now) {
		// A 401 on the stored version, too young to force a refresh: a
		// holder is most likely between the provider's rotation (which
		// revoked this token) and its write. Wait for that write.
		return m.awaitRotation(ctx, g, rec)
	}
	if rec.Status != StatusOK || !m.policy.needsRefresh(rec, w, now) {
		return m.install(g, rec), nil
	}
	if w.mode == wantUsable && m.policy.usable(rec, now) {
		// Due but still good: serve it, refresh behind the caller's back.
		e := m.install(g, rec)
		m.refreshInBackground(g, now)
		return e, nil
	}
	return m.refresh(ctx, g, rec, w)
}

// refresh spends the refresh token of rec under the grant's lease
// (invariant 2): decide, lease, re-read under the lease, record the intent,
// call the provider, then write the new pair fenced or handle the failure.
func (m *Manager) refresh(ctx context.Context, g *grantState, rec *record, w want) (*entry, error) {
	if e, err, done := m.backingOff(g, rec, w); done {
		return e, err
	}
	if rec.Restored {
		// Redis lost the record and some process put back the pair it
		// held; a process with a newer pair may not have noticed yet.
		// Spending an old refresh token would be reuse: give them time.
		if cur, changed := m.waitForChange(ctx, g, rec, 2*m.opts.PollInterval+time.Second); changed {
			return m.install(g, cur), nil
		}
	}
	l, e, err := m.takeLease(ctx, g, rec, w)
	if l == nil {
		return e, err
	}
	defer l.release(ctx)

	// Re-read under the lease: nobody refreshes a token someone else
	// already rotated.
	cur, err := m.readOrRestore(ctx, g)
	if err != nil {
		return m.fallback(g, w, "read under lease", err)
	}
	now := m.opts.Now()
	if m.movedOn(rec, cur, w, now) {
		return m.install(g, cur), nil
	}
	rec = cur
	if e, err, done := m.backingOff(g, rec, w); done {
		return e, err
	}
	in, e, err, ok := m.recordIntent(ctx, g, rec, w, now)
	if !ok {
		return e, err
	}
	// Spend the token only with time left on the lease for a whole call:
	// after a long pause here another holder may have taken over.
	if err := l.ensure(ctx, m.opts.Provider.HTTPTimeout); err != nil {
		m.log.Warn("refresh lease expired before the provider call; not spending the refresh token", "grant", g.name, "err", err)
		return m.reread(ctx, g, w)
	}
	stop := l.keepAlive(ctx, min(m.opts.LeaseTTL/3, m.opts.Provider.HTTPTimeout/2))
	tok, callErr := m.callIdP(ctx, rec.RefreshToken)
	stop()
	if callErr != nil {
		return m.refreshFailed(ctx, g, rec, in, callErr)
	}
	m.stats.refreshes.Add(1)
	return m.write(ctx, g, rec.V, m.nextRecord(g, rec, tok))
}

// movedOn reports whether cur no longer needs the refresh that rec did:
// another holder rotated it, or it died, or it is not due any more.
func (m *Manager) movedOn(rec, cur *record, w want, now time.Time) bool {
	return cur.V != rec.V || cur.Status != StatusOK || !m.policy.needsRefresh(cur, w, now)
}

// backingOff answers for a grant under a fleet-wide backoff (retry_at):
// the current token while it lasts, else the backoff as a RefreshError.
func (m *Manager) backingOff(g *grantState, rec *record, w want) (*entry, error, bool) {
	now := m.opts.Now()
	if !rec.RetryAt.After(now) {
		return nil, nil, false
	}
	if m.policy.usable(rec, now) && rec.V != w.rejected {
		return m.install(g, rec), nil, true
	}
	return nil, &RefreshError{Grant: g.name, RetryAfter: rec.RetryAt.Sub(now),
		Err: errors.New("waiting out the provider's backoff")}, true
}

// takeLease takes the grant's lease for refreshing rec. It returns a nil
// lease with what the caller gets instead when another holder rotated
// meanwhile (the new pair), or when the wait ran out (the cached token if
// still good, else an error).
func (m *Manager) takeLease(ctx context.Context, g *grantState, rec *record, w want) (*lease, *entry, error) {
	var moved *record
	l, err := m.leases.acquire(ctx, g.name, g.keys.lock, g.changedChan, func() bool {
		cur, err := m.store.read(ctx, g.name, g.keys)
		if err == nil && m.movedOn(rec, cur, w, m.opts.Now()) {
			moved = cur
			return false
		}
		return true
	})
	switch {
	case l != nil:
		return l, nil, nil
	case moved != nil:
		return nil, m.install(g, moved), nil
	}
	if e := g.entry.Load(); m.satisfies(e, w) {
		return nil, e, nil
	}
	if errors.Is(err, errLeaseBusy) {
		return nil, nil, fmt.Errorf("tokenmgr: grant %q: no new token within %s: another process holds the refresh lease: %w", g.name, m.opts.WaitTimeout, ctx.Err())
	}
	return nil, nil, &StoreError{Grant: g.name, Op: "take refresh lease", Err: err}
}

// recordIntent journals, before the provider call, that this holder is
// about to spend rec's refresh token (invariant 4). ok is false when the
// record moved on underneath, with what the caller gets instead.
func (m *Manager) recordIntent(ctx context.Context, g *grantState, rec *record, w want, now time.Time) (in intent, e *entry, err error, ok bool) {
	in, ok, err = m.store.beginRefresh(ctx, g.keys, rec.V, m.opts.Holder, now, intentTTL)
	if err != nil || !ok {
		if err != nil && !errors.Is(err, errMissing) {
			e, err = m.fallback(g, w, "record refresh intent", err)
			return in, e, err, false
		}
		e, err = m.reread(ctx, g, w) // the record moved on between two reads
		return in, e, err, false
	}
	if in.PreviousHolder != "" {
		m.log.Warn("an earlier refresh of this version did not finish; retrying the same refresh token",
			"grant", g.name, "version", rec.V, "earlier_holder", in.PreviousHolder,
			"started_at", in.StartedAt, "attempt", in.Attempts)
	}
	return in, nil, nil, true
}

// callIdP spends a refresh token. It is not cancelled by the caller or by
// Close: once the request may have reached the provider, its answer is the
// only copy of the new refresh token. HTTPTimeout bounds it.
func (m *Manager) callIdP(ctx context.Context, rt secret) (*oauth2.Token, error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), m.opts.Provider.HTTPTimeout)
	defer cancel()
	hc := &http.Client{Transport: m.opts.IdPTransport, Timeout: m.opts.Provider.HTTPTimeout}
	ctx = context.WithValue(ctx, oauth2.HTTPClient, hc)
	return m.oauth.TokenSource(ctx, &oauth2.Token{RefreshToken: string(rt)}).Token()
}

// nextRecord turns the provider's answer into the successor of rec.
func (m *Manager) nextRecord(g *grantState, rec *record, tok *oauth2.Token) *record {
	now := m.opts.Now()
	next := recordFromToken(tok, now, m.opts.Holder, m.opts.Provider)
	next.V = rec.V + 1
	next.RefreshCount = rec.RefreshCount + 1
	next.AbsoluteExpiry = rec.AbsoluteExpiry
	if next.Scope == "" {
		next.Scope = rec.Scope
	}
	if next.RefreshToken == "" || next.RefreshToken == rec.RefreshToken {
		next.RefreshToken = rec.RefreshToken
		if m.opts.Provider.Rotates {
			m.log.Info("provider response carried no new refresh token; keeping the previous one", "grant", g.name, "version", rec.V)
		}
	}
	// Expiry from expires_in on our clock: x/oauth2 computes it from the
	// wall clock, which an injected clock (and any skew in tests) ignores.
	if tok.ExpiresIn > 0 {
		next.Expiry = now.Add(time.Duration(tok.ExpiresIn) * time.Second)
	} else if !tok.Expiry.IsZero() {
		next.Expiry = now.Add(time.Until(tok.Expiry))
	}
	if next.Expiry.IsZero() {
		next.Expiry = now.Add(m.opts.Provider.DefaultAccessTTL)
		m.log.Warn("provider response had no expires_in; assuming the provider default", "grant", g.name, "assumed_ttl", m.opts.Provider.DefaultAccessTTL)
	}
	return next
}

// readOrRestore reads the record; if Redis lost it, restores the newest pair
// this process holds (never an older one: the script compares versions).
func (m *Manager) readOrRestore(ctx context.Context, g *grantState) (*record, error) {
	m.stats.reads.Add(1)
	rec, err := m.store.read(ctx, g.name, g.keys)
	newest := g.newestRecord()
	switch {
	case errors.Is(err, errMissing):
		if newest == nil || newest.Status != StatusOK {
			return nil, &NotFoundError{Grant: g.name}
		}
	case err == nil && rec.Restored && newest != nil && newest.Status == StatusOK && newest.V > rec.V:
		// Another process restored an older pair than ours: ours wins.
	default:
		return rec, err
	}
	written, err := m.store.restore(ctx, g.name, g.keys, newest)
	if err != nil {
		return nil, err
	}
	if written {
		m.schedule(ctx, g.name, newest)
		m.stats.restores.Add(1)
		m.log.Warn("grant record was missing from Redis; restored it from this process's newest pair", "grant", g.name, "version", newest.V)
	}
	rec, err = m.store.read(ctx, g.name, g.keys)
	if errors.Is(err, errMissing) {
		return nil, &NotFoundError{Grant: g.name}
	}
	return rec, err
}

// fallback decides what a caller gets when Redis failed: the cached token
// while it is still valid (cached tokens keep serving through a Redis
// outage), else a clear error.
func (m *Manager) fallback(g *grantState, w want, op string, err error) (*entry, error) {
	var nf *NotFoundError
	if errors.As(err, &nf) || errors.Is(err, context.Canceled) {
		return nil, err
	}
	if e := g.entry.Load(); m.satisfies(e, w) {
		return e, nil
	}
	var corrupt *CorruptRecordError
	if errors.As(err, &corrupt) {
		return nil, err
	}
	return nil, &StoreError{Grant: g.name, Op: op, Err: err}
}

// reread installs whatever Redis holds now, without refreshing: used where
// the record changed under a lease this flight still holds.
func (m *Manager) reread(ctx context.Context, g *grantState, w want) (*entry, error) {
	rec, err := m.readOrRestore(ctx, g)
	if err != nil {
		return m.fallback(g, w, "read", err)
	}
	return m.install(g, rec), nil
}

// waitForChange waits up to d (real time) for a rotation message or a
// different record. It returns the record it last read and whether it
// differs from rec.
func (m *Manager) waitForChange(ctx context.Context, g *grantState, rec *record, d time.Duration) (*record, bool) {
	changed := g.changedChan()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-changed:
	case <-t.C:
	case <-ctx.Done():
	}
	cur, err := m.store.read(ctx, g.name, g.keys)
	if err != nil {
		return rec, false
	}
	return cur, cur.V != rec.V || cur.Status != rec.Status || cur.Restored != rec.Restored
}

// awaitRotation serves a 401 on a version too young to refresh again: if
// a lease is held, a rotation is in flight, and its pair will arrive within
// one provider call.
func (m *Manager) awaitRotation(ctx context.Context, g *grantState, rec *record) (*entry, error) {
	if held, err := m.leases.heldByAnyone(ctx, g.keys.lock); err == nil && held {
		if cur, changed := m.waitForChange(ctx, g, rec, m.opts.Provider.HTTPTimeout); changed {
			return m.install(g, cur), nil
		}
	}
	return m.install(g, rec), nil
}
