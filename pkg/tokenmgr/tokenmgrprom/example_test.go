package tokenmgrprom_test

import (
	"context"
	"fmt"
	"log"
	"log/slog"
	"net/http"

	"github.com/alicebob/miniredis/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/redis/go-redis/v9"
	"golang.org/x/oauth2"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrprom"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

// A worker exports its Manager's metrics: the Observer goes into the
// Options (it sees each provider call and lease wait), the Collector reads
// the counters at each scrape. Here against an embedded Redis and the fake
// IdP.
func Example() {
	mr, _ := miniredis.Run()
	defer mr.Close()
	idp := tokenmgrtest.NewServer(tokenmgrtest.Config{Profile: tokenmgrtest.Atlassian, AuthStyle: oauth2.AuthStyleInParams})
	defer idp.Close()
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	defer rdb.Close()
	ctx := context.Background()

	labels := tokenmgrprom.Opts{ConstLabels: prometheus.Labels{"registration": "jira"}}
	obs := tokenmgrprom.NewObserver(labels)
	m, err := tokenmgr.New(ctx, tokenmgr.Options{
		Redis:          rdb,
		OAuth2:         idp.OAuthConfig(oauth2.AuthStyleInParams),
		Provider:       tokenmgr.Atlassian,
		AllowPlaintext: true, // an example; use a Keyring
		Logger:         slog.New(slog.DiscardHandler),
		Observer:       obs,
	})
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close(ctx)

	reg := prometheus.NewRegistry()
	reg.MustRegister(obs, tokenmgrprom.NewCollector(m, labels), collectors.NewGoCollector())
	http.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{})) // served by the worker's HTTP server

	_, _ = m.Seed(ctx, "jira-prod", idp.NewGrant("read:jira-work offline_access"), tokenmgr.SeedOptions{})
	_, _ = m.Rotate(ctx, "jira-prod")

	mfs, _ := reg.Gather()
	for _, mf := range mfs {
		switch mf.GetName() {
		case "tokenmgr_provider_refreshes_total", "tokenmgr_leases_total":
			fmt.Println(mf.GetName(), mf.GetMetric()[0].GetCounter().GetValue())
		case "tokenmgr_provider_call_duration_seconds":
			for _, s := range mf.GetMetric() {
				if s.GetLabel()[0].GetValue() == "ok" {
					fmt.Println(mf.GetName(), "{outcome=ok} count", s.GetHistogram().GetSampleCount())
				}
			}
		}
	}
	// Output:
	// tokenmgr_leases_total 1
	// tokenmgr_provider_call_duration_seconds {outcome=ok} count 1
	// tokenmgr_provider_refreshes_total 1
}
