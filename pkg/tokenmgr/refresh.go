package tokenmgr

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strconv"
	"time"

	"github.com/go-redsync/redsync/v4"
	"golang.org/x/oauth2"
)

// intentTTL bounds how long a refresh intent outlives a holder that never
// came back. Long enough for any provider leeway; the CAS clears it anyway.
const intentTTL = 24 * time.Hour

// sync brings the grant's entry up to date: reads Redis, and refreshes when
// the record needs it. It runs as the grant's single flight.
func (m *Manager) sync(ctx context.Context, g *grant, n need) (*entry, error) {
	if p := g.pendingWrite(); p != nil {
		if err := m.flushPending(ctx, g, p); err != nil {
			// Redis still refuses the new pair; it stays installed and served.
			if e := g.entry.Load(); m.satisfies(e, n) {
				return e, nil
			}
			return nil, &StoreError{Grant: g.name, Op: "write rotated pair", Err: err}
		}
	}
	rec, err := m.readOrRestore(ctx, g)
	if err != nil {
		return m.fallback(g, n, "read", err)
	}
	now := m.opts.Now()
	if rec.Status == StatusOK && n.staleV == rec.V && !m.needsRefresh(rec, n, now) {
		// A 401 on the stored version, too young to force a refresh: a
		// holder is most likely between the provider's rotation (which
		// revoked this token) and its write. Wait for that write.
		return m.awaitRotation(ctx, g, rec, n)
	}
	if rec.Status != StatusOK || !m.needsRefresh(rec, n, now) {
		return m.install(g, rec), nil
	}
	if n.staleV == 0 && !n.refreshDue && m.usable(rec, now) {
		// Due but still good: serve it, refresh behind the caller's back.
		e := m.install(g, rec)
		m.refreshInBackground(g, now)
		return e, nil
	}
	return m.refresh(ctx, g, rec, n)
}

// needsRefresh reports whether rec must be refreshed for a caller with need n.
func (m *Manager) needsRefresh(rec *record, n need, now time.Time) bool {
	if n.staleV != 0 {
		// The 401 rule: only the version the caller saw rejected, and not
		// one written moments ago (a 401 for some other reason must not
		// turn every request into a refresh).
		return rec.V == n.staleV && (n.force || now.Sub(rec.RotatedAt) >= m.opts.MinForcedRefreshAge || !m.usable(rec, now))
	}
	return m.due(rec, now)
}

// readOrRestore reads the record; if Redis lost it, restores the newest pair
// this process holds (never an older one: the script compares versions).
func (m *Manager) readOrRestore(ctx context.Context, g *grant) (*record, error) {
	m.stats.reloads.Add(1)
	rec, err := m.store.read(ctx, g.name, g.keys)
	g.mu.Lock()
	newest := g.newest
	g.mu.Unlock()
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
// while it is still valid (invariant: cached tokens keep serving through a
// Redis outage), else a clear error.
func (m *Manager) fallback(g *grant, n need, op string, err error) (*entry, error) {
	var nf *NotFoundError
	if errors.As(err, &nf) || errors.Is(err, context.Canceled) {
		return nil, err
	}
	if e := g.entry.Load(); m.satisfies(e, n) {
		return e, nil
	}
	var corrupt *CorruptRecordError
	if errors.As(err, &corrupt) {
		return nil, err
	}
	return nil, &StoreError{Grant: g.name, Op: op, Err: err}
}

// refresh takes the grant's lease and, if the record still needs it after a
// re-read under the lease, spends the refresh token (invariant 2).
func (m *Manager) refresh(ctx context.Context, g *grant, rec *record, n need) (*entry, error) {
	if e, err, done := m.backingOff(g, rec, n); done {
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
	mutex := m.locks.NewMutex(g.keys.lock, redsync.WithExpiry(m.opts.LeaseTTL), redsync.WithTries(1))
	var lockErr error
	for {
		if lockErr = mutex.TryLockContext(ctx); lockErr == nil {
			break
		}
		m.stats.lockWaits.Add(1)
		var taken *redsync.ErrTaken
		if !errors.As(lockErr, &taken) && !errors.Is(lockErr, redsync.ErrFailed) {
			m.log.Debug("lease attempt failed", "grant", g.name, "err", lockErr)
		}
		// Another process holds the lease, or the lock servers are down:
		// wait for its rotation message (or a jittered pause), then look.
		g.mu.Lock()
		changed := g.changed
		g.mu.Unlock()
		t := time.NewTimer(jitter(m.opts.LockRetry))
		select {
		case <-changed:
		case <-t.C:
		case <-ctx.Done():
		}
		t.Stop()
		if ctx.Err() != nil {
			if e := g.entry.Load(); m.satisfies(e, n) {
				return e, nil
			}
			var taken *redsync.ErrTaken
			if errors.As(lockErr, &taken) || errors.Is(lockErr, redsync.ErrFailed) {
				return nil, fmt.Errorf("tokenmgr: grant %q: no new token within %s: another process holds the refresh lease: %w", g.name, m.opts.WaitTimeout, ctx.Err())
			}
			return nil, &StoreError{Grant: g.name, Op: "take refresh lease", Err: lockErr}
		}
		cur, err := m.store.read(ctx, g.name, g.keys)
		if err != nil {
			continue
		}
		if cur.V != rec.V || cur.Status != StatusOK || !m.needsRefresh(cur, n, m.opts.Now()) {
			return m.install(g, cur), nil
		}
	}
	m.stats.leases.Add(1)
	defer func() {
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		defer cancel()
		_, _ = mutex.UnlockContext(uctx)
	}()

	// Re-read under the lease: nobody refreshes a token someone else
	// already rotated.
	cur, err := m.readOrRestore(ctx, g)
	if err != nil {
		return m.fallback(g, n, "read under lease", err)
	}
	now := m.opts.Now()
	if cur.V != rec.V || cur.Status != StatusOK || !m.needsRefresh(cur, n, now) {
		return m.install(g, cur), nil
	}
	rec = cur
	if e, err, done := m.backingOff(g, rec, n); done {
		return e, err
	}

	in, ok, err := m.store.beginRefresh(ctx, g.keys, rec.V, m.opts.Holder, now, intentTTL)
	if err != nil || !ok {
		if err != nil && !errors.Is(err, errMissing) {
			return m.fallback(g, n, "record refresh intent", err)
		}
		return m.reread(ctx, g, n) // the record moved on between two reads
	}
	if in.PreviousHolder != "" {
		m.log.Warn("an earlier refresh of this version did not finish; retrying the same refresh token",
			"grant", g.name, "version", rec.V, "earlier_holder", in.PreviousHolder,
			"started_at", in.StartedAt, "attempt", in.Attempts)
	}

	// Spend the token only with time left on the lease for a whole call:
	// after a long pause here another holder may have taken over.
	if time.Until(mutex.Until()) < m.opts.Provider.HTTPTimeout {
		if ok, err := mutex.ExtendContext(ctx); !ok {
			m.stats.leasesLost.Add(1)
			m.log.Warn("refresh lease expired before the provider call; not spending the refresh token", "grant", g.name, "err", err)
			return m.reread(ctx, g, n)
		}
	}
	stop := m.keepLease(ctx, g, mutex)
	tok, callErr := m.callIdP(ctx, rec.RefreshToken)
	stop()
	if callErr != nil {
		return m.refreshFailed(ctx, g, rec, in, callErr)
	}
	m.stats.refreshes.Add(1)
	return m.refreshed(ctx, g, rec, tok)
}

// backingOff answers for a grant under a fleet-wide backoff (retry_at):
// the current token while it lasts, else the backoff as a RefreshError.
func (m *Manager) backingOff(g *grant, rec *record, n need) (*entry, error, bool) {
	now := m.opts.Now()
	if !rec.RetryAt.After(now) {
		return nil, nil, false
	}
	if m.usable(rec, now) && rec.V != n.staleV {
		return m.install(g, rec), nil, true
	}
	return nil, &RefreshError{Grant: g.name, RetryAfter: rec.RetryAt.Sub(now),
		Err: errors.New("waiting out the provider's backoff")}, true
}

// keepLease extends the lease while the provider call is in flight
// (invariant 3), at least twice per HTTP timeout. The returned stop reports nothing: a lost lease is logged
// and counted, and the fenced write decides what is stored.
func (m *Manager) keepLease(ctx context.Context, g *grant, mutex *redsync.Mutex) (stop func()) {
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(min(m.opts.LeaseTTL/3, m.opts.Provider.HTTPTimeout/2))
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				ectx, cancel := context.WithTimeout(context.WithoutCancel(ctx), m.opts.LeaseTTL/3)
				ok, err := mutex.ExtendContext(ectx)
				cancel()
				if !ok {
					m.stats.leasesLost.Add(1)
					m.log.Warn("refresh lease lost during the provider call; the fenced write will decide", "grant", g.name, "err", err)
					return
				}
			}
		}
	}()
	return func() { close(done); <-finished }
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

// refreshed turns the provider's answer into the next record and writes it
// fenced on the version its refresh token was read at.
func (m *Manager) refreshed(ctx context.Context, g *grant, rec *record, tok *oauth2.Token) (*entry, error) {
	now := m.opts.Now()
	next := &record{
		V:              rec.V + 1,
		Status:         StatusOK,
		AccessToken:    secret(tok.AccessToken),
		RefreshToken:   secret(tok.RefreshToken),
		TokenType:      tok.TokenType,
		Expiry:         tok.Expiry,
		Scope:          rec.Scope,
		RotatedAt:      now,
		RotatedBy:      m.opts.Holder,
		RefreshCount:   rec.RefreshCount + 1,
		AbsoluteExpiry: rec.AbsoluteExpiry,
	}
	if s, ok := tok.Extra("scope").(string); ok && s != "" {
		next.Scope = s
	}
	if next.TokenType == "" {
		next.TokenType = "Bearer"
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
	if m.opts.Provider.IdleExpiry > 0 {
		next.IdleExpiry = now.Add(m.opts.Provider.IdleExpiry)
	}
	return m.write(ctx, g, rec.V, next)
}

// write stores next as the successor of fromV. Redis failing does not lose
// the pair: it is installed, served, and written later by a flusher.
func (m *Manager) write(ctx context.Context, g *grant, fromV int64, next *record) (*entry, error) {
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), m.opts.LeaseTTL)
	defer cancel()
	p := &pendingWrite{fromV: fromV, rec: next}
	if err := m.flushPending(wctx, g, p); err != nil {
		g.mu.Lock()
		g.pending = p
		g.mu.Unlock()
		m.stats.pendingWrites.Add(1)
		m.log.Error("Redis refused the rotated pair; holding it and retrying", "grant", g.name, "from_version", fromV, "err", err)
		e := m.install(g, next)
		m.startFlusher(g, p)
		return e, nil
	}
	if e := g.entry.Load(); e != nil {
		return e, nil
	}
	return m.sync(ctx, g, need{})
}

// flushPending writes p and installs what Redis then holds. It returns an
// error only when Redis could not be reached.
func (m *Manager) flushPending(ctx context.Context, g *grant, p *pendingWrite) error {
	g.flushMu.Lock()
	defer g.flushMu.Unlock()
	if p.written {
		return nil // another caller flushed it meanwhile
	}
	res, v, counted, err := m.store.rotate(ctx, g.name, g.keys, p.fromV, p.rec)
	if err != nil {
		return err
	}
	if res == casWritten && !counted && !m.warnedUncounted.Swap(true) {
		m.log.Warn("rotation written but not counted for operators: the Redis user lacks ZREMRANGEBYSCORE (see the README's ACL rules); dashboards show the last hour's rotations as unknown",
			"grant", g.name)
	}
	p.written = true
	g.mu.Lock()
	if g.pending == p {
		g.pending = nil
	}
	g.mu.Unlock()
	switch res {
	case casWritten:
		p.rec.V = v
		m.install(g, p.rec)
		m.schedule(ctx, g.name, p.rec)
		return nil
	case casConflict:
		m.stats.writeConflicts.Add(1)
		m.log.Warn("fenced write refused: another holder stored a newer pair while this refresh was in flight; the stored pair stands",
			"grant", g.name, "from_version", p.fromV, "stored_version", v)
	case casMissing:
		p.rec.V = p.fromV + 1
		if _, err := m.store.restore(ctx, g.name, g.keys, p.rec); err != nil {
			return err
		}
		m.stats.restores.Add(1)
		m.log.Warn("grant record was missing from Redis when writing a rotated pair; restored it", "grant", g.name, "version", p.rec.V)
	}
	rec, err := m.store.read(ctx, g.name, g.keys)
	if err != nil {
		g.entry.Store(nil) // next caller reads again
		return nil
	}
	m.install(g, rec)
	return nil
}

// startFlusher retries a held pair until Redis takes it or the Manager closes.
func (m *Manager) startFlusher(g *grant, p *pendingWrite) {
	m.goBackground(func() {
		wait := 100 * time.Millisecond
		for {
			select {
			case <-m.base.Done():
				return // Close makes the last attempt
			case <-time.After(jitter(wait)):
			}
			g.mu.Lock()
			still := g.pending == p
			g.mu.Unlock()
			if !still {
				return
			}
			ctx, cancel := context.WithTimeout(m.base, m.opts.LeaseTTL)
			err := m.flushPending(ctx, g, p)
			cancel()
			if err == nil {
				m.log.Info("held rotated pair written to Redis", "grant", g.name, "from_version", p.fromV)
				return
			}
			wait = min(2*wait, 5*time.Second)
		}
	})
}

func (g *grant) pendingWrite() *pendingWrite {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.pending
}

// failure classes of a refresh call.
const (
	failTransient = iota // 5xx, 429, network: back off and retry
	failDead             // invalid_grant: the refresh token is not accepted
	failConfig           // the client itself is rejected
)

func classify(err error) (class int, retryAfter time.Duration) {
	var re *oauth2.RetrieveError
	if !errors.As(err, &re) {
		return failTransient, 0
	}
	if re.Response != nil {
		retryAfter = parseRetryAfter(re.Response.Header.Get("Retry-After"), time.Now())
	}
	switch re.ErrorCode {
	case "invalid_grant":
		return failDead, 0
	case "invalid_client", "unauthorized_client", "access_denied":
		return failConfig, retryAfter
	}
	if re.Response != nil && (re.Response.StatusCode == http.StatusTooManyRequests || re.Response.StatusCode >= 500) {
		return failTransient, retryAfter
	}
	return failConfig, retryAfter
}

// parseRetryAfter reads delay-seconds or an HTTP date; 0 if absent or bad.
func parseRetryAfter(v string, now time.Time) time.Duration {
	if v == "" {
		return 0
	}
	if s, err := strconv.Atoi(v); err == nil && s >= 0 {
		return time.Duration(s) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}

// refreshFailed handles a provider error (invariants 5 and 6).
func (m *Manager) refreshFailed(ctx context.Context, g *grant, rec *record, in intent, callErr error) (*entry, error) {
	m.stats.refreshFailures.Add(1)
	class, retryAfter := classify(callErr)
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), m.opts.LeaseTTL)
	defer cancel()
	switch class {
	case failDead:
		// Re-check Redis before declaring the grant dead: the token may
		// have been rotated by someone else (a lost lease, a refresher).
		cur, err := m.store.read(wctx, g.name, g.keys)
		if err != nil {
			return nil, &RefreshError{Grant: g.name, RetryAfter: m.backoff(1), Err: fmt.Errorf("%s, and Redis could not be read to confirm: %w", describe(callErr), err)}
		}
		if cur.V != rec.V || cur.Status != StatusOK {
			m.log.Info("provider rejected a refresh token that Redis had already replaced; using the stored pair", "grant", g.name, "version", cur.V)
			return m.install(g, cur), nil
		}
		reason := "provider rejected the refresh token: " + describe(callErr)
		if in.Attempts > 1 {
			reason += fmt.Sprintf("; an earlier refresh of version %d (by %s at %s) got no answer, so the provider had already spent the token",
				rec.V, in.PreviousHolder, in.StartedAt.UTC().Format(time.RFC3339))
			if lw := m.opts.Provider.ReuseLeeway; lw == 0 {
				reason += fmt.Sprintf(" and provider %q allows no reuse", m.opts.Provider.Name)
			} else {
				reason += fmt.Sprintf(" and its %s reuse leeway had passed", lw)
			}
		}
		ok, err := m.store.markDead(wctx, g.name, g.keys, rec.V, reason)
		if err != nil {
			return nil, &RefreshError{Grant: g.name, RetryAfter: m.backoff(1), Err: fmt.Errorf("%s, and the dead status could not be stored: %w", describe(callErr), err)}
		}
		if !ok {
			return m.reread(wctx, g, need{})
		}
		m.stats.markedDead.Add(1)
		dead := *rec
		dead.Status, dead.Reason = StatusReauthRequired, reason
		m.schedule(wctx, g.name, &dead)
		m.log.Error("grant needs re-consent; every worker now fails fast until it is seeded again", "grant", g.name, "version", rec.V, "reason", reason)
		return m.install(g, &dead), nil
	case failConfig:
		// Every process would get the same answer: back off fleet-wide.
		wait := max(retryAfter, m.backoff(in.Attempts))
		if err := m.store.deferRefresh(wctx, g.name, g.keys, rec.V, m.opts.Now().Add(wait)); err != nil {
			m.log.Warn("could not store the fleet-wide backoff", "grant", g.name, "err", err)
		}
		m.log.Error("provider rejected the client or the request; check the client id, secret and auth style", "grant", g.name, "retry_in", wait, "err", describe(callErr))
		return nil, &RefreshError{Grant: g.name, RetryAfter: wait, Config: true, Err: callErr}
	default:
		wait := retryAfter
		if wait == 0 {
			wait = m.backoff(in.Attempts)
		}
		if err := m.store.deferRefresh(wctx, g.name, g.keys, rec.V, m.opts.Now().Add(wait)); err != nil {
			m.log.Warn("could not store the fleet-wide backoff", "grant", g.name, "err", err)
		}
		m.log.Warn("refresh failed; backing off", "grant", g.name, "version", rec.V, "retry_in", wait, "err", describe(callErr))
		return nil, &RefreshError{Grant: g.name, RetryAfter: wait, Err: callErr}
	}
}

// backoff is exponential in the fleet-wide attempt count, capped.
func (m *Manager) backoff(attempts int64) time.Duration {
	d := time.Second
	for i := int64(1); i < attempts && d < m.opts.MaxBackoff; i++ {
		d *= 2
	}
	return min(d, m.opts.MaxBackoff)
}

// jitter returns a duration in [d/2, d).
func jitter(d time.Duration) time.Duration {
	return d/2 + time.Duration(rand.Int64N(int64(d/2)+1))
}

// reread installs whatever Redis holds now, without refreshing: used where
// the record changed under a lease this flight still holds.
func (m *Manager) reread(ctx context.Context, g *grant, n need) (*entry, error) {
	rec, err := m.readOrRestore(ctx, g)
	if err != nil {
		return m.fallback(g, n, "read", err)
	}
	return m.install(g, rec), nil
}

// waitForChange waits up to d (real time) for a rotation message or a
// different record. It returns the record it last read and whether it
// differs from rec.
func (m *Manager) waitForChange(ctx context.Context, g *grant, rec *record, d time.Duration) (*record, bool) {
	g.mu.Lock()
	changed := g.changed
	g.mu.Unlock()
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
func (m *Manager) awaitRotation(ctx context.Context, g *grant, rec *record, n need) (*entry, error) {
	lockClient := m.opts.Redis
	if len(m.opts.LockRedis) > 0 {
		lockClient = m.opts.LockRedis[0]
	}
	if held, err := lockClient.Exists(ctx, g.keys.lock).Result(); err == nil && held > 0 {
		if cur, changed := m.waitForChange(ctx, g, rec, m.opts.Provider.HTTPTimeout); changed {
			return m.install(g, cur), nil
		}
	}
	return m.install(g, rec), nil
}
