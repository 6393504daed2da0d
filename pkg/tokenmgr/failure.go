package tokenmgr

import (
	"context"
	"fmt"
	"time"
)

// refreshFailed handles a provider error (invariants 5, 6 and 10): the
// intent learns whether the token may be spent; a refused refresh token is
// re-checked against Redis before the grant is declared dead; a rejected
// client or a transient failure backs the fleet off.
func (m *Manager) refreshFailed(ctx context.Context, g *grantState, rec *record, in intent, callErr error) (*entry, error) {
	m.stats.refreshFailures.Add(1)
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), m.opts.Provider.HTTPTimeout)
	defer cancel()
	if definiteAnswer(callErr) {
		// The token was not spent by this attempt: a later one presents
		// it without doubt.
		g.clearLostAttempt()
		if err := m.store.settleIntent(wctx, g.keys, rec.V, rec.Family, m.opts.Holder); err != nil {
			m.log.WarnContext(ctx, "could not record that the refresh token was not spent", "grant", g.name, "err", err)
		}
	} else {
		// No answer: the provider may have rotated, and the answer is
		// lost. Only this process knows that for sure.
		g.setLostAttempt(rec)
	}
	class, retryAfter := classify(callErr, time.Now())
	if retryAfter > maxRetryAfter {
		m.log.WarnContext(ctx, "provider asked to wait longer than the bound; clamped", "grant", g.name, "retry_after", retryAfter, "used", maxRetryAfter)
		retryAfter = maxRetryAfter
	}
	switch class {
	case failDead:
		return m.refreshTokenRefused(wctx, g, rec, in, callErr)
	case failConfig:
		// Every process would get the same answer: back off fleet-wide.
		wait := max(retryAfter, m.policy.backoff(in.Attempts))
		m.deferFleet(wctx, g, rec, wait)
		m.log.ErrorContext(ctx, "provider rejected the client or the request; check the client id, secret and auth style", "grant", g.name, "retry_in", wait, "err", describe(callErr))
		return nil, &RefreshError{Grant: g.name, RetryAfter: wait, Config: true, Err: callErr}
	default:
		wait := retryAfter
		if wait == 0 {
			wait = m.policy.backoff(in.Attempts)
		}
		m.deferFleet(wctx, g, rec, wait)
		m.log.WarnContext(ctx, "refresh failed; backing off", "grant", g.name, "version", rec.V, "retry_in", wait, "err", describe(callErr))
		return nil, &RefreshError{Grant: g.name, RetryAfter: wait, Err: callErr}
	}
}

// deferFleet stores a fleet-wide "not before now+wait" on rec's version.
func (m *Manager) deferFleet(ctx context.Context, g *grantState, rec *record, wait time.Duration) {
	if err := m.store.deferRefresh(ctx, g.name, g.keys, rec.V, rec.Family, m.opts.Now().Add(wait)); err != nil {
		m.log.WarnContext(ctx, "could not store the fleet-wide backoff", "grant", g.name, "err", err)
	}
}

// refreshTokenRefused handles invalid_grant: unless Redis moved on (the
// token was rotated by someone else: a lost lease, a refresher), the grant
// is marked for re-consent, with the reason, for every worker to fail fast.
// The mark takes a new version, so that no held pair of the revoked family
// can overwrite it (invariant 10).
func (m *Manager) refreshTokenRefused(ctx context.Context, g *grantState, rec *record, in intent, callErr error) (*entry, error) {
	cur, err := m.read(ctx, g)
	if err != nil {
		return nil, &RefreshError{Grant: g.name, RetryAfter: m.policy.backoff(1), Err: fmt.Errorf("%s, and Redis could not be read to confirm: %w", describe(callErr), err)}
	}
	if cur.V != rec.V || cur.Family != rec.Family || cur.Status != StatusOK {
		m.log.InfoContext(ctx, "provider rejected a refresh token that Redis had already replaced; using the stored pair", "grant", g.name, "version", cur.V)
		return m.install(g, cur), nil
	}
	reason := "provider rejected the refresh token: " + describe(callErr)
	if in.inDoubt() {
		reason += fmt.Sprintf("; an earlier refresh of version %d (by %s at %s) got no answer, so the provider had already spent the token",
			rec.V, in.DoubtHolder, in.DoubtSince.UTC().Format(time.RFC3339))
		if lw := m.opts.Provider.ReuseLeeway; lw == 0 {
			reason += fmt.Sprintf(" and provider %q allows no reuse", m.opts.Provider.Name)
		} else {
			reason += fmt.Sprintf(" and its %s reuse leeway had passed", lw)
		}
	}
	nv, err := m.store.markDead(ctx, g.name, g.keys, rec.V, rec.Family, reason)
	if err != nil {
		return nil, &RefreshError{Grant: g.name, RetryAfter: m.policy.backoff(1), Err: fmt.Errorf("%s, and the dead status could not be stored: %w", describe(callErr), err)}
	}
	if nv == 0 {
		return m.reread(ctx, g, want{})
	}
	m.stats.markedDead.Add(1)
	dead := *rec
	dead.V, dead.Status, dead.Reason, dead.Refused = nv, StatusReauthRequired, reason, true
	m.schedule(ctx, g.name, &dead)
	m.log.ErrorContext(ctx, "grant needs re-consent; every worker now fails fast until it is seeded again", "grant", g.name, "version", rec.V, "reason", reason)
	return m.install(g, &dead), nil
}
