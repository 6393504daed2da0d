package tokenmgrprom

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
)

// Opts configure a collector.
type Opts struct {
	// ConstLabels are added to every metric, e.g.
	// prometheus.Labels{"registration": "jira"} when a process runs one
	// Manager per client registration. Collectors registered together
	// must differ in their values.
	ConstLabels prometheus.Labels
}

// StatsSource is what NewCollector reads: a *tokenmgr.Manager.
type StatsSource interface {
	Stats() tokenmgr.Stats
}

// counter is one Stats field as a counter.
type counter struct {
	name, help string
	value      func(tokenmgr.Stats) int64
}

// counters lists every Stats field; a test fails when one is missing.
var counters = []counter{
	{"tokenmgr_provider_refreshes_total", "Provider refresh calls that succeeded, made by this process.", func(s tokenmgr.Stats) int64 { return s.Refreshes }},
	{"tokenmgr_provider_refresh_failures_total", "Provider refresh calls that failed, made by this process.", func(s tokenmgr.Stats) int64 { return s.RefreshFailures }},
	{"tokenmgr_leases_total", "Refresh leases taken.", func(s tokenmgr.Stats) int64 { return s.Leases }},
	{"tokenmgr_lock_waits_total", "Lease attempts that found the lease held (or the lock servers down) and waited.", func(s tokenmgr.Stats) int64 { return s.LockWaits }},
	{"tokenmgr_leases_lost_total", "Leases that could not be extended during a provider call.", func(s tokenmgr.Stats) int64 { return s.LeasesLost }},
	{"tokenmgr_write_conflicts_total", "Fenced writes refused because the version had moved on.", func(s tokenmgr.Stats) int64 { return s.WriteConflicts }},
	{"tokenmgr_pending_writes_total", "Rotated pairs held because Redis refused them.", func(s tokenmgr.Stats) int64 { return s.PendingWrites }},
	{"tokenmgr_restores_total", "Records put back after Redis lost them.", func(s tokenmgr.Stats) int64 { return s.Restores }},
	{"tokenmgr_grants_marked_dead_total", "Grants this process declared in need of re-consent.", func(s tokenmgr.Stats) int64 { return s.MarkedDead }},
	{"tokenmgr_record_reads_total", "Record reads by refresh flights (loads and re-reads under the lease).", func(s tokenmgr.Stats) int64 { return s.Reads }},
	{"tokenmgr_rotation_messages_total", "Rotation messages received over pub/sub.", func(s tokenmgr.Stats) int64 { return s.RotationMessages }},
	{"tokenmgr_unauthorized_total", "401 answers received by managed clients, retries included.", func(s tokenmgr.Stats) int64 { return s.Unauthorized }},
	{"tokenmgr_unauthorized_after_retry_total", "401 answers returned to the caller: not cured by the 401 rule.", func(s tokenmgr.Stats) int64 { return s.UnauthorizedAfterRetry }},
	{"tokenmgr_rollbacks_repaired_total", "Stored records older than this process's newest pair (a failover lost writes), repaired.", func(s tokenmgr.Stats) int64 { return s.RollbacksRepaired }},
	{"tokenmgr_older_records_refused_total", "Reads of a record older than one already served, not installed.", func(s tokenmgr.Stats) int64 { return s.OlderRefused }},
	{"tokenmgr_answers_lost_total", "Grants marked for re-consent because an answer that may have rotated the token was lost.", func(s tokenmgr.Stats) int64 { return s.AnswersLost }},
	{"tokenmgr_replica_ack_timeouts_total", "Writes that fewer than Options.MinReplicas replicas acknowledged in time.", func(s tokenmgr.Stats) int64 { return s.ReplicaAckTimeouts }},
	{"tokenmgr_refreshes_left_to_refresher_total", "Background refreshes left to a live refresher.", func(s tokenmgr.Stats) int64 { return s.LeftToRefresher }},
	{"tokenmgr_forced_refreshes_refused_total", "401 answers that did not force a refresh (already forced for that version and reason, or backing off).", func(s tokenmgr.Stats) int64 { return s.Forced401Refused }},
	{"tokenmgr_secret_fallbacks_total", "Refreshes the provider accepted only with the previous client secret.", func(s tokenmgr.Stats) int64 { return s.SecretFallbacks }},
	{"tokenmgr_rotations_adopted_total", "New versions installed from a rotation message, without a read of Redis.", func(s tokenmgr.Stats) int64 { return s.Adopted }},
	{"tokenmgr_waits_for_holder_total", "Refreshes that found the lease held and waited for its holder's rotation message instead of trying it.", func(s tokenmgr.Stats) int64 { return s.WaitedForHolder }},
}

// Collector exports a Manager's Stats as counters.
type Collector struct {
	src   StatsSource
	descs []*prometheus.Desc
}

// NewCollector exports src's counters (see the package documentation for
// the list). Each scrape reads src.Stats() once, so the counters of one
// scrape are one snapshot.
func NewCollector(src StatsSource, o Opts) *Collector {
	c := &Collector{src: src}
	for _, k := range counters {
		c.descs = append(c.descs, prometheus.NewDesc(k.name, k.help, nil, o.ConstLabels))
	}
	return c
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range c.descs {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	s := c.src.Stats()
	for i, k := range counters {
		ch <- prometheus.MustNewConstMetric(c.descs[i], prometheus.CounterValue, float64(k.value(s)))
	}
}

// Outcomes of a provider call, as tokenmgr.Observer reports them.
var outcomes = []string{"ok", "transient", "refused", "config"}

// Buckets of the histograms, in seconds. A provider call is bounded by the
// profile's HTTP timeout (5-10 s), a lease wait by the Manager's wait
// timeout.
var (
	ProviderCallBuckets = []float64{.025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}
	LeaseWaitBuckets    = []float64{.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}
)

// Observer is a tokenmgr.Observer that keeps histograms of provider-call
// latency and lease waits; register it as a prometheus.Collector too.
type Observer struct {
	providerCalls *prometheus.HistogramVec
	leaseWaits    *prometheus.HistogramVec
	// by label value, so that an observation does no label lookup
	byOutcome map[string]prometheus.Observer
	acquired  [2]prometheus.Observer // [false, true]
}

var _ tokenmgr.Observer = (*Observer)(nil)

// NewObserver makes the histograms, with every outcome and both lease
// results present from the start (at zero), so that rate() and alerts
// see them before the first event.
func NewObserver(o Opts) *Observer {
	ob := &Observer{
		providerCalls: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:        "tokenmgr_provider_call_duration_seconds",
			Help:        "Calls to the token endpoint by outcome: ok, transient (5xx, 429, network, malformed answer), refused (invalid_grant), config (the client was rejected).",
			ConstLabels: o.ConstLabels,
			Buckets:     ProviderCallBuckets,
		}, []string{"outcome"}),
		leaseWaits: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:        "tokenmgr_lease_wait_duration_seconds",
			Help:        "How long refreshes waited for a grant's lease, by whether they got it (false: another holder rotated meanwhile, or the wait ran out).",
			ConstLabels: o.ConstLabels,
			Buckets:     LeaseWaitBuckets,
		}, []string{"acquired"}),
		byOutcome: map[string]prometheus.Observer{},
	}
	for _, out := range outcomes {
		ob.byOutcome[out] = ob.providerCalls.WithLabelValues(out)
	}
	ob.acquired[0] = ob.leaseWaits.WithLabelValues("false")
	ob.acquired[1] = ob.leaseWaits.WithLabelValues("true")
	return ob
}

// ProviderCall implements tokenmgr.Observer.
func (ob *Observer) ProviderCall(_ string, took time.Duration, outcome string) {
	h, ok := ob.byOutcome[outcome]
	if !ok { // an outcome a later library version adds
		h = ob.providerCalls.WithLabelValues(outcome)
	}
	h.Observe(took.Seconds())
}

// LeaseWait implements tokenmgr.Observer.
func (ob *Observer) LeaseWait(_ string, took time.Duration, acquired bool) {
	i := 0
	if acquired {
		i = 1
	}
	ob.acquired[i].Observe(took.Seconds())
}

// Describe implements prometheus.Collector.
func (ob *Observer) Describe(ch chan<- *prometheus.Desc) {
	ob.providerCalls.Describe(ch)
	ob.leaseWaits.Describe(ch)
}

// Collect implements prometheus.Collector.
func (ob *Observer) Collect(ch chan<- prometheus.Metric) {
	ob.providerCalls.Collect(ch)
	ob.leaseWaits.Collect(ch)
}
