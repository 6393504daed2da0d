package main

import (
	"context"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"golang.org/x/oauth2"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

// The scheduler fires when a grant comes due, not at the next tick after
// it: with a tick of an hour, 2-second tokens are still pre-rotated on
// time, every one of them. It also announces itself every tick.
func TestSchedulerFiresAtDueTime(t *testing.T) {
	mr := miniredis.RunT(t)
	idp := tokenmgrtest.NewServer(tokenmgrtest.Config{Profile: tokenmgrtest.Strict, AuthStyle: oauth2.AuthStyleInParams, AccessTTL: 2 * time.Second})
	t.Cleanup(idp.Close)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	t.Cleanup(func() { rdb.Close() })
	c := defaultRun()
	c.jitter, c.tick = 0, time.Hour
	c.common.Grant = "jira"
	o := tokenmgr.Options{Redis: rdb, OAuth2: idp.OAuthConfig(oauth2.AuthStyleInParams), Provider: tokenmgr.Strict, AllowPlaintext: true,
		Logger: slog.New(slog.DiscardHandler), LockRetry: 10 * time.Millisecond, Holder: "refresher-under-test"}
	rf, err := newSingle(t.Context(), c, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = rf.m.Close(context.Background()) })
	if _, err := rf.m.Seed(t.Context(), "jira", idp.NewGrant(""), tokenmgr.SeedOptions{}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	wg.Go(func() { rf.sched.loop(ctx, c.tick) })
	defer func() { cancel(); wg.Wait() }()
	// Each 2 s token is refreshed 0.8 s before it expires (40% of its
	// life): in 5 s, at least three rotations, all on time.
	deadline := time.Now().Add(10 * time.Second)
	for idp.Stats().Rotations < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("%d rotations in 10 s with a one-hour tick: the scheduler waits for the tick, not the due time", idp.Stats().Rotations)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if s := idp.Stats(); s.API401 != 0 || s.ReuseDetected != 0 {
		t.Errorf("IdP %+v", s)
	}
	// Workers see it as a live refresher of the grant.
	if live, _ := rdb.HGetAll(t.Context(), "tm:{refreshers}:live").Result(); live["refresher-under-test"] == "" {
		t.Errorf("the refresher did not announce itself: %v", live)
	}
}
