package main

import (
	"context"
	"embed"
	"encoding/json"
	"errors"
	"html/template"
	"io/fs"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"time"

	"github.com/tokenmgr/tokenmgr/internal/cli"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
)

//go:embed web
var webFS embed.FS

// dashboard is the operator page at / and its JSON at /api/grants: every
// grant this refresher serves, from Redis metadata only. Neither ever holds
// a token: rows are built field by field from tokenmgr.GrantStatus, which
// has none.
type dashboard struct {
	runners []*runner
	conn    *connector // nil: /connect is off
	now     func() time.Time
	secure  bool // https: Secure cookies
	log     *slog.Logger
	holder  string
	overdue time.Duration // past the refresher's due time by this much, a token is late
	// warnAbsolute: the absolute expiry turns amber this far ahead.
	warnAbsolute time.Duration
	// ping asks Redis whether it answers at all, to tell a missing record
	// from refused credentials.
	ping func(context.Context) error
}

// Colour levels of a row or a countdown.
const (
	levelOK   = "ok"
	levelWarn = "warn"
	levelCrit = "crit"
)

// Row states, in the words operators page on.
const (
	stateOK           = "ok"
	stateRefreshing   = "refreshing"
	stateBackingOff   = "backing off"
	stateReconsent    = "needs re-consent"
	stateNotConnected = "not connected"
	stateCorrupt      = "corrupt record"
	stateNoAccess     = "no access to Redis" // credentials or ACL refused: not a missing grant
	stateUnknown      = "unknown"
)

// Thresholds of the countdowns' colours.
const (
	idleWarn     = 14 * 24 * time.Hour
	idleCrit     = 3 * 24 * time.Hour
	absoluteCrit = 7 * 24 * time.Hour
	// stalledAfter: a refresh in flight this long is a holder that died
	// mid-call (providers answer in seconds); the next refresh replays it.
	stalledAfter = time.Minute
)

// dashboardRow is one grant as the page shows it.
type dashboardRow struct {
	Grant        string    `json:"grant"`
	Registration string    `json:"registration"`
	State        string    `json:"state"`
	Level        string    `json:"level"`
	Reason       string    `json:"reason,omitempty"`
	Version      int64     `json:"version"`
	Expiry       time.Time `json:"expiry,omitzero"`
	ExpiryLevel  string    `json:"expiry_level"`
	RotatedAt    time.Time `json:"rotated_at,omitzero"`
	RotatedBy    string    `json:"rotated_by,omitempty"`
	// RefreshesLastHour is null when unknown (a Redis user without the
	// rotations set's commands), never a made-up -1.
	RefreshesLastHour *int64    `json:"refreshes_last_hour"`
	IdleExpiry        time.Time `json:"idle_expiry,omitzero"`
	IdleLevel         string    `json:"idle_level"`
	AbsoluteExpiry    time.Time `json:"absolute_expiry,omitzero"`
	AbsoluteLevel     string    `json:"absolute_level"`
	RefreshHolder     string    `json:"refresh_holder,omitempty"`
	RefreshStartedAt  time.Time `json:"refresh_started_at,omitzero"`
	RetryAt           time.Time `json:"retry_at,omitzero"`
	// Connect: the row offers (Re-)connect, which starts /connect.
	Connect bool `json:"connect"`
}

// dashboardData is the JSON document, and the page's data.
type dashboardData struct {
	Now            time.Time      `json:"now"` // the page's countdowns run from the server's clock
	Holder         string         `json:"holder"`
	ConnectEnabled bool           `json:"connect_enabled"`
	Error          string         `json:"error,omitempty"` // the grant list could not be read
	Grants         []dashboardRow `json:"grants"`
}

// grantsToShow lists each grant with the runner that serves it: the
// grants named in --grant or --config, and for a registration that serves
// every grant, the rest of the schedule.
func (d *dashboard) grantsToShow(ctx context.Context) ([]string, []*runner, error) {
	owner := map[string]*runner{}
	var everyGrant *runner
	for _, rn := range d.runners {
		if rn.reg.grants == nil {
			everyGrant = rn
			continue
		}
		for _, g := range rn.reg.grants {
			owner[g] = rn
		}
	}
	if everyGrant != nil {
		scheduled, err := everyGrant.m.Grants(ctx)
		if err != nil {
			return nil, nil, err
		}
		for _, g := range scheduled {
			if owner[g] == nil {
				owner[g] = everyGrant
			}
		}
	}
	names := make([]string, 0, len(owner))
	for g := range owner {
		names = append(names, g)
	}
	slices.Sort(names) // rows keep their place between updates
	runners := make([]*runner, len(names))
	for i, g := range names {
		runners[i] = owner[g]
	}
	return names, runners, nil
}

func (d *dashboard) data(ctx context.Context) dashboardData {
	now := d.now()
	out := dashboardData{Now: now, Holder: d.holder, ConnectEnabled: d.conn != nil, Grants: []dashboardRow{}}
	names, runners, err := d.grantsToShow(ctx)
	if err != nil {
		d.log.Warn("dashboard: cannot list grants", logErr(err))
		out.Error = "cannot read the grant list: " + redisTrouble(err) + ": " + cli.Shown(err.Error())
		return out
	}
	if len(names) == 0 {
		return out
	}
	sts, errs := d.runners[0].m.Statuses(ctx, names)
	d.confirmMissing(ctx, errs)
	for i, g := range names {
		if errs[i] == nil {
			// Statuses decodes metadata only: decrypt too, so that a
			// record sealed with another key is not shown as ok.
			errs[i] = runners[i].store.Check(ctx, g)
		}
		out.Grants = append(out.Grants, d.row(now, g, runners[i], sts[i], errs[i]))
	}
	return out
}

// confirmMissing believes "no record" only when Redis answers a PING:
// refused credentials must not read as grants that were never connected.
func (d *dashboard) confirmMissing(ctx context.Context, errs []error) {
	if !slices.ContainsFunc(errs, func(err error) bool { return errors.Is(err, tokenmgr.ErrGrantNotFound) }) {
		return
	}
	perr := d.ping(ctx)
	if perr == nil {
		return
	}
	for i, err := range errs {
		if errors.Is(err, tokenmgr.ErrGrantNotFound) {
			errs[i] = perr
		}
	}
}

// row turns a status into what the page shows, colours included. Every
// string read from Redis goes through cli.Shown.
func (d *dashboard) row(now time.Time, grant string, rn *runner, st tokenmgr.GrantStatus, err error) dashboardRow {
	r := dashboardRow{Grant: cli.Shown(grant), Registration: rn.reg.name}
	// A name that Shown had to change (from the schedule) cannot be
	// connected: the form would name another grant.
	connectable := d.conn != nil && d.conn.route(grant) != nil && r.Grant == grant
	var corrupt *tokenmgr.CorruptRecordError
	switch {
	case errors.Is(err, tokenmgr.ErrGrantNotFound):
		r.State, r.Level, r.Reason = stateNotConnected, levelCrit, "no record in Redis: connect it, or import a token with 'refresher seed'"
	case errors.As(err, &corrupt):
		r.State, r.Level, r.Reason = stateCorrupt, levelCrit, cli.Shown(err.Error())
	case deniedByRedis(err):
		r.State, r.Level, r.Reason = stateNoAccess, levelCrit, redisTrouble(err)+": "+cli.Shown(err.Error())
	case err != nil:
		r.State, r.Level, r.Reason = stateUnknown, levelWarn, "cannot read the record: "+cli.Shown(err.Error())
	}
	r.Connect = connectable && (r.State == stateNotConnected || r.State == stateCorrupt)
	if err != nil {
		return r
	}
	st = shownStatus(st)
	r.Version, r.Reason, r.Expiry, r.RotatedAt, r.RotatedBy = st.Version, st.Reason, st.Expiry, st.RotatedAt, st.RotatedBy
	r.IdleExpiry, r.AbsoluteExpiry = st.IdleExpiry, st.AbsoluteExpiry
	if st.RefreshesLastHour != nil {
		r.RefreshesLastHour = new(*st.RefreshesLastHour)
	}
	r.IdleLevel = countdownLevel(now, st.IdleExpiry, idleWarn, idleCrit)
	r.AbsoluteLevel = countdownLevel(now, st.AbsoluteExpiry, d.warnAbsolute, absoluteCrit)
	if st.Status != tokenmgr.StatusOK {
		r.State, r.Level, r.Connect = stateReconsent, levelCrit, connectable
		r.ExpiryLevel = levelCrit
		return r
	}
	// The token is late once the refresher should have refreshed it.
	r.ExpiryLevel = levelOK
	switch due := rn.m.RefreshDueAt(st); {
	case st.Expiry.IsZero(): // the provider gave no expiry: nothing to be late with
	case !now.Before(st.Expiry):
		r.ExpiryLevel = levelCrit
	case now.After(due.Add(d.overdue)):
		r.ExpiryLevel = levelWarn
	}
	r.State, r.Level = stateOK, worst(r.ExpiryLevel, r.IdleLevel, r.AbsoluteLevel)
	switch {
	case st.Refreshing:
		r.State, r.RefreshHolder, r.RefreshStartedAt = stateRefreshing, st.RefreshHolder, st.RefreshStartedAt
		if now.Sub(st.RefreshStartedAt) > stalledAfter {
			r.Level = worst(r.Level, levelWarn)
			r.Reason = "the refresh has not finished: its holder may have died mid-call; the next refresh replays it"
		}
	case st.RetryAt.After(now):
		r.State, r.RetryAt, r.Level = stateBackingOff, st.RetryAt, worst(r.Level, levelWarn)
		r.Reason = "the provider failed or asked to wait: nobody calls it before the retry time"
	}
	return r
}

// servesGrant reports whether one of the runners serves grant (by name,
// or as a registration that serves every grant).
func (d *dashboard) servesGrant(grant string) bool {
	for _, rn := range d.runners {
		if rn.reg.grants == nil || slices.Contains(rn.reg.grants, grant) {
			return true
		}
	}
	return false
}

// countdownLevel colours a countdown to t: crit within crit, warn within
// warn. No time: nothing to warn about.
func countdownLevel(now, t time.Time, warn, crit time.Duration) string {
	switch left := t.Sub(now); {
	case t.IsZero():
		return levelOK
	case left < crit:
		return levelCrit
	case left < warn:
		return levelWarn
	}
	return levelOK
}

func worst(levels ...string) string {
	out := levelOK
	for _, l := range levels {
		if l == levelCrit {
			return levelCrit
		}
		if l == levelWarn {
			out = levelWarn
		}
	}
	return out
}

// pageFuncs are the templates' helpers. URLs in the pages are relative, so
// they work behind a proxy that serves the refresher under a path.
var pageFuncs = template.FuncMap{
	"until": until, "ago": ago, "pathEscape": url.PathEscape,
	"ms": func(t time.Time) int64 {
		if t.IsZero() {
			return 0
		}
		return t.UnixMilli()
	},
}

var dashboardPage = template.Must(template.New("dashboard.html").Funcs(pageFuncs).ParseFS(webFS, "web/dashboard.html"))

// handlePage renders the page; its script then keeps it current from
// /api/grants.
func (d *dashboard) handlePage(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
	defer cancel()
	page := struct {
		dashboardData
		CSRF, Connected, ConnectedVersion string
	}{dashboardData: d.data(ctx), CSRF: csrfToken(w, r, d.secure)}
	// After /callback: its signed note, fresh and naming a served grant,
	// shown once. Not the query: a crafted link must not put words on the
	// page.
	if c, err := r.Cookie(noteCookie); err == nil && d.conn != nil {
		if n, ok := openNote(d.conn.key(), c.Value, d.now()); ok && d.servesGrant(n.Grant) && tokenmgr.ValidateGrantName(n.Grant) == nil {
			page.Connected, page.ConnectedVersion = n.Grant, strconv.FormatInt(n.Version, 10)
		}
		http.SetCookie(w, &http.Cookie{Name: noteCookie, Value: "", Path: "/", MaxAge: -1, HttpOnly: true, Secure: d.secure, SameSite: http.SameSiteLaxMode})
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	if err := dashboardPage.Execute(w, page); err != nil {
		d.log.Error("dashboard page", "err", err)
	}
}

func (d *dashboard) handleJSON(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
	defer cancel()
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(d.data(ctx))
}

// assets serves the page's script and style sheet (no build step: plain
// files, embedded).
func assets() http.Handler {
	sub, _ := fs.Sub(webFS, "web/assets")
	return http.StripPrefix("/assets/", http.FileServerFS(sub))
}
