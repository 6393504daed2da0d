package tokenmgr

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
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
	rec, held, err := m.readLease(ctx, g)
	if err != nil {
		return m.fallback(g, w, "read", err)
	}
	now := m.opts.Now()
	if w.rejects() && rec.Status == StatusOK && w.rejected == rec.V {
		if m.refuseForced(g, rec, w, now) {
			return m.install(g, rec), nil
		}
		if !m.policy.needsRefresh(rec, w, now) {
			// A 401 on the stored version, too young to force a refresh: a
			// holder is most likely between the provider's rotation (which
			// revoked this token) and its write. Wait for that write.
			return m.awaitRotation(ctx, g, rec)
		}
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
	if held && m.subscribed(g) {
		// Another process holds the lease: its rotation message brings the
		// new record, adopted without a read. Wait for it rather than
		// poll the record or the lease (no herd, invariant 12).
		if cur, ok := m.awaitHolder(ctx, g, rec); ok {
			return m.install(g, cur), nil
		}
	}
	return m.refresh(ctx, g, rec, w)
}

// awaitHolder waits, up to a lease's lifetime (a holder that dies lets its
// lease run out), for the record to move past rec: the holder's message
// installs the new one. A message that carried no record (an older writer,
// a mark) costs one read.
func (m *Manager) awaitHolder(ctx context.Context, g *grantState, rec *record) (*record, bool) {
	m.stats.waitedForHolder.Add(1)
	deadline := time.Now().Add(m.opts.LeaseTTL + m.opts.LockRetry)
	for {
		changed := g.changedChan()
		if n := g.newestRecord(); n != nil && n.newerThan(rec) {
			return n, true
		}
		left := time.Until(deadline)
		if left <= 0 {
			return nil, false
		}
		t := time.NewTimer(left)
		select {
		case <-changed:
		case <-t.C:
		case <-ctx.Done():
		}
		t.Stop()
		if ctx.Err() != nil {
			return nil, false
		}
		if n := g.newestRecord(); n != nil && n.newerThan(rec) {
			return n, true
		}
		if cur, err := m.read(ctx, g); err == nil && differs(rec, cur) {
			return cur, true
		}
	}
}

// refresh spends the refresh token of rec under the grant's lease
// (invariant 2): decide, lease, re-read under the lease, record the intent
// and decide on an earlier attempt's doubt, call the provider, then write
// the new pair fenced or handle the failure.
func (m *Manager) refresh(ctx context.Context, g *grantState, rec *record, w want) (e *entry, err error) {
	ctx, span := m.startSpan(ctx, "tokenmgr.refresh", g, attribute.Int64("tokenmgr.version", rec.V), attribute.String("tokenmgr.want", w.mode.String()))
	defer func() { endRefreshSpan(span, e, err) }()
	if e, err, done := m.backingOff(g, rec, w); done {
		return e, err
	}
	if cur, changed := m.waitOutRestore(ctx, g, rec); changed {
		return m.install(g, cur), nil
	}
	l, e, err := m.takeLease(ctx, g, rec, w)
	if l == nil {
		return e, err
	}
	defer l.releaseUnlessKept(ctx)
	rec, e, err, ok := m.rereadUnderLease(ctx, g, rec, w)
	if !ok {
		return e, err
	}
	in, e, err, ok := m.recordIntent(ctx, g, rec, w, m.opts.Now())
	if !ok {
		return e, err
	}
	if in.inDoubt() {
		if e, err, done := m.decideOnDoubt(ctx, g, l, rec, in, w); done {
			return e, err
		}
	}
	// Spend the token only while the lease is ours: after a long pause
	// here another holder may have taken over.
	if err := l.ensure(ctx, m.opts.LeaseTTL/2); err != nil {
		m.log.WarnContext(ctx, "refresh lease expired before the provider call; not spending the refresh token", "grant", g.name, "err", err)
		return m.reread(ctx, g, w)
	}
	stop := l.keepAlive(ctx, "the provider call and the write of its answer")
	defer stop()
	tok, sentAt, in, e, err, callErr := m.spend(ctx, g, rec, w, in)
	switch {
	case e != nil || err != nil:
		return e, err
	case callErr != nil:
		return m.refreshFailed(ctx, g, rec, in, callErr)
	}
	return m.refreshed(ctx, g, rec, w, tok, sentAt, l)
}

// endRefreshSpan ends a refresh's span with the version it produced.
func endRefreshSpan(span trace.Span, e *entry, err error) {
	if e != nil {
		span.SetAttributes(attribute.Int64("tokenmgr.version.after", e.v))
	}
	endSpan(span, err)
}

// waitOutRestore gives a record that some process restored (after Redis
// lost it) time to be replaced by a newer one: a process with a newer pair
// may not have noticed yet, and spending an old refresh token would be
// reuse.
func (m *Manager) waitOutRestore(ctx context.Context, g *grantState, rec *record) (*record, bool) {
	if !rec.Restored {
		return rec, false
	}
	return m.waitForChange(ctx, g, rec, 2*m.opts.PollInterval+time.Second)
}

// rereadUnderLease reads the record again once the lease is held: nobody
// refreshes a token someone else already rotated. ok is false with what
// the caller gets instead when it moved on or the fleet backs off.
func (m *Manager) rereadUnderLease(ctx context.Context, g *grantState, rec *record, w want) (cur *record, e *entry, err error, ok bool) {
	cur, err = m.read(ctx, g)
	if err != nil {
		e, err = m.fallback(g, w, "read under lease", err)
		return nil, e, err, false
	}
	if m.movedOn(rec, cur, w, m.opts.Now()) {
		return nil, m.install(g, cur), nil, false
	}
	if e, err, done := m.backingOff(g, cur, w); done {
		return nil, e, err, false
	}
	return cur, nil, nil, true
}

// spend presents rec's refresh token to the provider, and again (up to
// retriesInLease times, under the same lease) when it answers a client
// error that is not about the token: Hydra's "retry the request" under
// contention. in comes back with the fleet's attempt count, not counting
// those retries. A non-nil e or err ends the refresh (the record moved on
// meanwhile); else callErr is the last call's error.
func (m *Manager) spend(ctx context.Context, g *grantState, rec *record, w want, in intent) (tok *oauth2.Token, sentAt time.Time, _ intent, e *entry, err error, callErr error) {
	attempts := in.Attempts
	tok, sentAt, callErr = m.callIdP(ctx, g, rec.RefreshToken)
	for retry := 1; callErr != nil && retry <= retriesInLease && retryInLease(callErr); retry++ {
		if e, err, done := m.beforeRetry(ctx, g, rec, w, retry); done {
			return nil, sentAt, in, e, err, nil
		}
		var ok bool
		if in, e, err, ok = m.recordIntent(ctx, g, rec, w, m.opts.Now()); !ok {
			return nil, sentAt, in, e, err, nil
		}
		tok, sentAt, callErr = m.callIdP(ctx, g, rec.RefreshToken)
	}
	in.Attempts = attempts
	return tok, sentAt, in, nil, nil, callErr
}

// refreshed writes the provider's answer as rec's successor, fenced.
func (m *Manager) refreshed(ctx context.Context, g *grantState, rec *record, w want, tok *oauth2.Token, sentAt time.Time, l *lease) (*entry, error) {
	m.stats.refreshes.Add(1)
	g.clearLostAttempt()
	m.noteForced(g, w)
	next := m.nextRecord(ctx, g, rec, tok, sentAt, w)
	if bad := unusableAnswer(next); bad != nil {
		return m.keepRefreshToken(ctx, g, rec, next, sentAt, l, bad)
	}
	g.badAnswers.Store(0)
	return m.write(ctx, g, rec.V, next, l)
}

// unusableAnswer reports why the provider's new access token cannot be sent
// (a line break in it, a token type other than Bearer), or nil.
func unusableAnswer(next *record) error {
	if err := checkTokenType(next.TokenType); err != nil {
		return err
	}
	if err := checkAccessToken(string(next.AccessToken)); err != nil {
		return fmt.Errorf("access token: %w", err)
	}
	return nil
}

// unusableAccess stands in for an access token the provider answered that
// cannot be sent; it is stored expired, so it is never served.
const unusableAccess = "unusable-access-token"

// keepRefreshToken handles a provider answer whose access token cannot be
// used: the provider has rotated, so its new refresh token is the grant's
// only one. It is written with an expired stand-in for the access token, so
// that the next refresh replaces it, and the fleet backs off a growing step
// in case the provider keeps answering so. The caller gets a transient
// error.
func (m *Manager) keepRefreshToken(ctx context.Context, g *grantState, rec, next *record, sentAt time.Time, l *lease, bad error) (*entry, error) {
	next.AccessToken, next.TokenType, next.Expiry = unusableAccess, "Bearer", sentAt
	wait := m.policy.backoff(g.badAnswers.Add(1))
	m.log.ErrorContext(ctx, "provider answered an access token that cannot be used; keeping its new refresh token and refreshing again after a backoff",
		"grant", g.name, "version", rec.V, "retry_in", wait, "err", bad)
	if _, err := m.write(ctx, g, rec.V, next, l); err != nil {
		return nil, err
	}
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), m.opts.Provider.HTTPTimeout)
	defer cancel()
	if e := g.entry.Load(); e != nil && e.v == next.V {
		m.deferFleet(wctx, g, next, wait)
	}
	return nil, &RefreshError{Grant: g.name, RetryAfter: wait, Err: fmt.Errorf("provider answered an unusable token: %w", bad)}
}

// beforeRetry pauses before the retry-th repeat of a refused call, records
// that the token was not spent, and re-reads Redis: done when the record
// moved on (with what the caller gets) or the caller's time ran out.
func (m *Manager) beforeRetry(ctx context.Context, g *grantState, rec *record, w want, retry int) (*entry, error, bool) {
	m.stats.refreshFailures.Add(1)
	if err := m.store.settleIntent(ctx, g.keys, rec.V, rec.Family, m.opts.Holder); err != nil {
		m.log.WarnContext(ctx, "could not record that the refresh token was not spent", "grant", g.name, "err", err)
	}
	t := time.NewTimer(jitter(retryInLeasePause << (retry - 1)))
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
		e, err := m.fallback(g, w, "retry the refresh", ctx.Err())
		return e, err, true
	}
	cur, err := m.read(ctx, g)
	if err != nil {
		e, err := m.fallback(g, w, "read before a retry", err)
		return e, err, true
	}
	if m.movedOn(rec, cur, w, m.opts.Now()) {
		return m.install(g, cur), nil, true
	}
	m.log.InfoContext(ctx, "provider asked to retry the refresh; retrying under the same lease", "grant", g.name, "version", rec.V, "retry", retry)
	return nil, nil, false
}

// movedOn reports whether cur no longer needs the refresh that rec did:
// another holder rotated it, or it died, or it is not due any more.
func (m *Manager) movedOn(rec, cur *record, w want, now time.Time) bool {
	return cur.V != rec.V || cur.Family != rec.Family || cur.Status != StatusOK || !m.policy.needsRefresh(cur, w, now)
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
	ctx, span := m.startSpan(ctx, "tokenmgr.lease_wait", g)
	start := time.Now()
	var moved *record
	l, err := m.leases.acquire(ctx, g.name, g.keys.lock, g.changedChan, func() time.Duration { return m.leasePause(g) }, func() bool {
		if n := g.newestRecord(); n != nil && m.movedOn(rec, n, w, m.opts.Now()) && n.newerThan(rec) {
			moved = n // adopted from the holder's message: no read
			return false
		}
		cur, err := m.read(ctx, g)
		if err == nil && m.movedOn(rec, cur, w, m.opts.Now()) {
			moved = cur
			return false
		}
		return true
	})
	m.opts.Observer.LeaseWait(g.name, time.Since(start), l != nil)
	span.SetAttributes(attribute.Bool("tokenmgr.lease.acquired", l != nil), attribute.Bool("tokenmgr.rotated_elsewhere", moved != nil))
	endSpan(span, nil)
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

// leasePause is how long to wait between attempts at a held lease: with
// the subscription up, until the holder's message (a lease's lifetime at
// most: a dead holder's runs out); without it, a jittered LockRetry.
func (m *Manager) leasePause(g *grantState) time.Duration {
	if m.subscribed(g) {
		return m.opts.LeaseTTL
	}
	return jitter(m.opts.LockRetry)
}

// recordIntent journals, before the provider call, that this holder is
// about to spend rec's refresh token (invariant 4), and learns whether an
// earlier attempt may have spent it. ok is false when the record moved on
// underneath, with what the caller gets instead.
func (m *Manager) recordIntent(ctx context.Context, g *grantState, rec *record, w want, now time.Time) (in intent, e *entry, err error, ok bool) {
	in, ok, err = m.store.beginRefresh(ctx, g.keys, rec.V, rec.Family, m.opts.Holder, now, intentTTL)
	if err != nil || !ok {
		if err != nil && !errors.Is(err, errMissing) {
			e, err = m.fallback(g, w, "record refresh intent", err)
			return in, e, err, false
		}
		e, err = m.reread(ctx, g, w) // the record moved on between two reads
		return in, e, err, false
	}
	return in, nil, nil, true
}

// decideOnDoubt decides what to do with a refresh token that an earlier
// attempt may have spent without its answer reaching Redis (invariant 10).
// It presents the token again (done false) only when that cannot revoke a
// live pair: inside the provider's reuse leeway, with a whole call to
// spare, or, for a provider with no leeway, when the earlier attempt was
// this process's own and its answer is known lost. Otherwise the earlier
// holder may still hold the answer: it waits, lease kept, for that holder's
// write, and when none comes marks the grant for re-consent as an answer
// lost, without calling the provider.
func (m *Manager) decideOnDoubt(ctx context.Context, g *grantState, l *lease, rec *record, in intent, w want) (*entry, error, bool) {
	now := m.opts.Now()
	lw := m.opts.Provider.ReuseLeeway
	own := in.DoubtHolder == m.opts.Holder && g.lostAttemptWas(rec)
	args := []any{"grant", g.name, "version", rec.V, "earlier_holder", in.DoubtHolder, "since", in.DoubtSince, "attempt", in.Attempts}
	switch {
	case lw > 0 && now.Add(m.opts.Provider.HTTPTimeout).Before(in.DoubtSince.Add(lw)):
		m.log.WarnContext(ctx, "an earlier refresh of this version may have spent the refresh token; replaying it inside the provider's reuse leeway", args...)
		return nil, nil, false
	case lw == 0 && own:
		m.log.WarnContext(ctx, "this process's earlier refresh of this version got no answer; presenting the refresh token again", args...)
		return nil, nil, false
	}
	if !own {
		if cur, changed := m.awaitHeldWrite(ctx, g, l, rec, in); changed {
			return m.install(g, cur), nil, true
		}
		if ctx.Err() != nil {
			e, err := m.fallback(g, w, "wait for an earlier holder's answer", fmt.Errorf("holder %s may still hold the answer: %w", in.DoubtHolder, ctx.Err()))
			return e, err, true
		}
	}
	e, err := m.answerLost(ctx, g, rec, in)
	return e, err, true
}

// heldWriteWait is how long after an in-doubt attempt started its holder
// may still write the answer it holds: its call, then a lease's worth of
// retries. A holder that still has the answer and reaches the lock servers
// keeps the lease, so a successor only gets here when it did not.
func (m *Manager) heldWriteWait() time.Duration {
	return m.opts.Provider.HTTPTimeout + m.opts.LeaseTTL
}

// awaitHeldWrite waits, keeping the lease, until the earlier holder of an
// in-doubt attempt writes its answer (the record moves on) or
// heldWriteWait after the attempt passes.
func (m *Manager) awaitHeldWrite(ctx context.Context, g *grantState, l *lease, rec *record, in intent) (*record, bool) {
	stop := l.keepAlive(ctx, "the wait for an earlier holder's answer")
	defer stop()
	deadline := in.DoubtSince.Add(m.heldWriteWait())
	m.log.WarnContext(ctx, "an earlier refresh of this version may have spent the refresh token and its holder may still hold the answer; waiting for its write",
		"grant", g.name, "version", rec.V, "earlier_holder", in.DoubtHolder, "since", in.DoubtSince, "until", deadline)
	for {
		left := deadline.Sub(m.opts.Now())
		if left <= 0 || ctx.Err() != nil {
			return rec, false
		}
		if cur, changed := m.waitForChange(ctx, g, rec, min(left, m.opts.PollInterval)); changed {
			return cur, true
		}
	}
}

// answerLost marks the grant for re-consent because an answer that may
// have rotated its refresh token never reached Redis. The mark keeps the
// version: if the earlier holder still holds the answer, its fenced write
// revives the grant.
func (m *Manager) answerLost(ctx context.Context, g *grantState, rec *record, in intent) (*entry, error) {
	reason := fmt.Sprintf("an earlier refresh of version %d by %s at %s may have spent the refresh token, and its answer never reached Redis; ",
		rec.V, in.DoubtHolder, in.DoubtSince.UTC().Format(time.RFC3339))
	if lw := m.opts.Provider.ReuseLeeway; lw == 0 {
		reason += fmt.Sprintf("provider %q allows no reuse, so the token was not presented again", m.opts.Provider.Name)
	} else {
		reason += fmt.Sprintf("the provider's %s reuse leeway has passed, so the token was not presented again", lw)
	}
	reason += "; if that holder still holds the answer, its write revives the grant"
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), m.opts.Provider.HTTPTimeout)
	defer cancel()
	ok, err := m.store.markLost(wctx, g.name, g.keys, rec.V, rec.Family, reason)
	if err != nil {
		return nil, &StoreError{Grant: g.name, Op: "mark a lost answer", Err: err}
	}
	if !ok {
		return m.reread(wctx, g, want{})
	}
	m.stats.answersLost.Add(1)
	dead := *rec
	dead.Status, dead.Reason = StatusReauthRequired, reason
	m.schedule(wctx, g.name, &dead)
	m.log.ErrorContext(ctx, "grant needs re-consent: an answer that may have rotated its refresh token was lost", "grant", g.name, "version", rec.V, "reason", reason)
	return m.install(g, &dead), nil
}

// callIdP spends a refresh token. It is not cancelled by the caller or by
// Close: once the request may have reached the provider, its answer is the
// only copy of the new refresh token. HTTPTimeout bounds it. sentAt is
// when the request left, on the Manager's clock: expires_in counts from
// the provider's issue, which is no earlier (invariant 12).
func (m *Manager) callIdP(ctx context.Context, g *grantState, rt secret) (tok *oauth2.Token, sentAt time.Time, err error) {
	ctx, span := m.startSpan(context.WithoutCancel(ctx), "tokenmgr.provider_call", g, attribute.String("tokenmgr.provider", m.opts.Provider.Name))
	ctx, cancel := context.WithTimeout(ctx, m.opts.Provider.HTTPTimeout)
	defer cancel()
	hc := &http.Client{Transport: m.opts.IdPTransport, Timeout: m.opts.Provider.HTTPTimeout, CheckRedirect: refuseRedirect}
	ctx = context.WithValue(ctx, oauth2.HTTPClient, hc)
	sentAt = m.opts.Now()
	start := time.Now()
	tok, err = m.oauth.TokenSource(ctx, &oauth2.Token{RefreshToken: string(rt)}).Token()
	if class, _ := classify(err, time.Now()); err != nil && class == failConfig && m.previous != nil {
		// The client secret is being rotated and the provider still has
		// the previous one: refused clients are refused before the
		// refresh token is looked at, so presenting it again is safe.
		if tok2, err2 := m.previous.TokenSource(ctx, &oauth2.Token{RefreshToken: string(rt)}).Token(); err2 == nil {
			m.stats.secretFallbacks.Add(1)
			m.log.WarnContext(ctx, "the provider accepted only the previous client secret; finish rotating the secret there", "grant", g.name)
			tok, err = tok2, nil
		}
	}
	outcome := outcomeOf(err)
	m.opts.Observer.ProviderCall(g.name, time.Since(start), outcome)
	span.SetAttributes(attribute.String("tokenmgr.outcome", outcome))
	endSpan(span, err)
	return tok, sentAt, err
}

// RedirectError reports a token endpoint that answered with a redirect. It
// is not followed: following it would send the refresh token and the client
// secret to another address. A configuration error: fix the token URL.
type RedirectError struct {
	Location string // bounded and printable
}

func (e *RedirectError) Error() string {
	return "tokenmgr: the token endpoint redirected to " + e.Location + "; not followed (it would re-send the refresh token and the client secret): set the token URL to the endpoint itself"
}

func refuseRedirect(req *http.Request, _ []*http.Request) error {
	return &RedirectError{Location: printable(req.URL.String(), maxStoredNote/2)}
}

// nextRecord turns the provider's answer into the successor of rec.
func (m *Manager) nextRecord(ctx context.Context, g *grantState, rec *record, tok *oauth2.Token, sentAt time.Time, w want) *record {
	now := m.opts.Now()
	next := recordFromToken(tok, now, m.opts.Holder, m.opts.Provider)
	next.V = rec.V + 1
	next.Family = rec.Family
	next.RefreshCount = rec.RefreshCount + 1
	next.AbsoluteExpiry = rec.AbsoluteExpiry
	if w.mode == wantNewer {
		next.Forced401 = w.reason
	}
	if next.Scope == "" {
		next.Scope = rec.Scope
	}
	if next.RefreshToken == "" || next.RefreshToken == rec.RefreshToken {
		next.RefreshToken = rec.RefreshToken
		if m.opts.Provider.Rotates {
			m.log.InfoContext(ctx, "provider response carried no new refresh token; keeping the previous one", "grant", g.name, "version", rec.V)
		}
	}
	// The lifetime from expires_in, counted from when the request left
	// (x/oauth2 counts from the answer, on the wall clock, which an
	// injected clock ignores): a slow answer must not stretch it.
	var ttl time.Duration
	switch {
	case tok.ExpiresIn != 0:
		ttl = time.Duration(tok.ExpiresIn) * time.Second
	case !tok.Expiry.IsZero():
		ttl = time.Until(tok.Expiry)
	default:
		ttl = m.opts.Provider.DefaultAccessTTL
		m.log.WarnContext(ctx, "provider response had no expires_in; assuming the provider default", "grant", g.name, "assumed_ttl", ttl)
	}
	if clamped, changed := clampAccessTTL(ttl); changed {
		m.log.WarnContext(ctx, "provider gave an access token lifetime out of bounds; clamped", "grant", g.name, "given", ttl, "used", clamped, "min", minAccessTTL, "max", maxAccessTTL)
		ttl = clamped
	}
	next.Expiry = sentAt.Add(ttl)
	return next
}

// read reads the grant's record and repairs a store that went back in time
// (invariants 4 and 9): when the record is missing, or older than the newest
// record this process holds (a restart without persistence, a failover to a
// replica that missed the last writes), it restores that newest record with
// a fenced write, and never obeys the older one.
func (m *Manager) read(ctx context.Context, g *grantState) (*record, error) {
	rec, _, err := m.readLease(ctx, g)
	return rec, err
}

// readLease is read, also reporting whether the grant's lease is held (known
// only when the lease lives in the store's Redis: no Options.LockRedis).
func (m *Manager) readLease(ctx context.Context, g *grantState) (*record, bool, error) {
	m.stats.reads.Add(1)
	rec, held, err := m.store.readWithLease(ctx, g.name, g.keys, len(m.opts.LockRedis) == 0)
	newest := g.newestRecord()
	missing := errors.Is(err, errMissing)
	var lost *tokensLostError
	tokensLost := errors.As(err, &lost)
	switch {
	case missing && newest == nil:
		return nil, held, &NotFoundError{Grant: g.name}
	case missing:
		rec = nil
	case tokensLost && newest != nil && !lost.meta.newerThan(newest):
		rec = lost.meta // this process holds the pair the record lost, or a newer one
	case err == nil && newest != nil && newest.newerThan(rec):
	default:
		if tokensLost && g.lostAnnounced.Swap(lost.meta.V) != lost.meta.V {
			// Ask whoever holds the pair to put it back now, rather than
			// at its next due read (once per version: no storm).
			if aerr := m.store.announceLostTokens(ctx, g.name, lost.meta.V); aerr != nil {
				m.log.DebugContext(ctx, "could not announce the lost tokens", "grant", g.name, "err", aerr)
			}
		}
		return rec, held, err
	}
	rctx, span := m.startSpan(ctx, "tokenmgr.restore", g, attribute.Int64("tokenmgr.version", newest.V), attribute.Bool("tokenmgr.record_missing", rec == nil))
	written, err := m.store.restore(rctx, g.name, g.keys, newest)
	span.SetAttributes(attribute.Bool("tokenmgr.restored", written))
	endSpan(span, err)
	if err != nil {
		return nil, held, err
	}
	if written {
		m.schedule(ctx, g.name, newest)
		switch {
		case rec == nil:
			m.stats.restores.Add(1)
			m.log.WarnContext(ctx, "grant record was missing from Redis; restored it from this process's newest pair", "grant", g.name, "version", newest.V)
		case tokensLost:
			m.stats.restores.Add(1)
			m.log.WarnContext(ctx, "grant record in Redis had lost its tokens (its pair key gone?); restored them from this process's newest pair", "grant", g.name, "stored_version", rec.V, "restored_version", newest.V)
		default:
			m.stats.rollbacksRepaired.Add(1)
			m.log.WarnContext(ctx, "grant record in Redis is older than the pair this process holds (a failover that lost writes?); restored the newer pair instead of spending the old one",
				"grant", g.name, "stored_version", rec.V, "restored_version", newest.V)
		}
	}
	rec, held, err = m.store.readWithLease(ctx, g.name, g.keys, len(m.opts.LockRedis) == 0)
	if errors.Is(err, errMissing) {
		return nil, held, &NotFoundError{Grant: g.name}
	}
	return rec, held, err
}

// fallback decides what a caller gets when Redis failed: the cached token
// while it is still valid (cached tokens keep serving through a Redis
// outage), else a clear error. A corrupt record's error is served from the
// cache for a while, so that it costs no read per request (invariant 12).
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
		m.installCorrupt(g, err)
		return nil, err
	}
	return nil, &StoreError{Grant: g.name, Op: op, Err: err}
}

// reread installs whatever Redis holds now, without refreshing: used where
// the record changed under a lease this flight still holds.
func (m *Manager) reread(ctx context.Context, g *grantState, w want) (*entry, error) {
	rec, err := m.read(ctx, g)
	if err != nil {
		return m.fallback(g, w, "read", err)
	}
	return m.install(g, rec), nil
}

// waitForChange waits up to d (real time) for a rotation message or a
// different record. It returns the record it last read and whether it
// differs from rec. The message channel is taken before the wait, so a
// message that arrives between the caller's read and this wait is not
// missed (invariant 12).
func (m *Manager) waitForChange(ctx context.Context, g *grantState, rec *record, d time.Duration) (*record, bool) {
	changed := g.changedChan()
	if cur, err := m.read(ctx, g); err == nil && differs(rec, cur) {
		return cur, true
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-changed:
	case <-t.C:
	case <-ctx.Done():
	}
	cur, err := m.read(ctx, g)
	if err != nil {
		return rec, false
	}
	return cur, differs(rec, cur)
}

// differs reports whether cur is another state of the grant than rec.
func differs(rec, cur *record) bool {
	return cur.V != rec.V || cur.Family != rec.Family || cur.Status != rec.Status || cur.Restored != rec.Restored
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

// refuseForced reports whether a 401 on rec's version must not force a
// refresh (invariant 12): the version was itself produced by a refresh
// that a 401 with the same challenge forced, so this 401 is the API's
// answer, not a stale token; or forced refreshes of the grant are backing
// off while 401s persist. Rotate (wantForced) is never refused.
func (m *Manager) refuseForced(g *grantState, rec *record, w want, now time.Time) bool {
	if w.mode != wantNewer {
		return false
	}
	if (rec.Forced401 != "" && rec.Forced401 == w.reason) || now.UnixNano() < g.forcedNotBefore.Load() {
		m.stats.forced401Refused.Add(1)
		return true
	}
	return false
}

// noteForced starts the next backoff step after a refresh a 401 forced.
func (m *Manager) noteForced(g *grantState, w want) {
	if w.mode == wantNewer {
		g.forcedNotBefore.Store(m.opts.Now().Add(forcedBackoff(g.forcedStreak.Add(1))).UnixNano())
	}
}
