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

// clock is the wall clock plus an offset that Advance moves, shared by the
// Managers and the fake IdP: token lifetimes pass without waiting, and a
// clock read costs what production pays (a real time.Now).
type clock struct{ offset atomic.Int64 }

func newClock() *clock                   { return &clock{} }
func (c *clock) Now() time.Time          { return time.Now().Add(time.Duration(c.offset.Load())) }
func (c *clock) Advance(d time.Duration) { c.offset.Add(int64(d)) }

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

// countHook counts commands, leaving out the handshake a new connection
// sends (HELLO, CLIENT SETINFO): that is setup, not work.
type countHook struct{ n *atomic.Int64 }

func handshake(cmd redis.Cmder) bool { return cmd.Name() == "hello" || cmd.Name() == "client" }

func (h countHook) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h countHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if !handshake(cmd) {
			h.n.Add(1)
		}
		return next(ctx, cmd)
	}
}
func (h countHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		for _, c := range cmds {
			if !handshake(c) {
				h.n.Add(1)
			}
		}
		return next(ctx, cmds)
	}
}

// writeHook records when a fenced write (a script that publishes on
// tm:rotated) is sent: the start of rotation-to-adoption latency.
type writeHook struct{ at *atomic.Int64 }

func (h writeHook) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h writeHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if n := cmd.Name(); n == "evalsha" || n == "eval" {
			for _, a := range cmd.Args() {
				if a == "tm:rotated" {
					h.at.Store(time.Now().UnixNano())
					break
				}
			}
		}
		return next(ctx, cmd)
	}
}
func (h writeHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
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
		AllowPlaintext: true, // the figures measure the protocol; figure 8 seals with a Keyring
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
// seeded is manager with grant "g" seeded from a new family at the IdP.
func (w *world) seeded(ctx context.Context, counted bool, provider tokenmgr.Provider, mod func(*tokenmgr.Options)) (*tokenmgr.Manager, error) {
	m, err := w.manager(counted, provider, mod)
	if err != nil {
		return nil, err
	}
	if _, err := m.Seed(ctx, "g", w.idp.NewGrant(""), tokenmgr.SeedOptions{}); err != nil {
		return nil, err
	}
	return m, nil
}

func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p * float64(len(sorted)-1))
	return sorted[i]
}

func sortDurations(d []time.Duration) { sort.Slice(d, func(i, j int) bool { return d[i] < d[j] }) }
