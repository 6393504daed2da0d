package tokenmgr

import (
	"context"
	"strconv"
	"strings"
	"time"
)

// startSubscription listens for rotation messages, and polls versions while
// the subscription is down (invariant 7: staleness bounded by push, with a
// poll as fallback).
func (m *Manager) startSubscription() {
	m.goBackground(m.pollLoop)
	if m.subscribe {
		m.goBackground(m.subscribeLoop)
	}
}

// healthEvery is how often the subscription is pinged when quiet; two
// missed answers mark it down.
func (m *Manager) healthEvery() time.Duration { return max(m.opts.PollInterval, 500*time.Millisecond) }

func (m *Manager) subscribeLoop() {
	for m.base.Err() == nil {
		m.subscribeOnce()
		if m.base.Err() != nil {
			return
		}
		m.setSubscribed(false)
		select {
		case <-m.base.Done():
		case <-time.After(jitter(min(m.opts.PollInterval, time.Second))):
		}
	}
}

// subscribeOnce runs one subscription until it fails or goes quiet. A
// half-open connection only ever times out, and a PING just fills the
// socket buffer, so a subscription that has not answered for three health
// intervals is closed and made anew.
func (m *Manager) subscribeOnce() {
	sub := m.store.subscribe(m.base)
	stop := context.AfterFunc(m.base, sub.close) // unblocks receive at Close
	defer func() {
		stop()
		sub.close()
	}()
	lastHeard := time.Now()
	for {
		ev, payload := sub.receive(m.base, m.healthEvery())
		if m.base.Err() != nil {
			return
		}
		switch ev {
		case subFailed:
			return
		case subQuiet:
			quiet := time.Since(lastHeard)
			if quiet > 2*m.healthEvery() {
				m.setSubscribed(false)
			}
			if quiet > 3*m.healthEvery() {
				return
			}
			sub.ping(m.base)
			continue
		}
		lastHeard = time.Now()
		switch ev {
		case subSubscribed:
			// (Re)subscribed: messages sent while we were away are
			// lost, so compare versions once.
			m.setSubscribed(true)
			m.pollOnce()
		case subAlive:
			m.setSubscribed(true)
		case subMessage:
			m.stats.rotationMessages.Add(1)
			m.onMessage(payload)
		}
	}
}

func (m *Manager) setSubscribed(up bool) {
	if m.subUp.Swap(up) != up {
		if up {
			m.log.Info("rotation subscription up")
		} else {
			m.log.Warn("rotation subscription down; polling versions every PollInterval", "poll_interval", m.opts.PollInterval)
		}
	}
}

// Subscribed reports whether rotation messages are being received. While
// false, versions are polled.
func (m *Manager) Subscribed() bool { return m.subUp.Load() }

func (m *Manager) pollLoop() {
	t := time.NewTicker(m.opts.PollInterval)
	defer t.Stop()
	for {
		select {
		case <-m.base.Done():
			return
		case <-t.C:
			if !m.subUp.Load() {
				m.pollOnce()
			}
		}
	}
}

// pollOnce compares every cached entry with the head of its record in one
// round trip, and drops the entries that moved on: a new version, a new
// family, or a status change such as a dead mark that kept the version
// (invariant 6: a polling worker learns of a dead grant too).
func (m *Manager) pollOnce() {
	grants := m.allGrants()
	if len(grants) == 0 {
		return
	}
	names := make([]string, len(grants))
	for i, g := range grants {
		names[i] = g.name
	}
	ctx, cancel := context.WithTimeout(m.base, m.opts.PollInterval)
	defer cancel()
	heads := m.store.readHeads(ctx, names)
	for i, g := range grants {
		h := heads[i]
		if h.failed {
			continue // this grant's read failed: keep what we have
		}
		e := g.entry.Load()
		if e == nil {
			continue
		}
		if e.v != h.v || e.family != h.family || e.dead != (h.status == StatusReauthRequired) {
			m.invalidate(g, h.v, true)
		}
	}
}

// onMessage handles "GRANT VERSION m1 RECORD" (a write that carries its
// record), "GRANT VERSION reauth_required" and "GRANT VERSION" (from older
// writers).
func (m *Manager) onMessage(payload string) {
	name, rest, ok := strings.Cut(payload, " ")
	if !ok {
		return
	}
	vs, tail, _ := strings.Cut(rest, " ")
	v, err := strconv.ParseInt(vs, 10, 64)
	if err != nil {
		return
	}
	g := m.lookup(name)
	if g == nil {
		return
	}
	if body, ok := strings.CutPrefix(tail, messagePrefix); ok && m.adopt(g, v, body) {
		return
	}
	m.invalidate(g, v, tail != "")
}

// adopt installs the record a rotation message carries, without reading
// Redis (invariant 2's followers, at no cost to Redis). It declines, and
// the caller reads instead, when the record does not open, or when it is
// not the next version of the entry's family (a message was missed: what
// came between is read).
func (m *Manager) adopt(g *grantState, v int64, body string) bool {
	rec, err := decodeMessage(g.name, body, m.store.sealer)
	if err != nil || rec.V != v {
		m.log.Debug("rotation message not adopted; reading the record", "grant", g.name, "version", v, "err", err)
		return false
	}
	e := g.entry.Load()
	switch {
	case e != nil && e.err == nil && e.family == rec.Family && e.v == rec.V:
		g.announced.Store(v) // our own write, installed already
		g.wake()
		return true
	case e != nil && e.err == nil && e.family == rec.Family && rec.V != e.v+1:
		return false
	}
	g.announced.Store(v)
	m.install(g, rec)
	m.stats.adopted.Add(1)
	g.wake()
	return true
}

// invalidate wakes waiters and drops a cached entry that is not version v
// (or that v's status changed), then reloads it in the background so the
// next caller finds it ready.
func (m *Manager) invalidate(g *grantState, v int64, statusChanged bool) {
	g.announced.Store(v)
	g.wake()
	e := g.entry.Load()
	if e == nil || (e.v == v && !statusChanged) {
		return // our own write, already installed
	}
	if !g.entry.CompareAndSwap(e, nil) {
		return
	}
	m.goBackground(func() {
		ctx, cancel := context.WithTimeout(m.base, m.opts.WaitTimeout)
		defer cancel()
		_, _ = m.obtain(ctx, g, want{})
	})
}
