package tokenmgrprom

import (
	"context"
	"log/slog"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"github.com/redis/go-redis/v9"
	"golang.org/x/oauth2"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrtest"
)

type fixedStats tokenmgr.Stats

func (f fixedStats) Stats() tokenmgr.Stats { return tokenmgr.Stats(f) }

func lint(t *testing.T, c prometheus.Collector) {
	t.Helper()
	problems, err := testutil.CollectAndLint(c)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
}

// gather registers cs in a new registry and returns its metric families
// by name.
func gather(t *testing.T, cs ...prometheus.Collector) map[string]*dto.MetricFamily {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(cs...)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*dto.MetricFamily{}
	for _, mf := range mfs {
		out[mf.GetName()] = mf
	}
	return out
}

// Every Stats field is exported, once, with its own value: each field is
// set to a different number and each counter must carry one of them. A
// field added to tokenmgr.Stats without a counter here fails.
func TestEveryStatsFieldIsACounter(t *testing.T) {
	var s tokenmgr.Stats
	v := reflect.ValueOf(&s).Elem()
	want := map[float64]string{}
	for i := range v.NumField() {
		v.Field(i).SetInt(int64(i + 1))
		want[float64(i+1)] = v.Type().Field(i).Name
	}
	c := NewCollector(fixedStats(s), Opts{})
	lint(t, c)
	seen := map[string]string{}
	for name, mf := range gather(t, c) {
		if mf.GetType() != dto.MetricType_COUNTER || !strings.HasPrefix(name, "tokenmgr_") || !strings.HasSuffix(name, "_total") {
			t.Errorf("%s: type %s; want a tokenmgr_*_total counter", name, mf.GetType())
		}
		field, ok := want[mf.GetMetric()[0].GetCounter().GetValue()]
		if !ok {
			t.Errorf("%s = %v: no Stats field has that value", name, mf.GetMetric()[0].GetCounter().GetValue())
			continue
		}
		if prev, dup := seen[field]; dup {
			t.Errorf("Stats.%s exported twice: %s and %s", field, prev, name)
		}
		seen[field] = name
	}
	for _, field := range want {
		if seen[field] == "" {
			t.Errorf("Stats.%s is not exported", field)
		}
	}
}

func TestCollectorConstLabels(t *testing.T) {
	c := NewCollector(fixedStats{Refreshes: 7, SecretFallbacks: 2}, Opts{ConstLabels: prometheus.Labels{"registration": "jira"}})
	want := `
# HELP tokenmgr_provider_refreshes_total Provider refresh calls that succeeded, made by this process.
# TYPE tokenmgr_provider_refreshes_total counter
tokenmgr_provider_refreshes_total{registration="jira"} 7
# HELP tokenmgr_secret_fallbacks_total Refreshes the provider accepted only with the previous client secret.
# TYPE tokenmgr_secret_fallbacks_total counter
tokenmgr_secret_fallbacks_total{registration="jira"} 2
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want), "tokenmgr_provider_refreshes_total", "tokenmgr_secret_fallbacks_total"); err != nil {
		t.Error(err)
	}
	// Two Managers of one process, told apart by their labels.
	other := NewCollector(fixedStats{Refreshes: 1}, Opts{ConstLabels: prometheus.Labels{"registration": "xero"}})
	if n := len(gather(t, c, other)["tokenmgr_provider_refreshes_total"].GetMetric()); n != 2 {
		t.Errorf("%d series for two registrations, want 2", n)
	}
}

func TestObserver(t *testing.T) {
	ob := NewObserver(Opts{ConstLabels: prometheus.Labels{"registration": "jira"}})
	lint(t, ob)
	ob.ProviderCall("g", 300*time.Millisecond, "ok")
	ob.ProviderCall("g", 20*time.Second, "transient")
	ob.LeaseWait("g", 2*time.Millisecond, true)
	ob.LeaseWait("g", 3*time.Second, false)
	want := `
# HELP tokenmgr_lease_wait_duration_seconds How long refreshes waited for a grant's lease, by whether they got it (false: another holder rotated meanwhile, or the wait ran out).
# TYPE tokenmgr_lease_wait_duration_seconds histogram
tokenmgr_lease_wait_duration_seconds_bucket{acquired="false",registration="jira",le="0.001"} 0
tokenmgr_lease_wait_duration_seconds_bucket{acquired="false",registration="jira",le="0.005"} 0
tokenmgr_lease_wait_duration_seconds_bucket{acquired="false",registration="jira",le="0.01"} 0
tokenmgr_lease_wait_duration_seconds_bucket{acquired="false",registration="jira",le="0.025"} 0
tokenmgr_lease_wait_duration_seconds_bucket{acquired="false",registration="jira",le="0.05"} 0
tokenmgr_lease_wait_duration_seconds_bucket{acquired="false",registration="jira",le="0.1"} 0
tokenmgr_lease_wait_duration_seconds_bucket{acquired="false",registration="jira",le="0.25"} 0
tokenmgr_lease_wait_duration_seconds_bucket{acquired="false",registration="jira",le="0.5"} 0
tokenmgr_lease_wait_duration_seconds_bucket{acquired="false",registration="jira",le="1"} 0
tokenmgr_lease_wait_duration_seconds_bucket{acquired="false",registration="jira",le="2.5"} 0
tokenmgr_lease_wait_duration_seconds_bucket{acquired="false",registration="jira",le="5"} 1
tokenmgr_lease_wait_duration_seconds_bucket{acquired="false",registration="jira",le="10"} 1
tokenmgr_lease_wait_duration_seconds_bucket{acquired="false",registration="jira",le="30"} 1
tokenmgr_lease_wait_duration_seconds_bucket{acquired="false",registration="jira",le="+Inf"} 1
tokenmgr_lease_wait_duration_seconds_sum{acquired="false",registration="jira"} 3
tokenmgr_lease_wait_duration_seconds_count{acquired="false",registration="jira"} 1
tokenmgr_lease_wait_duration_seconds_bucket{acquired="true",registration="jira",le="0.001"} 0
tokenmgr_lease_wait_duration_seconds_bucket{acquired="true",registration="jira",le="0.005"} 1
tokenmgr_lease_wait_duration_seconds_bucket{acquired="true",registration="jira",le="0.01"} 1
tokenmgr_lease_wait_duration_seconds_bucket{acquired="true",registration="jira",le="0.025"} 1
tokenmgr_lease_wait_duration_seconds_bucket{acquired="true",registration="jira",le="0.05"} 1
tokenmgr_lease_wait_duration_seconds_bucket{acquired="true",registration="jira",le="0.1"} 1
tokenmgr_lease_wait_duration_seconds_bucket{acquired="true",registration="jira",le="0.25"} 1
tokenmgr_lease_wait_duration_seconds_bucket{acquired="true",registration="jira",le="0.5"} 1
tokenmgr_lease_wait_duration_seconds_bucket{acquired="true",registration="jira",le="1"} 1
tokenmgr_lease_wait_duration_seconds_bucket{acquired="true",registration="jira",le="2.5"} 1
tokenmgr_lease_wait_duration_seconds_bucket{acquired="true",registration="jira",le="5"} 1
tokenmgr_lease_wait_duration_seconds_bucket{acquired="true",registration="jira",le="10"} 1
tokenmgr_lease_wait_duration_seconds_bucket{acquired="true",registration="jira",le="30"} 1
tokenmgr_lease_wait_duration_seconds_bucket{acquired="true",registration="jira",le="+Inf"} 1
tokenmgr_lease_wait_duration_seconds_sum{acquired="true",registration="jira"} 0.002
tokenmgr_lease_wait_duration_seconds_count{acquired="true",registration="jira"} 1
`
	if err := testutil.CollectAndCompare(ob, strings.NewReader(want), "tokenmgr_lease_wait_duration_seconds"); err != nil {
		t.Error(err)
	}
	// Every outcome is there from the start; the two observed are counted
	// where they belong.
	counts := map[string]uint64{}
	for _, m := range gather(t, ob)["tokenmgr_provider_call_duration_seconds"].GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == "outcome" {
				counts[l.GetValue()] = m.GetHistogram().GetSampleCount()
			}
		}
	}
	if want := map[string]uint64{"ok": 1, "transient": 1, "refused": 0, "config": 0}; !reflect.DeepEqual(counts, want) {
		t.Errorf("provider calls by outcome %v, want %v", counts, want)
	}
}

// With a real Manager: a rotation is one successful provider call, one
// lease taken after a wait that got it, and one refresh counted.
func TestWithManager(t *testing.T) {
	mr := miniredis.RunT(t)
	idp := tokenmgrtest.NewServer(tokenmgrtest.Config{Profile: tokenmgrtest.Strict, AuthStyle: oauth2.AuthStyleInParams})
	t.Cleanup(idp.Close)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	t.Cleanup(func() { rdb.Close() })
	ob := NewObserver(Opts{})
	m, err := tokenmgr.New(t.Context(), tokenmgr.Options{Redis: rdb, OAuth2: idp.OAuthConfig(oauth2.AuthStyleInParams), Provider: tokenmgr.Strict,
		AllowPlaintext: true, Logger: slog.New(slog.DiscardHandler), Observer: ob})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Close(context.Background()) })
	if _, err := m.Seed(t.Context(), "jira", idp.NewGrant(""), tokenmgr.SeedOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Rotate(t.Context(), "jira"); err != nil {
		t.Fatal(err)
	}
	c := NewCollector(m, Opts{})
	lint(t, c)
	if got := gather(t, c)["tokenmgr_provider_refreshes_total"].GetMetric()[0].GetCounter().GetValue(); got != 1 {
		t.Errorf("tokenmgr_provider_refreshes_total = %v, want 1", got)
	}
	h := gather(t, ob)
	count := func(family, label, value string) uint64 {
		for _, met := range h[family].GetMetric() {
			for _, l := range met.GetLabel() {
				if l.GetName() == label && l.GetValue() == value {
					return met.GetHistogram().GetSampleCount()
				}
			}
		}
		return 0
	}
	if n := count("tokenmgr_provider_call_duration_seconds", "outcome", "ok"); n != 1 {
		t.Errorf("%d ok provider calls observed, want 1", n)
	}
	if n := count("tokenmgr_lease_wait_duration_seconds", "acquired", "true"); n != 1 {
		t.Errorf("%d acquired lease waits observed, want 1", n)
	}
}
