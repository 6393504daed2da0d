package main

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr/tokenmgrprom"
)

// metrics are the refresher's Prometheus metrics. Never a token: labels
// are grant names and outcomes.
type metrics struct {
	refreshes *prometheus.CounterVec
	expiry    *prometheus.GaugeVec
	idle      *prometheus.GaugeVec
	absolute  *prometheus.GaugeVec
}

func newMetrics(reg *prometheus.Registry) *metrics {
	mt := &metrics{
		refreshes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tokenmgr_refresher_refreshes_total",
			Help: "Scheduled refreshes by outcome: refreshed, rotated_elsewhere, not_due, backing_off, transient_error, config_error, reauth_required, not_found, error.",
		}, []string{"outcome"}),
		// Timestamps rather than countdowns: they stay true between
		// updates; alert on e.g. tokenmgr_grant_absolute_expiry_timestamp_seconds - time() < 30*86400.
		expiry: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "tokenmgr_grant_expiry_timestamp_seconds", Help: "When the grant's access token expires (unix seconds), as last seen.",
		}, []string{"grant"}),
		idle: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "tokenmgr_grant_idle_expiry_timestamp_seconds", Help: "When the refresh token dies unused (provider inactivity expiry), unix seconds.",
		}, []string{"grant"}),
		absolute: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "tokenmgr_grant_absolute_expiry_timestamp_seconds", Help: "When the grant must be re-consented whatever happens, unix seconds.",
		}, []string{"grant"}),
	}
	reg.MustRegister(mt.refreshes, mt.expiry, mt.idle, mt.absolute)
	return mt
}

// addManager exports a Manager's counters and its Observer's histograms
// (package tokenmgrprom), labelled with its registration.
func (mt *metrics) addManager(reg *prometheus.Registry, name string, m *tokenmgr.Manager, obs *tokenmgrprom.Observer) {
	reg.MustRegister(tokenmgrprom.NewCollector(m, registrationLabel(name)), obs)
}

// registrationLabel is the const label of one registration's metrics.
func registrationLabel(name string) tokenmgrprom.Opts {
	return tokenmgrprom.Opts{ConstLabels: prometheus.Labels{"registration": name}}
}

// reauthCollector exports the count of grants that need re-consent, read
// from Redis at each scrape. When it cannot be read the gauge is left out
// of that scrape (never a made-up value such as -1, which would read as
// "fewer than none") and tokenmgr_grants_reauth_required_errors_total
// counts the failure.
type reauthCollector struct {
	store   grantStore
	timeout time.Duration
	gauge   *prometheus.Desc
	errs    prometheus.Counter
}

func newReauthCollector(store grantStore) *reauthCollector {
	return &reauthCollector{
		store: store, timeout: 2 * time.Second,
		gauge: prometheus.NewDesc("tokenmgr_grants_reauth_required", "Grants that need re-consent (absent from a scrape when Redis could not be read: see tokenmgr_grants_reauth_required_errors_total).", nil, nil),
		errs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tokenmgr_grants_reauth_required_errors_total",
			Help: "Scrapes in which the count of grants that need re-consent could not be read from Redis.",
		}),
	}
}

func (c *reauthCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.gauge
	c.errs.Describe(ch)
}

func (c *reauthCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	if n, err := c.store.DeadGrants(ctx); err != nil {
		c.errs.Inc()
	} else {
		ch <- prometheus.MustNewConstMetric(c.gauge, prometheus.GaugeValue, float64(n))
	}
	c.errs.Collect(ch)
}

func (mt *metrics) outcome(o string) {
	if mt != nil {
		mt.refreshes.WithLabelValues(o).Inc()
	}
}

// observe records a grant's expiry times. A dead grant's series go away.
func (mt *metrics) observe(st tokenmgr.GrantStatus) {
	if mt == nil {
		return
	}
	if st.Status != tokenmgr.StatusOK {
		mt.expiry.DeleteLabelValues(st.Grant)
		mt.idle.DeleteLabelValues(st.Grant)
		mt.absolute.DeleteLabelValues(st.Grant)
		return
	}
	set := func(g *prometheus.GaugeVec, t time.Time) {
		if !t.IsZero() {
			g.WithLabelValues(st.Grant).Set(float64(t.UnixMilli()) / 1000)
		}
	}
	set(mt.expiry, st.Expiry)
	set(mt.idle, st.IdleExpiry)
	set(mt.absolute, st.AbsoluteExpiry)
}
