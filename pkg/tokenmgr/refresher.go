package tokenmgr

import (
	"context"
	"slices"
	"strings"
	"sync"
	"time"
)

// Workers leave the provider to a live refresher (invariant 11). Worker pods
// are the processes that get OOM-killed, preempted and rolled; one killed
// during its provider call takes the only copy of the new pair with it,
// which a strict provider never forgives. The refresher is the process that
// shuts down gracefully. So a refresher announces itself, and while it is
// live a worker whose token is still above the floor does not take the
// lease at its soft deadline: it waits for the refresher's rotation, and
// refreshes itself only at the floor or when no refresher is live.

// refresherCheckEvery is how long a worker trusts what it read of the
// live refreshers, and how often it looks again while it waits for one.
const refresherCheckEvery = time.Second

// Announce records this Manager's process as a refresher that pre-rotates
// grants (nil: every grant in the schedule) for the next ttl. The refresher
// service calls it every tick with a ttl of a few ticks; a refresher that
// stops announcing is taken for dead when ttl runs out, and workers refresh
// for themselves again.
func (m *Manager) Announce(ctx context.Context, grants []string, ttl time.Duration) error {
	for _, g := range grants {
		if err := ValidateGrantName(g); err != nil {
			return err
		}
	}
	return m.store.announce(ctx, m.opts.Holder, grants, ttl)
}

// refreshers caches what a Manager last read of the live refreshers.
type refreshers struct {
	mu     sync.Mutex
	readAt time.Time // real time
	all    bool      // one serves every grant
	grants map[string]bool
}

// leftToRefresher reports whether the background refresh of e's token is
// left to a live refresher: the token is above the floor and one serves
// the grant. A failed read counts as no refresher: the worker refreshes.
func (m *Manager) leftToRefresher(g *grantState, e *entry) bool {
	if e.err != nil || !m.opts.Now().Before(e.floorAt) {
		return false
	}
	return m.refresherServes(g.name)
}

func (m *Manager) refresherServes(grant string) bool {
	r := &m.refreshers
	r.mu.Lock()
	defer r.mu.Unlock()
	if time.Since(r.readAt) >= refresherCheckEvery {
		ctx, cancel := context.WithTimeout(m.base, refresherCheckEvery)
		scopes, err := m.store.liveRefreshers(ctx)
		cancel()
		r.readAt, r.all, r.grants = time.Now(), false, map[string]bool{}
		if err == nil {
			for _, sc := range scopes {
				names := strings.Fields(sc)
				if slices.Contains(names, "*") {
					r.all = true
				}
				for _, n := range names {
					r.grants[n] = true
				}
			}
		}
	}
	return r.all || r.grants[grant]
}
