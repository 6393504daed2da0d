package tokenmgr

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"golang.org/x/oauth2"

	"github.com/tokenmgr/tokenmgr/internal/redisserver"
	"github.com/tokenmgr/tokenmgr/internal/testbin"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

// backend is where a behaviour test's Redis comes from.
type backend string

const (
	miniredisBackend backend = "miniredis"
	realBackend      backend = "redis-server"
	// shardedBackend is a redis-server with each grant's rotation messages
	// on its own sharded channel (SPUBLISH, SSUBSCRIBE).
	shardedBackend backend = "redis-server, sharded messages"
	// pairBackend is a redis-server with every record in LayoutPair (the
	// sealed tokens in their own key).
	pairBackend backend = "redis-server, pair layout"
)

// env is one behaviour test's world: a Redis, a fake IdP, a clock, and
// Managers built like separate processes (each with its own client).
type env struct {
	t    *testing.T
	addr string
	mr   *miniredis.Miniredis // nil on a real redis-server
	srv  *redisserver.Server  // nil on miniredis
	// sharded: Managers use sharded rotation messages.
	sharded bool
	// layout: every Manager and Admin of the env writes records in it.
	layout Layout
	clock  *tokenmgrtest.Clock // shared by the Managers and the fake IdP
	idp    *tokenmgrtest.Server
	logs   *testbin.Buffer
	grant  string
	// down simulates a Redis outage for every client of this env: each
	// command fails with a network error while it is set.
	down atomic.Bool
	// commands counts commands sent by clients of this env.
	commands atomic.Int64
}

func newEnv(t *testing.T, b backend, profile tokenmgrtest.Profile) *env {
	t.Helper()
	e := &env{t: t, clock: tokenmgrtest.NewClock(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)), logs: &testbin.Buffer{}, grant: "jira-prod"}
	switch b {
	case miniredisBackend:
		e.mr = miniredis.RunT(t)
		e.addr = e.mr.Addr()
	case realBackend, shardedBackend, pairBackend:
		e.srv = redisserver.Start(t)
		e.addr = e.srv.Addr()
		e.sharded = b == shardedBackend
		if b == pairBackend {
			e.layout = LayoutPair
		}
	}
	e.idp = tokenmgrtest.NewServer(tokenmgrtest.Config{Profile: profile, AuthStyle: oauth2.AuthStyleInHeader, Now: e.clock.Now})
	t.Cleanup(e.idp.Close)
	t.Cleanup(e.checkNoTokenInLogs)
	return e
}

// checkNoTokenInLogs fails the test if any token the IdP issued appears in
// any log line (invariant 8).
func (e *env) checkNoTokenInLogs() {
	logs := e.logs.String()
	for _, tok := range e.idp.IssuedTokens() {
		if strings.Contains(logs, tok) {
			e.t.Errorf("a token issued by the IdP appears in the logs")
			return
		}
	}
}

type outageHook struct {
	e    *env
	down *atomic.Bool
}

var errSimulatedOutage = &net.OpError{Op: "dial", Net: "tcp", Err: errors.New("simulated Redis outage")}

func (h outageHook) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h outageHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		h.e.commands.Add(1)
		if h.down.Load() {
			cmd.SetErr(errSimulatedOutage)
			return errSimulatedOutage
		}
		return next(ctx, cmd)
	}
}
func (h outageHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		h.e.commands.Add(int64(len(cmds)))
		if h.down.Load() {
			for _, c := range cmds {
				c.SetErr(errSimulatedOutage)
			}
			return errSimulatedOutage
		}
		return next(ctx, cmds)
	}
}

func (e *env) client() *redis.Client {
	return e.clientDown(&e.down)
}

// clientDown is a client of e's Redis that fails while down is set: an
// outage seen by one process only.
func (e *env) clientDown(down *atomic.Bool) *redis.Client {
	c := redis.NewClient(&redis.Options{Addr: e.addr, MaxRetries: -1})
	c.AddHook(outageHook{e, down})
	e.t.Cleanup(func() { c.Close() })
	return c
}

// lockServer starts a separate Redis for leases, as an independent Redlock
// master: the store can then fail while the lease lives on.
func (e *env) lockServer() func() redis.UniversalClient {
	var addr string
	if e.mr != nil {
		addr = miniredis.RunT(e.t).Addr()
	} else {
		addr = redisserver.Start(e.t).Addr()
	}
	return func() redis.UniversalClient {
		c := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1})
		e.t.Cleanup(func() { c.Close() })
		return c
	}
}

func (e *env) options(profile Provider) Options {
	messages := MessagesGlobal
	if e.sharded {
		messages = MessagesSharded
	}
	return Options{
		Messages: messages,
		Layout:   e.layout,
		Redis:    e.client(),
		OAuth2:   e.idp.OAuthConfig(oauth2.AuthStyleInHeader),
		Provider: profile,
		Clock:    e.clock,
		Logger:   slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Sealer:   plaintext{},
	}
}

// manager builds a Manager; mod adjusts its options.
func (e *env) manager(profile Provider, mod func(*Options)) *Manager {
	e.t.Helper()
	return e.newManager(profile, mod, true)
}

// pollingManager builds a Manager that hears of rotations only through
// the version poll and the 401 rule (no subscription).
func (e *env) pollingManager(profile Provider, mod func(*Options)) *Manager {
	e.t.Helper()
	return e.newManager(profile, mod, false)
}

func (e *env) newManager(profile Provider, mod func(*Options), subscribe bool) *Manager {
	e.t.Helper()
	o := e.options(profile)
	o.Provider.HTTPTimeout = 2 * time.Second
	o.LeaseTTL = 0
	o.PollInterval = 100 * time.Millisecond
	o.LockRetry = 20 * time.Millisecond
	if mod != nil {
		mod(&o)
	}
	if o.IdPTransport == nil {
		o.IdPTransport = new(swapTransport)
	}
	m, err := newManager(e.t.Context(), o, subscribe)
	if err != nil {
		e.t.Fatalf("New: %v", err)
	}
	e.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := m.Close(ctx); err != nil {
			e.t.Errorf("Close: %v", err)
		}
	})
	return m
}

// swapTransport is the IdP transport of the harness's Managers, for a test
// to change while the Manager runs (setIdPTransport): assigning
// m.opts.IdPTransport would race the Manager's background refreshes.
type swapTransport struct {
	rt atomic.Pointer[http.RoundTripper]
}

func (s *swapTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if p := s.rt.Load(); p != nil && *p != nil {
		return (*p).RoundTrip(r)
	}
	return http.DefaultTransport.RoundTrip(r)
}

// setIdPTransport has m's calls to the IdP go through rt (nil: the default).
func setIdPTransport(t *testing.T, m *Manager, rt http.RoundTripper) {
	t.Helper()
	s, ok := m.opts.IdPTransport.(*swapTransport)
	if !ok {
		t.Fatalf("the Manager was built with its own IdPTransport (%T)", m.opts.IdPTransport)
	}
	s.rt.Store(&rt)
}

// seed creates a fresh family at the IdP and seeds it as e.grant.
func (e *env) seed(m *Manager) *oauth2.Token {
	e.t.Helper()
	tok := e.idp.NewGrant("read:jira-work offline_access")
	if _, err := m.Seed(e.t.Context(), e.grant, tok, SeedOptions{}); err != nil {
		e.t.Fatalf("Seed: %v", err)
	}
	return tok
}

func (e *env) status(m *Manager) GrantStatus {
	e.t.Helper()
	st, err := m.Status(e.t.Context(), e.grant)
	if err != nil {
		e.t.Fatalf("Status: %v", err)
	}
	return st
}

// eventually polls cond in real time; for conditions reached by background
// goroutines (a rotation message, a flusher).
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// hookTransport runs before(req) ahead of each request to the IdP.
type hookTransport struct {
	before func(*hookTransport)
	calls  atomic.Int64
}

func (h *hookTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	h.calls.Add(1)
	if h.before != nil {
		h.before(h)
	}
	return http.DefaultTransport.RoundTrip(r)
}

// stored is a grant's record as a replica holds it: the hash and, in
// LayoutPair, the pair key ("" when there is none).
type stored struct {
	hash map[string]string
	pair string
}

// snapshot reads the grant's stored record.
func (e *env) snapshot(k keys) stored {
	e.t.Helper()
	rdb := e.client()
	h, err := rdb.HGetAll(e.t.Context(), k.record).Result()
	if err != nil {
		e.t.Fatal(err)
	}
	pair, err := rdb.Get(e.t.Context(), k.pair).Result()
	if err != nil && !errors.Is(err, redis.Nil) {
		e.t.Fatal(err)
	}
	return stored{hash: h, pair: pair}
}

// rollBack puts an earlier snapshot back, as a failover to a replica that
// missed the later writes does.
func (e *env) rollBack(k keys, s stored) {
	e.t.Helper()
	rdb := e.client()
	if err := rdb.Del(e.t.Context(), k.record, k.pair).Err(); err != nil {
		e.t.Fatal(err)
	}
	if err := rdb.HSet(e.t.Context(), k.record, s.hash).Err(); err != nil {
		e.t.Fatal(err)
	}
	if s.pair != "" {
		if err := rdb.Set(e.t.Context(), k.pair, s.pair, 0).Err(); err != nil {
			e.t.Fatal(err)
		}
	}
}

// sealedPair reads the stored sealed tokens, in either layout.
func (e *env) sealedPair(k keys, grant string) (access, refresh string) {
	e.t.Helper()
	st := newStore(e.client(), "tm", plaintext{})
	access, refresh, _, err := st.sealedTokenFields(e.t.Context(), grant, k)
	if err != nil {
		e.t.Fatal(err)
	}
	return access, refresh
}

// putSealedPair overwrites the stored sealed tokens where the env's layout
// keeps them, as an operator with redis-cli would.
func (e *env) putSealedPair(k keys, access, refresh string) {
	e.t.Helper()
	rdb := e.client()
	var err error
	if e.layout == LayoutPair {
		err = rdb.Set(e.t.Context(), k.pair, strconv.Itoa(len(access))+":"+access+refresh, 0).Err()
	} else {
		err = rdb.HSet(e.t.Context(), k.record, fAccess, access, fRefresh, refresh).Err()
	}
	if err != nil {
		e.t.Fatal(err)
	}
}

// admin builds an Admin on e's Redis, in e's layout.
func (e *env) admin() *Admin {
	e.t.Helper()
	o := e.options(Strict)
	a, err := NewAdmin(o)
	if err != nil {
		e.t.Fatal(err)
	}
	return a
}
