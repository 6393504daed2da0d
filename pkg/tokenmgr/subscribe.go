package tokenmgr

import (
	"context"
	"strconv"
	"strings"
	"sync"
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
// once. Admin and Manager both choose: an Admin's seed must reach the
// channel the Managers listen on.
func (c *core) chooseMessages(ctx context.Context) {
	switch c.opts.Messages {
	case MessagesSharded:
		c.store.sharded = true
	case MessagesAuto:
		if !c.store.isCluster() {
			return
		}
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		major, err := c.store.serverMajor(cctx)
		cancel()
		if err != nil || major < 7 {
			c.log.WarnContext(ctx, "rotation messages on the global channel: sharded pub/sub needs Redis 7 (every node carries every message)", "redis_major", major, "err", err)
			return
		}
		c.store.sharded = true
		c.log.InfoContext(ctx, "rotation messages sharded: each grant on its own channel in its slot")
	}
}

// startSubscription listens for rotation messages, and polls versions while
// a subscription is down (invariant 7: staleness bounded by push, with a
// poll as fallback). With sharded messages each grant joins its server's
// subscription when it is first used (subscribeGrant).
func (m *Manager) startSubscription() {
	m.goBackground(m.pollLoop)
	if m.subscribe && !m.store.sharded {
		m.goBackground(m.globalLoop)
	}
}

// healthEvery is how often a subscription is pinged when quiet; two missed
// answers mark it down.
func (m *Manager) healthEvery() time.Duration { return max(m.opts.PollInterval, 500*time.Millisecond) }

// resubscribeAfter is the pause before a failed subscription is made anew.
func (m *Manager) resubscribeAfter() time.Duration {
	return jitter(min(m.opts.PollInterval, time.Second))
}

// globalLoop keeps the global channel's subscription up.
func (m *Manager) globalLoop() {
	for m.base.Err() == nil {
		m.listen(m.store.subscribe(m.base), listener{
			subscribed: func(string) {
				// Messages sent while we were away are lost: compare
				// every grant once, then count as up.
				m.pollOnce(nil)
				m.setSubscribed(nil, true)
			},
			alive: func() { m.setSubscribed(nil, true) },
			down:  func() { m.setSubscribed(nil, false) },
		})
		if m.base.Err() != nil {
			return
		}
		m.setSubscribed(nil, false)
		select {
		case <-m.base.Done():
		case <-time.After(m.resubscribeAfter()):
		}
	}
}

// listener is what a subscription's events do.
type listener struct {
	subscribed func(channel string) // a channel's subscription is confirmed
	alive      func()               // the connection answered
	down       func()               // the connection went quiet
}

// listen runs one subscription until it fails or goes quiet. A half-open
// connection only ever times out, and a PING just fills the socket
// buffer, so a subscription that has not answered for three health
// intervals is closed (and made anew by the caller).
func (m *Manager) listen(sub *subscription, l listener) {
	stop := context.AfterFunc(m.base, sub.close) // unblocks receive at Close
	defer func() {
		stop()
		sub.close()
	}()
	lastHeard := time.Now()
	for {
		ev, payload, channel := sub.receive(m.base, m.healthEvery())
		if m.base.Err() != nil {
			return
		}
		switch ev {
		case subFailed:
			return
		case subQuiet:
			quiet := time.Since(lastHeard)
			if quiet > 2*m.healthEvery() {
				l.down()
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
			l.subscribed(channel)
		case subAlive:
			l.alive()
		case subMessage:
			m.stats.rotationMessages.Add(1)
			m.onMessage(payload)
		}
	}
}

// shards are the sharded subscriptions, one per server: a process holds a
// connection per node of the Cluster, whatever the number of grants.
type shards struct {
	mu    sync.Mutex
	loops map[string]*shardLoop // server address ("" for a single server) -> its subscription
}

// shardLoop is one server's subscription and the grants on it.
type shardLoop struct {
	mu        sync.Mutex
	sub       *subscription // nil while (re)connecting
	grants    map[string]*grantState
	confirmed map[string]bool // grants whose channel subscription was confirmed
}

// subscribeGrant has g join its server's sharded subscription (sharded
// messages only).
func (m *Manager) subscribeGrant(g *grantState) {
	if m.subscribe && m.store.sharded {
		m.goBackground(func() { m.joinShard(g) })
	}
}

// joinShard adds g to the subscription of the server that carries its
// channel, starting that subscription if there is none yet.
func (m *Manager) joinShard(g *grantState) {
	for m.base.Err() == nil {
		ctx, cancel := context.WithTimeout(m.base, max(m.opts.PollInterval, time.Second))
		node, err := m.store.shardOf(ctx, g.name)
		cancel()
		if err == nil {
			m.shards.mu.Lock()
			if m.shards.loops == nil {
				m.shards.loops = map[string]*shardLoop{}
			}
			l := m.shards.loops[node]
			if l == nil {
				l = &shardLoop{grants: map[string]*grantState{g.name: g}, confirmed: map[string]bool{}}
				m.shards.loops[node] = l
				m.shards.mu.Unlock()
				m.goBackground(func() { m.runShard(node, l) })
				return
			}
			l.mu.Lock()
			l.grants[g.name] = g
			sub := l.sub
			l.mu.Unlock()
			m.shards.mu.Unlock()
			if sub == nil || sub.add(m.base, g.name) == nil {
				return // the loop subscribes it when it (re)connects, or just did
			}
		}
		select {
		case <-m.base.Done():
		case <-time.After(m.resubscribeAfter()):
		}
	}
}

// openShard subscribes every grant of l on one connection and publishes
// it as l.sub. A grant that joins while the connection opens finds l.sub
// nil and leaves itself to the loop, so the loop subscribes, under the
// lock, every grant it has not yet subscribed before it publishes l.sub;
// after that, joiners add themselves.
func (m *Manager) openShard(l *shardLoop) (*subscription, error) {
	var sub *subscription
	done := map[string]bool{}
	for {
		l.mu.Lock()
		var missed []string
		for name := range l.grants {
			if !done[name] {
				missed = append(missed, name)
			}
		}
		if len(missed) == 0 {
			l.sub = sub
			l.mu.Unlock()
			return sub, nil
		}
		l.mu.Unlock()
		for _, name := range missed {
			var err error
			if sub == nil {
				sub, err = m.store.subscribeShard(m.base, name)
			} else {
				err = sub.add(m.base, name)
			}
			if err != nil {
				if sub != nil {
					sub.close()
				}
				return nil, err
			}
			done[name] = true
		}
	}
}

// runShard keeps one server's subscription up for its grants. When it
// fails, the grants rejoin by the server that now carries them (after a
// failover or a resharding it may be another).
func (m *Manager) runShard(node string, l *shardLoop) {
	sub, err := m.openShard(l)
	if err == nil {
		m.listen(sub, listener{
			subscribed: func(channel string) {
				g := m.lookup(m.store.grantOf(channel))
				if g == nil {
					return
				}
				m.pollOnce(g) // messages sent while it was away are lost
				l.mu.Lock()
				l.confirmed[g.name] = true
				l.mu.Unlock()
				m.setSubscribed(g, true)
			},
			alive: func() {
				l.mu.Lock()
				defer l.mu.Unlock()
				for name := range l.confirmed {
					m.setSubscribed(l.grants[name], true)
				}
			},
			down: func() { l.each(func(g *grantState) { m.setSubscribed(g, false) }) },
		})
	}
	// Down: dissolve, and let every grant rejoin where its channel now is.
	m.shards.mu.Lock()
	if m.shards.loops[node] == l {
		delete(m.shards.loops, node)
	}
	m.shards.mu.Unlock()
	l.mu.Lock()
	l.sub = nil
	l.mu.Unlock()
	if m.base.Err() != nil {
		return
	}
	l.each(func(g *grantState) { m.setSubscribed(g, false) })
	select {
	case <-m.base.Done():
		return
	case <-time.After(m.resubscribeAfter()):
	}
	l.each(m.subscribeGrant)
}

// each runs f for every grant of the loop.
func (l *shardLoop) each(f func(*grantState)) {
	l.mu.Lock()
	grants := make([]*grantState, 0, len(l.grants))
	for _, g := range l.grants {
		grants = append(grants, g)
	}
	l.mu.Unlock()
	for _, g := range grants {
		f(g)
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
// record), "GRANT VERSION reauth_required", "GRANT VERSION tokens_lost"
// and "GRANT VERSION" (from older writers).
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
	if tail == lostTokensTail {
		m.onLostTokens(g)
		return
	}
	if body, ok := strings.CutPrefix(tail, messagePrefix); ok && m.adopt(g, v, body) {
		return
	}
	m.invalidate(g, v, tail != "")
}

// onLostTokens answers "GRANT V tokens_lost": a process that holds a pair
// of the grant reads the record, which puts the pair back if it is the
// lost one or newer (refresh.go: readLease); the others have nothing to
// give and keep what they have. At most one read a second per grant.
func (m *Manager) onLostTokens(g *grantState) {
	if g.newestRecord() == nil {
		return
	}
	now, last := time.Now().UnixNano(), g.lostHeard.Load()
	if now-last < int64(time.Second) || !g.lostHeard.CompareAndSwap(last, now) {
		return
	}
	m.goBackground(func() {
		ctx, cancel := context.WithTimeout(m.base, m.opts.WaitTimeout)
		defer cancel()
		_, _ = m.read(ctx, g)
	})
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
