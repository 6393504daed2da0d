package main

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
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

// addManager exports a Manager's counters, labelled with its registration.
func (mt *metrics) addManager(reg *prometheus.Registry, name string, m *tokenmgr.Manager) {
	stat := func(metric, help string, f func(tokenmgr.Stats) int64) {
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: metric, Help: help, ConstLabels: prometheus.Labels{"registration": name}},
			func() float64 { return float64(f(m.Stats())) }))
	}
	stat("tokenmgr_provider_refreshes_total", "Successful provider refresh calls made by this process.", func(s tokenmgr.Stats) int64 { return s.Refreshes })
	stat("tokenmgr_provider_refresh_failures_total", "Failed provider refresh calls made by this process.", func(s tokenmgr.Stats) int64 { return s.RefreshFailures })
	stat("tokenmgr_leases_total", "Refresh leases taken.", func(s tokenmgr.Stats) int64 { return s.Leases })
	stat("tokenmgr_lock_waits_total", "Lease attempts that found it held and waited.", func(s tokenmgr.Stats) int64 { return s.LockWaits })
	stat("tokenmgr_leases_lost_total", "Leases lost during a provider call.", func(s tokenmgr.Stats) int64 { return s.LeasesLost })
	stat("tokenmgr_write_conflicts_total", "Fenced writes refused because another holder wrote first.", func(s tokenmgr.Stats) int64 { return s.WriteConflicts })
	stat("tokenmgr_pending_writes_total", "Rotated pairs held because Redis refused them.", func(s tokenmgr.Stats) int64 { return s.PendingWrites })
	stat("tokenmgr_restores_total", "Records restored after Redis lost them.", func(s tokenmgr.Stats) int64 { return s.Restores })
}

// addReauthGauge exports the count of grants that need re-consent.
func (mt *metrics) addReauthGauge(reg *prometheus.Registry, store grantStore) {
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "tokenmgr_grants_reauth_required", Help: "Grants that need re-consent.",
	}, func() float64 {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		n, err := store.DeadGrants(ctx)
		if err != nil {
			return -1
		}
		return float64(n)
	}))
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
