package main

import (
	"context"
	"log/slog"
	"sort"
	"sync/atomic"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"golang.org/x/oauth2"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

// clock is a fake clock shared by the Managers and the fake IdP, so token
// lifetimes pass without waiting.
type clock struct{ ns atomic.Int64 }

func newClock() *clock {
	c := &clock{}
	c.ns.Store(time.Now().UnixNano())
	return c
}
func (c *clock) Now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *clock) Advance(d time.Duration) { c.ns.Add(int64(d)) }

// world is one measurement's embedded Redis, fake IdP and clock.
type world struct {
	mr       *miniredis.Miniredis // nil when addr is a real redis-server
	addr     string
	idp      *tokenmgrtest.Server
	clock    *clock
	commands atomic.Int64 // commands sent by counted clients
	closers  []func()
}

func newWorld(profile tokenmgrtest.Profile, ttl time.Duration) (*world, error) {
	mr, err := miniredis.Run()
	if err != nil {
		return nil, err
	}
	w := &world{mr: mr, addr: mr.Addr(), clock: newClock()}
	w.idp = tokenmgrtest.NewServer(tokenmgrtest.Config{Profile: profile, AuthStyle: oauth2.AuthStyleInParams, AccessTTL: ttl, Now: w.clock.Now})
	w.closers = append(w.closers, w.idp.Close, mr.Close)
	return w, nil
}

// newRealWorld is newWorld on a throwaway redis-server, when there is one.
func newRealWorld(profile tokenmgrtest.Profile, ttl time.Duration) (*world, error) {
	addr, stop, err := startRedis()
	if err != nil {
		return nil, err
	}
	w := &world{addr: addr, clock: newClock()}
	w.idp = tokenmgrtest.NewServer(tokenmgrtest.Config{Profile: profile, AuthStyle: oauth2.AuthStyleInParams, AccessTTL: ttl, Now: w.clock.Now})
	w.closers = append(w.closers, w.idp.Close, stop)
	return w, nil
}

func (w *world) close() {
	for i := len(w.closers) - 1; i >= 0; i-- {
		w.closers[i]()
	}
}

type countHook struct{ n *atomic.Int64 }

func (h countHook) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h countHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error { h.n.Add(1); return next(ctx, cmd) }
}
func (h countHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error { h.n.Add(int64(len(cmds))); return next(ctx, cmds) }
}

// client returns a Redis client; counted ones add to w.commands.
func (w *world) client(counted bool) *redis.Client {
	c := redis.NewClient(&redis.Options{Addr: w.addr, PoolSize: 4})
	if counted {
		c.AddHook(countHook{&w.commands})
	}
	w.closers = append(w.closers, func() { c.Close() })
	return c
}

func (w *world) manager(counted bool, provider tokenmgr.Provider, mod func(*tokenmgr.Options)) (*tokenmgr.Manager, error) {
	provider.HTTPTimeout = 2 * time.Second
	o := tokenmgr.Options{
		Redis: w.client(counted), OAuth2: w.idp.OAuthConfig(oauth2.AuthStyleInParams), Provider: provider,
		Now: w.clock.Now, Logger: slog.New(slog.DiscardHandler), LockRetry: 20 * time.Millisecond,
	}
	if mod != nil {
		mod(&o)
	}
	m, err := tokenmgr.New(context.Background(), o)
	if err != nil {
		return nil, err
	}
	w.closers = append(w.closers, func() { _ = m.Close(context.Background()) })
	return m, nil
}

// percentile of sorted durations.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p * float64(len(sorted)-1))
	return sorted[i]
}

func sortDurations(d []time.Duration) { sort.Slice(d, func(i, j int) bool { return d[i] < d[j] }) }
