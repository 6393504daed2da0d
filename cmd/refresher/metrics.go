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
	reg       *prometheus.Registry
	refreshes *prometheus.CounterVec
	expiry    *prometheus.GaugeVec
	idle      *prometheus.GaugeVec
	absolute  *prometheus.GaugeVec
}

func newMetrics(m *tokenmgr.Manager, admin *tokenmgr.Admin) *metrics {
	reg := prometheus.NewRegistry()
	mt := &metrics{
		reg: reg,
		refreshes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tokenmgr_refresher_refreshes_total",
			Help: "Scheduled refreshes by outcome: refreshed, not_due, transient_error, config_error, reauth_required, error.",
		}, []string{"outcome"}),
		expiry: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "tokenmgr_grant_seconds_to_expiry", Help: "Seconds until the grant's access token expires.",
		}, []string{"grant"}),
		idle: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "tokenmgr_grant_seconds_to_idle_expiry", Help: "Seconds until the refresh token dies unused (provider inactivity expiry).",
		}, []string{"grant"}),
		absolute: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "tokenmgr_grant_seconds_to_absolute_expiry", Help: "Seconds until the grant must be re-consented whatever happens.",
		}, []string{"grant"}),
	}
	reg.MustRegister(mt.refreshes, mt.expiry, mt.idle, mt.absolute)
	if m != nil {
		stat := func(name, help string, f func(tokenmgr.Stats) int64) {
			reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help},
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
	if admin != nil {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "tokenmgr_grants_reauth_required", Help: "Grants that need re-consent.",
		}, func() float64 {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			n, err := admin.DeadGrants(ctx)
			if err != nil {
				return -1
			}
			return float64(n)
		}))
	}
	return mt
}

func (mt *metrics) outcome(o string) {
	if mt != nil {
		mt.refreshes.WithLabelValues(o).Inc()
	}
}

// observe records a grant's countdowns.
func (mt *metrics) observe(st tokenmgr.GrantStatus, now time.Time) {
	if mt == nil {
		return
	}
	if !st.Expiry.IsZero() {
		mt.expiry.WithLabelValues(st.Grant).Set(st.Expiry.Sub(now).Seconds())
	}
	if !st.IdleExpiry.IsZero() {
		mt.idle.WithLabelValues(st.Grant).Set(st.IdleExpiry.Sub(now).Seconds())
	}
	if !st.AbsoluteExpiry.IsZero() {
		mt.absolute.WithLabelValues(st.Grant).Set(st.AbsoluteExpiry.Sub(now).Seconds())
	}
}
