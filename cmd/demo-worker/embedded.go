package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"golang.org/x/oauth2"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

// fleetResult is one fleet's figures in the embedded demo.
type fleetResult struct {
	Name        string `json:"name"`
	Workers     int    `json:"workers"`
	Concurrency int    `json:"concurrency"`
	report
	Rotations        int64 `json:"rotations"`
	IdPRefreshCalls  int64 `json:"idp_refresh_calls"`
	IdPRefreshFailed int64 `json:"idp_refresh_failed"`
	ReuseDetected    int64 `json:"reuse_detected"`
	FamiliesRevoked  int64 `json:"families_revoked"`
	GrantLost        bool  `json:"grant_lost"`
}

// demoProvider maps a fake IdP profile to the Manager's provider profile.
func demoProvider(profile string) (tokenmgr.Provider, error) {
	switch profile {
	case "atlassian":
		return tokenmgr.Atlassian, nil
	case "strict":
		return tokenmgr.Strict, nil
	case "grace":
		return tokenmgr.Okta, nil
	case "grace-xero":
		return tokenmgr.Xero, nil
	case "non-rotating":
		return tokenmgr.NonRotating, nil
	}
	return tokenmgr.Provider{}, fmt.Errorf("--profile %q: want atlassian, strict, grace, grace-xero or non-rotating", profile)
}

func runEmbedded(ctx context.Context, c *config, log *slog.Logger, stdout io.Writer) error {
	text := c.report == "text"
	if text {
		fmt.Fprintf(stdout, "embedded demo: miniredis + a fake %s IdP; %d workers x %d concurrent requests for %s; %s access tokens; workers start %s apart\n",
			c.profile, c.workers, c.concurrency, c.duration, c.accessTTL, c.stagger)
	}
	managed, err := runFleet(ctx, c, log, stdout, false)
	if err != nil {
		return err
	}
	results := []*fleetResult{managed}
	if c.compare == "naive" {
		naive, err := runFleet(ctx, c, log, stdout, true)
		if err != nil {
			return err
		}
		results = append(results, naive)
	}
	if text {
		printTable(stdout, results)
	} else if err := json.NewEncoder(stdout).Encode(map[string]any{"fleets": results}); err != nil {
		return err
	}
	if managed.Failed > 0 {
		return errFailures
	}
	return nil
}

// runFleet runs one fleet against its own fresh fake IdP (and, when
// managed, its own miniredis).
func runFleet(ctx context.Context, c *config, log *slog.Logger, stdout io.Writer, naive bool) (*fleetResult, error) {
	profile, _ := tokenmgrtest.ProfileByName(c.profile)
	idp := tokenmgrtest.NewServer(tokenmgrtest.Config{Profile: profile, AccessTTL: c.accessTTL, AuthStyle: oauth2.AuthStyleInHeader})
	defer idp.Close()
	seed := idp.NewGrant("read:jira-work offline_access")

	res := &fleetResult{Name: "managed (tokenmgr)", Workers: c.workers, Concurrency: c.concurrency}
	var (
		clients []*http.Client
		stats   func() tokenmgr.Stats
	)
	if naive {
		res.Name = "naive (x/oauth2 per worker)"
		clients = naiveClients(c, idp, seed)
		stats = func() tokenmgr.Stats { return tokenmgr.Stats{} }
	} else {
		mr, err := miniredis.Run()
		if err != nil {
			return nil, err
		}
		defer mr.Close()
		ms, closeAll, err := managers(ctx, c, log, idp, mr.Addr())
		if err != nil {
			return nil, err
		}
		defer closeAll()
		if _, err := ms[0].Seed(ctx, "demo", seed, tokenmgr.SeedOptions{}); err != nil {
			return nil, err
		}
		for _, m := range ms {
			clients = append(clients, workerClient(m, "demo"))
		}
		stats = func() tokenmgr.Stats {
			var s tokenmgr.Stats
			for _, m := range ms {
				st := m.Stats()
				s.Unauthorized += st.Unauthorized
				s.UnauthorizedAfterRetry += st.UnauthorizedAfterRetry
				s.Refreshes += st.Refreshes
			}
			return s
		}
	}

	runCtx, cancel := context.WithCancel(ctx)
	if c.duration > 0 {
		runCtx, cancel = context.WithTimeout(ctx, c.duration)
	}
	defer cancel()
	live := &liveCounters{}
	ticker := startTicker(runCtx, c, stdout, res.Name, idp, live, stats)
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		reports []*report
	)
	for i, client := range clients {
		wg.Go(func() {
			select {
			case <-runCtx.Done():
				return
			case <-time.After(time.Duration(i) * c.stagger):
			}
			per := int64(0)
			if n := int64(len(clients)); c.requests > 0 {
				per = c.requests / n
				if int64(i) < c.requests%n {
					per++ // the remainder, spread over the first workers
				}
			}
			r := runLoad(runCtx, loadSpec{client: client, url: idp.APIURL(), concurrency: c.concurrency, requests: per, counters: live})
			mu.Lock()
			reports = append(reports, r)
			mu.Unlock()
		})
	}
	wg.Wait()
	cancel()
	<-ticker

	res.Failures, res.Errors = map[string]int64{}, map[string]string{}
	for _, r := range reports {
		for k, n := range r.Failures {
			res.Failures[k] += n
			if res.Errors[k] == "" {
				res.Errors[k] = r.Errors[k]
			}
		}
		res.ReauthRequired = res.ReauthRequired || r.ReauthRequired
		res.Seconds = max(res.Seconds, r.Seconds)
	}
	res.Requests, res.OK, res.Failed = live.requests.Load(), live.ok.Load(), live.failed.Load()
	st := stats()
	res.UnauthorizedSeen, res.UnauthorizedAfterRetry, res.Refreshes = st.Unauthorized, st.UnauthorizedAfterRetry, st.Refreshes
	is := idp.Stats()
	res.Rotations, res.IdPRefreshCalls, res.IdPRefreshFailed = is.Rotations, is.RefreshOK+is.RefreshFailed, is.RefreshFailed
	res.ReuseDetected, res.FamiliesRevoked = is.ReuseDetected, is.FamiliesRevoked
	res.GrantLost = is.FamiliesRevoked > 0 || res.ReauthRequired || res.Failures["invalid_grant"] > 0
	return res, nil
}

// managers builds one Manager per worker, each with its own Redis client,
// as separate pods would have.
func managers(ctx context.Context, c *config, log *slog.Logger, idp *tokenmgrtest.Server, addr string) ([]*tokenmgr.Manager, func(), error) {
	provider, _ := demoProvider(c.profile)
	provider.HTTPTimeout = 2 * time.Second
	// The embedded demo encrypts with an ephemeral key, as a real fleet
	// encrypts with its configured one.
	key, err := tokenmgr.GenerateKey("demo")
	if err != nil {
		return nil, nil, err
	}
	keyring, err := tokenmgr.NewKeyring(key)
	if err != nil {
		return nil, nil, err
	}
	var ms []*tokenmgr.Manager
	var rdbs []*redis.Client
	closeAll := func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		for _, m := range ms {
			_ = m.Close(cctx)
		}
		for _, r := range rdbs {
			r.Close()
		}
	}
	for i := range c.workers {
		rdb := redis.NewClient(&redis.Options{Addr: addr})
		rdbs = append(rdbs, rdb)
		m, err := tokenmgr.New(ctx, tokenmgr.Options{
			Redis:    rdb,
			OAuth2:   idp.OAuthConfig(oauth2.AuthStyleInHeader),
			Provider: provider,
			Holder:   fmt.Sprintf("worker-%d", i),
			Sealer:   keyring,
			Logger:   log.With("worker", i),
		})
		if err != nil {
			closeAll()
			return nil, nil, err
		}
		ms = append(ms, m)
	}
	return ms, closeAll, nil
}

// naiveClients is the textbook way: each worker is deployed with the same
// token and refreshes it on its own with x/oauth2, refreshing as early
// before expiry as the managed fleet does.
func naiveClients(c *config, idp *tokenmgrtest.Server, seed *oauth2.Token) []*http.Client {
	cfg := idp.OAuthConfig(oauth2.AuthStyleInHeader)
	var out []*http.Client
	for range c.workers {
		tok := *seed
		src := oauth2.ReuseTokenSourceWithExpiry(&tok, cfg.TokenSource(context.Background(), &tok), c.accessTTL/5)
		out = append(out, &http.Client{Transport: &oauth2.Transport{Source: src}})
	}
	return out
}

// startTicker prints one line per second while the fleet runs; the
// returned channel closes when it has stopped.
func startTicker(ctx context.Context, c *config, w io.Writer, name string, idp *tokenmgrtest.Server, live *liveCounters, stats func() tokenmgr.Stats) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		if c.report != "text" {
			<-ctx.Done()
			return
		}
		start := time.Now()
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			is, st := idp.Stats(), stats()
			fmt.Fprintf(w, "[%s] %3.0fs  ok=%-6d failed=%-6d rotations=%-3d idp_refresh_calls=%-3d reuse=%d revoked=%d 401_seen=%d 401_retried=%d\n",
				name, time.Since(start).Seconds(), live.ok.Load(), live.failed.Load(), is.Rotations, is.RefreshOK+is.RefreshFailed,
				is.ReuseDetected, is.FamiliesRevoked, st.Unauthorized, st.Unauthorized-st.UnauthorizedAfterRetry)
		}
	}()
	return done
}

func printTable(w io.Writer, rs []*fleetResult) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	row := func(label string, f func(*fleetResult) string) {
		fmt.Fprint(tw, label)
		for _, r := range rs {
			fmt.Fprint(tw, "\t", f(r))
		}
		fmt.Fprintln(tw)
	}
	fmt.Fprintln(w)
	row("", func(r *fleetResult) string { return r.Name })
	row("workers x concurrency", func(r *fleetResult) string { return fmt.Sprintf("%d x %d", r.Workers, r.Concurrency) })
	row("requests", func(r *fleetResult) string { return fmt.Sprint(r.Requests) })
	row("ok", func(r *fleetResult) string { return fmt.Sprint(r.OK) })
	row("failed", func(r *fleetResult) string { return fmt.Sprint(r.Failed) })
	row("rotations", func(r *fleetResult) string { return fmt.Sprint(r.Rotations) })
	row("IdP refresh calls", func(r *fleetResult) string { return fmt.Sprint(r.IdPRefreshCalls) })
	row("IdP refresh failures", func(r *fleetResult) string { return fmt.Sprint(r.IdPRefreshFailed) })
	row("reuse detected", func(r *fleetResult) string { return fmt.Sprint(r.ReuseDetected) })
	row("token families revoked", func(r *fleetResult) string { return fmt.Sprint(r.FamiliesRevoked) })
	row("401s seen / retried ok", func(r *fleetResult) string {
		if r.Name != rs[0].Name {
			return "n/a (no 401 rule)"
		}
		return fmt.Sprintf("%d / %d", r.UnauthorizedSeen, r.UnauthorizedSeen-r.UnauthorizedAfterRetry)
	})
	row("grant", func(r *fleetResult) string {
		if r.GrantLost {
			return "LOST: needs re-consent"
		}
		return "alive"
	})
	tw.Flush()
}

func isInvalidGrant(err error) bool {
	var re *oauth2.RetrieveError
	return errors.As(err, &re) && re.ErrorCode == "invalid_grant"
}
