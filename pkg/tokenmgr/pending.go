package tokenmgr

import (
	"context"
	"time"

	"go.opentelemetry.io/otel/attribute"
)

// heldWrite is a rotated pair the provider gave us, on its way to Redis.
type heldWrite struct {
	fromV int64
	rec   *record
	// lease is the refresh lease, kept alive while the pair is held so
	// that no successor presents the spent refresh token while this
	// process holds the only copy of its answer (invariant 10). Released
	// once the pair is written.
	lease   *lease
	written bool // guarded by grantState.flushMu
}

func (g *grantState) heldPair() *heldWrite {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.held
}

// write stores next as the successor of fromV. Redis failing does not lose
// the pair (invariant 4): it is installed, served, and written later by a
// flusher, which keeps l alive meanwhile.
func (m *Manager) write(ctx context.Context, g *grantState, fromV int64, next *record, l *lease) (*entry, error) {
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), m.opts.Provider.HTTPTimeout)
	defer cancel()
	wctx, span := m.startSpan(wctx, "tokenmgr.write", g, attribute.Int64("tokenmgr.version.from", fromV))
	p := &heldWrite{fromV: fromV, rec: next}
	err := m.flushHeld(wctx, g, p)
	span.SetAttributes(attribute.Bool("tokenmgr.held", err != nil))
	endSpan(span, err)
	if err != nil {
		p.lease = l
		l.keep()
		g.mu.Lock()
		g.held = p
		g.mu.Unlock()
		m.stats.pendingWrites.Add(1)
		m.log.ErrorContext(ctx, "Redis refused the rotated pair; holding it, with the refresh lease, and retrying", "grant", g.name, "from_version", fromV, "err", err)
		e := m.install(g, next)
		m.startFlusher(g, p)
		return e, nil
	}
	if e := g.entry.Load(); e != nil {
		return e, nil
	}
	return m.update(ctx, g, want{})
}

// flushHeld writes p fenced and installs what Redis then holds. It returns
// an error only when Redis could not be reached.
func (m *Manager) flushHeld(ctx context.Context, g *grantState, p *heldWrite) error {
	g.flushMu.Lock()
	defer g.flushMu.Unlock()
	if p.written {
		return nil // another caller flushed it meanwhile
	}
	res, v, counted, err := m.store.rotate(ctx, g.name, g.keys, p.fromV, p.rec)
	if err != nil {
		return err
	}
	restored := false
	if res == casMissing {
		// Restored before the pair counts as written: Redis failing now
		// leaves it held, with its lease, and the flusher tries again.
		rec := *p.rec // p.rec is installed: other goroutines read it
		rec.V = p.fromV + 1
		if restored, err = m.store.restore(ctx, g.name, g.keys, &rec); err != nil {
			return err
		}
	}
	if res == casWritten && !counted && !m.warnedUncounted.Swap(true) {
		m.log.WarnContext(ctx, "rotation written but not counted for operators: the Redis user lacks ZREMRANGEBYSCORE (see the README's ACL rules); dashboards show the last hour's rotations as unknown",
			"grant", g.name)
	}
	p.written = true
	g.mu.Lock()
	if g.held == p {
		g.held = nil
	}
	g.mu.Unlock()
	if p.lease != nil {
		p.lease.release(ctx)
	}
	switch res {
	case casWritten:
		// A copy: p.rec was installed while held, and other goroutines
		// read it.
		rec := *p.rec
		rec.V = v
		m.install(g, &rec)
		m.schedule(ctx, g.name, &rec)
		return nil
	case casConflict:
		// The refused pair was installed while held: serve it no more
		// (it may be a family the provider revoked) while the stored
		// record is read.
		g.entry.Store(nil)
		m.log.WarnContext(ctx, "fenced write refused: another holder stored a newer pair, or the grant was marked or seeded, while this refresh was in flight; the stored record stands",
			"grant", g.name, "from_version", p.fromV, "stored_version", v)
		// Counted once what Redis holds is in place: whoever sees the
		// count (Stats, the tests) sees the outcome too.
		defer m.stats.writeConflicts.Add(1)
	case casMissing:
		if restored {
			m.log.WarnContext(ctx, "grant record was missing from Redis when writing a rotated pair; restored it", "grant", g.name, "version", p.fromV+1)
			defer m.stats.restores.Add(1)
		}
	}
	rec, err := m.read(ctx, g)
	if err != nil {
		g.entry.Store(nil) // next caller reads again
		return nil
	}
	m.install(g, rec)
	return nil
}

// startFlusher retries a held pair until Redis takes it or the Manager
// closes (Close makes the last attempt), keeping the lease alive meanwhile.
func (m *Manager) startFlusher(g *grantState, p *heldWrite) {
	m.goBackground(func() {
		stop := p.lease.keepAlive(m.base, "holding a rotated pair Redis refused")
		defer stop()
		wait := 100 * time.Millisecond
		for {
			select {
			case <-m.base.Done():
				return
			case <-time.After(jitter(wait)):
			}
			if g.heldPair() != p {
				return
			}
			ctx, cancel := context.WithTimeout(m.base, m.opts.Provider.HTTPTimeout)
			err := m.flushHeld(ctx, g, p)
			cancel()
			if err == nil {
				m.log.InfoContext(ctx, "held rotated pair written to Redis", "grant", g.name, "from_version", p.fromV)
				return
			}
			wait = min(2*wait, 5*time.Second)
		}
	})
}
