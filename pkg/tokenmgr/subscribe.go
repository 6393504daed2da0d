package tokenmgr

import (
	"context"
	"strconv"
	"strings"
	"time"
)

// Messages says where rotation messages go (Options.Messages).
type Messages int

const (
	// MessagesAuto: sharded on a Redis Cluster of Redis 7 or later, the
	// global channel elsewhere.
	MessagesAuto Messages = iota
	// MessagesGlobal: one channel, tm:rotated, for every grant: every
	// process hears every grant's rotations, and on Cluster every node
	// carries every message. Works everywhere, and with processes of
	// releases from before sharded messages.
	MessagesGlobal
	// MessagesSharded: each grant's own channel, tm:{GRANT}:rotated, with
	// SPUBLISH and SSUBSCRIBE (Redis 7): a process hears only the grants it
	// uses, and on Cluster only the grant's shard carries the message.
	MessagesSharded
)

// chooseMessages decides where rotation messages go, logging the choice
// once.
func (m *Manager) chooseMessages(ctx context.Context) {
	switch m.opts.Messages {
	case MessagesSharded:
		m.store.sharded = true
	case MessagesAuto:
		if !m.store.isCluster() {
			return
		}
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		major, err := m.store.serverMajor(cctx)
		cancel()
		if err != nil || major < 7 {
			m.log.WarnContext(ctx, "rotation messages on the global channel: sharded pub/sub needs Redis 7 (every node carries every message)", "redis_major", major, "err", err)
			return
		}
		m.store.sharded = true
		m.log.InfoContext(ctx, "rotation messages sharded: each grant on its own channel in its slot")
	}
}

// startSubscription listens for rotation messages, and polls versions while
// a subscription is down (invariant 7: staleness bounded by push, with a
// poll as fallback). With sharded messages each grant gets its own
// subscription when it is first used (subscribeGrant).
func (m *Manager) startSubscription() {
	m.goBackground(m.pollLoop)
	if m.subscribe && !m.store.sharded {
		m.goBackground(func() { m.subscribeLoop(nil) })
	}
}

// subscribeGrant starts g's own subscription (sharded messages only).
func (m *Manager) subscribeGrant(g *grantState) {
	if m.subscribe && m.store.sharded {
		m.goBackground(func() { m.subscribeLoop(g) })
	}
}

// healthEvery is how often a subscription is pinged when quiet; two missed
// answers mark it down.
func (m *Manager) healthEvery() time.Duration { return max(m.opts.PollInterval, 500*time.Millisecond) }

// subscribeLoop keeps a subscription up: the global channel when g is nil,
// else g's own.
func (m *Manager) subscribeLoop(g *grantState) {
	for m.base.Err() == nil {
		m.subscribeOnce(g)
		if m.base.Err() != nil {
			return
		}
		m.setSubscribed(g, false)
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
func (m *Manager) subscribeOnce(g *grantState) {
	grant := ""
	if g != nil {
		grant = g.name
	}
	sub := m.store.subscribe(m.base, grant)
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
				m.setSubscribed(g, false)
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
			// lost, so compare versions once; then the subscription
			// counts as up.
			m.pollOnce(g)
			m.setSubscribed(g, true)
		case subAlive:
			m.setSubscribed(g, true)
		case subMessage:
			m.stats.rotationMessages.Add(1)
			m.onMessage(payload)
		}
	}
}

// setSubscribed records whether the global subscription (g nil) or g's own
// is up, logging changes of the global one (per grant, at debug).
func (m *Manager) setSubscribed(g *grantState, up bool) {
	if g != nil {
		if g.subUp.Swap(up) != up {
			m.log.Debug("grant's rotation subscription", "grant", g.name, "up", up)
		}
		return
	}
	if m.subUp.Swap(up) != up {
		if up {
			m.log.Info("rotation subscription up")
		} else {
			m.log.Warn("rotation subscription down; polling versions every PollInterval", "poll_interval", m.opts.PollInterval)
		}
	}
}

// subscribed reports whether g's rotation messages are being received.
func (m *Manager) subscribed(g *grantState) bool {
	if m.store.sharded {
		return g.subUp.Load()
	}
	return m.subUp.Load()
}

// Subscribed reports whether rotation messages are being received for every
// grant in use. While a subscription is down, its grants are polled.
func (m *Manager) Subscribed() bool {
	if !m.store.sharded {
		return m.subUp.Load()
	}
	for _, g := range m.allGrants() {
		if !g.subUp.Load() {
			return false
		}
	}
	return true
}

func (m *Manager) pollLoop() {
	t := time.NewTicker(m.opts.PollInterval)
	defer t.Stop()
	for {
		select {
		case <-m.base.Done():
			return
		case <-t.C:
			var down []*grantState
			for _, g := range m.allGrants() {
				if !m.subscribed(g) {
					down = append(down, g)
				}
			}
			m.pollGrants(down)
		}
	}
}

// pollOnce compares g (every grant when g is nil) with Redis.
func (m *Manager) pollOnce(g *grantState) {
	if g != nil {
		m.pollGrants([]*grantState{g})
		return
	}
	m.pollGrants(m.allGrants())
}

// pollGrants compares each grant's cached entry with the head of its
// record in one round trip, and drops the entries that moved on: a new
// version, a new family, or a status change such as a dead mark that kept
// the version (invariant 6: a polling worker learns of a dead grant too).
func (m *Manager) pollGrants(grants []*grantState) {
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
