package main

import (
	"context"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"sync"
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
	byName   sync.Map     // command name -> *atomic.Int64, for counted clients
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
// sends (HELLO, CLIENT SETINFO): that is setup, not work. With byName set
// it counts them by name too.
type countHook struct {
	n      *atomic.Int64
	byName *sync.Map
}

func (h countHook) count(cmd redis.Cmder) {
	if handshake(cmd) {
		return
	}
	h.n.Add(1)
	if h.byName != nil {
		c, _ := h.byName.LoadOrStore(strings.ToUpper(cmd.Name()), new(atomic.Int64))
		c.(*atomic.Int64).Add(1)
	}
}

// resetNames zeroes the counts by name.
func (w *world) resetNames() { w.byName.Clear() }

// names lists the counts by name, most first ("none" when there are none).
func (w *world) names() string { return namesOf(&w.byName, 1) }

// namesOf lists counts by name divided by per, most first.
func namesOf(m *sync.Map, per float64) string {
	type nc struct {
		name string
		n    int64
	}
	var all []nc
	m.Range(func(k, v any) bool {
		if n := v.(*atomic.Int64).Load(); n > 0 {
			all = append(all, nc{k.(string), n})
		}
		return true
	})
	if len(all) == 0 {
		return "no commands"
	}
	sort.Slice(all, func(i, j int) bool { return all[i].n > all[j].n || all[i].n == all[j].n && all[i].name < all[j].name })
	parts := make([]string, len(all))
	for i, c := range all {
		if per == 1 {
			parts[i] = fmt.Sprintf("%d %s", c.n, c.name)
		} else {
			parts[i] = fmt.Sprintf("%.2f %s", float64(c.n)/per, c.name)
		}
	}
	return strings.Join(parts, ", ")
}

func handshake(cmd redis.Cmder) bool { return cmd.Name() == "hello" || cmd.Name() == "client" }

func (h countHook) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h countHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		h.count(cmd)
		return next(ctx, cmd)
	}
}
func (h countHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		for _, c := range cmds {
			h.count(c)
		}
		return next(ctx, cmds)
	}
}

// writeHook records when a fenced write (a script that publishes a
// rotation message) is sent: the start of rotation-to-adoption latency.
type writeHook struct{ at *atomic.Int64 }

// announces reports whether a script argument names where a rotation
// message goes: the global channel, or a grant's own, with the "p:" or
// "s:" the scripts are told to PUBLISH or SPUBLISH with.
func announces(arg any) bool {
	a, ok := arg.(string)
	if !ok {
		return false
	}
	if t, ok := strings.CutPrefix(a, "p:"); ok {
		a = t
	} else if t, ok := strings.CutPrefix(a, "s:"); ok {
		a = t
	}
	return a == "tm:rotated" || strings.HasPrefix(a, "tm:{") && strings.HasSuffix(a, "}:rotated")
}

func (h writeHook) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h writeHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if n := cmd.Name(); n == "evalsha" || n == "eval" {
			for _, a := range cmd.Args() {
				if announces(a) {
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
		c.AddHook(countHook{&w.commands, &w.byName})
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
