package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"sort"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"golang.org/x/oauth2"

	"github.com/tokenmgr/tokenmgr/internal/cli"
	"github.com/tokenmgr/tokenmgr/internal/logging"
	"github.com/tokenmgr/tokenmgr/pkg/tokenmgr"
)

func newFlagSet(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("refresher "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs
}

// parseArgs parses a subcommand's flags: see cli.Parse for the errors.
func parseArgs(fs *flag.FlagSet, args []string) error { return cli.Parse(fs, args) }

// openStore connects to Redis for the operator commands: a
// tokenmgr.Admin, which reads and writes records without a client
// registration. Redis must answer a PING first, so that refused
// credentials are reported as such, not as a missing grant.
func openStore(ctx context.Context, c *cli.Common, needGrant, needKey bool, stderr io.Writer, adjust ...func(*tokenmgr.Options)) (*tokenmgr.Admin, func(), error) {
	if err := c.ValidateStore(needGrant, needKey); err != nil {
		return nil, nil, err
	}
	o, err := c.AdminOptions()
	if err != nil {
		return nil, nil, err
	}
	for _, f := range adjust {
		f(&o)
	}
	if o.Sealer == nil {
		fmt.Fprintln(stderr, "refresher: --insecure-plaintext: tokens are stored in Redis UNENCRYPTED")
	}
	o.Logger = slog.New(logging.NewHandler(stderr, logging.FormatText, slog.LevelWarn)) // an operator reads it
	a, err := tokenmgr.NewAdmin(o)
	if err == nil {
		if perr := o.Redis.Ping(ctx).Err(); perr != nil {
			err = fmt.Errorf("%s: %s", redisTrouble(perr), cli.Shown(perr.Error()))
		}
	}
	if err != nil {
		cli.CloseClients(o)
		return nil, nil, err
	}
	return a, func() { cli.CloseClients(o) }, nil
}

// seedInput is an oauth2 token as JSON: expiry as RFC 3339, or expires_in.
type seedInput struct {
	AccessToken  string `json:"access_token"`
	RefreshToken string `json:"refresh_token"`
	TokenType    string `json:"token_type"`
	Expiry       string `json:"expiry"`
	ExpiresIn    *int64 `json:"expires_in"`
	Scope        string `json:"scope"`
}

// maxSeedLifetime bounds an imported token's expiry: no provider issues
// access tokens for longer, and beyond it seconds overflow a time.Duration
// (expires_in 9223372037 wrapped to the year 1734).
const maxSeedLifetime = 10 * 365 * 24 * time.Hour

// parseSeed decodes a token JSON. Errors never quote the input: it holds
// tokens.
func parseSeed(r io.Reader, now time.Time) (*oauth2.Token, error) {
	var in seedInput
	dec := json.NewDecoder(io.LimitReader(r, 1<<20))
	if err := dec.Decode(&in); err != nil {
		var se *json.SyntaxError
		var te *json.UnmarshalTypeError
		switch {
		case errors.As(err, &se):
			return nil, fmt.Errorf("token JSON is malformed at byte %d", se.Offset)
		case errors.As(err, &te):
			return nil, fmt.Errorf("token JSON field %q has the wrong type (want %s)", te.Field, te.Type)
		case errors.Is(err, io.ErrUnexpectedEOF):
			return nil, errors.New("token JSON is malformed: truncated")
		case errors.Is(err, io.EOF):
			return nil, errors.New("no token JSON on standard input")
		}
		return nil, errors.New("token JSON could not be read")
	}
	if in.AccessToken == "" || in.RefreshToken == "" {
		return nil, errors.New("token JSON needs access_token and refresh_token")
	}
	tok := &oauth2.Token{AccessToken: in.AccessToken, RefreshToken: in.RefreshToken, TokenType: in.TokenType}
	switch {
	case in.Expiry != "":
		t, err := time.Parse(time.RFC3339, in.Expiry)
		if err != nil {
			return nil, fmt.Errorf("expiry %q is not RFC 3339", in.Expiry)
		}
		if t.Year() < 2000 {
			return nil, fmt.Errorf("expiry %q is unset (a zero time); give the real expiry or expires_in", in.Expiry)
		}
		if t.After(now.Add(maxSeedLifetime)) {
			return nil, fmt.Errorf("expiry %q is more than 10 years ahead", in.Expiry)
		}
		tok.Expiry = t
	case in.ExpiresIn != nil:
		if *in.ExpiresIn <= 0 || *in.ExpiresIn > int64(maxSeedLifetime/time.Second) {
			return nil, fmt.Errorf("expires_in %d: want 1 to %d seconds (10 years)", *in.ExpiresIn, int64(maxSeedLifetime/time.Second))
		}
		tok.Expiry = now.Add(time.Duration(*in.ExpiresIn) * time.Second)
	default:
		return nil, errors.New("token JSON needs expiry (RFC 3339) or expires_in")
	}
	if in.Scope != "" {
		tok = tok.WithExtra(map[string]any{"scope": in.Scope})
	}
	return tok, nil
}

func cmdSeed(ctx context.Context, args []string, env func(string) string, stdin io.Reader, stdout, stderr io.Writer) error {
	var c cli.Common
	fs := newFlagSet("seed", stderr)
	c.Register(fs, env)
	consented := fs.String("consented-at", "", "when the user consented (RFC 3339, e.g. 2026-03-01T09:30:00Z; default now): the absolute expiry (Atlassian: 365 days) counts from it, so give it when importing a grant consented earlier")
	if err := parseArgs(fs, args); err != nil {
		return err
	}
	var so tokenmgr.SeedOptions
	if *consented != "" {
		t, err := time.Parse(time.RFC3339, *consented)
		if err != nil {
			return fmt.Errorf("--consented-at %q is not RFC 3339", *consented)
		}
		// A consent in the future would put the absolute expiry after the
		// provider's: the countdown would say there is time left when there
		// is none. A few minutes of clock skew are allowed.
		if t.After(time.Now().Add(5 * time.Minute)) {
			return fmt.Errorf("--consented-at %s is in the future", *consented)
		}
		so.ConsentedAt = t
	}
	store, done, err := openStore(ctx, &c, true, true, stderr)
	if err != nil {
		return err
	}
	defer done()
	tok, err := parseSeed(stdin, time.Now())
	if err != nil {
		return err
	}
	v, err := store.Seed(ctx, c.Grant, tok, so)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "grant %s seeded: version %d\n", c.Grant, v)
	return nil
}

func cmdStatus(ctx context.Context, args []string, env func(string) string, stdout, stderr io.Writer) error {
	var c cli.Common
	fs := newFlagSet("status", stderr)
	c.Register(fs, env)
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parseArgs(fs, args); err != nil {
		return err
	}
	store, done, err := openStore(ctx, &c, false, false, stderr)
	if err != nil {
		return err
	}
	defer done()
	grants, err := grantsOf(ctx, store, c.Grant)
	if err != nil {
		return fmt.Errorf("cannot list the grants: %s: %s", redisTrouble(err), cli.Shown(err.Error()))
	}
	out := []tokenmgr.GrantStatus{}
	var errs []error
	corrupt := 0
	haveKey := c.KeyFile != "" || env(cli.EnvEncryptionKey) != ""
	for _, g := range grants {
		st, err := store.Status(ctx, g)
		if err == nil && haveKey {
			// With the key at hand, also decrypt: a damaged token field
			// shows here, not first in a worker.
			err = store.Check(ctx, g)
		}
		var bad *tokenmgr.CorruptRecordError
		switch {
		case errors.As(err, &bad):
			st.Grant, st.Status, st.Reason = g, "corrupt", err.Error()
			corrupt++
		case deniedByRedis(err):
			errs = append(errs, fmt.Errorf("%s: %s: %s", cli.Shown(g), redisTrouble(err), cli.Shown(err.Error())))
			continue
		case err != nil:
			errs = append(errs, fmt.Errorf("%s: %s", cli.Shown(g), cli.Shown(err.Error())))
			continue
		}
		out = append(out, shownStatus(st))
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(out); err != nil {
			return err
		}
	} else {
		printStatus(stdout, out, time.Now())
	}
	if corrupt > 0 {
		// Scripts and cron jobs see it in the exit status, not only people
		// reading the table.
		errs = append(errs, fmt.Errorf("%d of %d grants have a corrupt record: see their status and reason", corrupt, len(grants)))
	}
	return errors.Join(errs...)
}

// shownStatus bounds and cleans the strings of st that came from Redis:
// anyone who can write a record chooses them.
func shownStatus(st tokenmgr.GrantStatus) tokenmgr.GrantStatus {
	for _, f := range []*string{&st.Grant, &st.Status, &st.Reason, &st.TokenType, &st.Scope, &st.RotatedBy, &st.RefreshHolder} {
		*f = cli.Shown(*f)
	}
	return st
}

// printStatus prints the table of sts, which shownStatus has cleaned.
func printStatus(w io.Writer, sts []tokenmgr.GrantStatus, now time.Time) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "GRANT\tVERSION\tSTATUS\tEXPIRES IN\tROTATED\tBY\tREFRESHES\tLAST HOUR\tIDLE EXPIRY IN\tABSOLUTE EXPIRY IN\tREASON")
	for _, s := range sts {
		status, lastHour := s.Status, "?" // unknown: an old ACL did not count a rotation
		if s.Refreshing {
			status += " (refreshing: " + s.RefreshHolder + ", " + ago(s.RefreshStartedAt, now) + ")"
		}
		if s.RefreshesLastHour != nil {
			lastHour = strconv.FormatInt(*s.RefreshesLastHour, 10)
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\n", s.Grant, s.Version, status, until(s.Expiry, now),
			ago(s.RotatedAt, now), s.RotatedBy, s.RefreshCount, lastHour, until(s.IdleExpiry, now), until(s.AbsoluteExpiry, now), s.Reason)
	}
	tw.Flush()
}

func until(t, now time.Time) string {
	if t.IsZero() {
		return "-"
	}
	d := t.Sub(now)
	if d < 0 {
		return "expired " + roundDur(-d) + " ago"
	}
	return roundDur(d)
}

func ago(t, now time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return roundDur(now.Sub(t)) + " ago"
}

func roundDur(d time.Duration) string {
	switch {
	case d >= 48*time.Hour:
		return fmt.Sprintf("%dd", int(d.Hours()/24))
	case d >= time.Minute:
		return d.Round(time.Minute).String()
	default:
		return d.Round(time.Second).String()
	}
}

func cmdRotate(ctx context.Context, args []string, env func(string) string, stdout, stderr io.Writer) error {
	var c cli.Common
	fs := newFlagSet("rotate", stderr)
	c.Register(fs, env)
	if err := parseArgs(fs, args); err != nil {
		return err
	}
	if err := c.Validate(); err != nil {
		return err
	}
	o, err := c.Options()
	if err != nil {
		return err
	}
	defer cli.CloseClients(o)
	o.Logger = slog.New(logging.NewHandler(stderr, logging.FormatText, slog.LevelWarn)) // an operator reads it
	m, err := tokenmgr.New(ctx, o)
	if err != nil {
		return err
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		_ = m.Close(cctx)
	}()
	v, err := m.Rotate(ctx, c.Grant)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "grant %s rotated: version %d\n", c.Grant, v)
	return nil
}

func cmdRewrap(ctx context.Context, args []string, env func(string) string, stdout, stderr io.Writer) error {
	var c cli.Common
	fs := newFlagSet("rewrap", stderr)
	c.Register(fs, env)
	acceptPlain := fs.Bool("accept-plaintext", false, "with --grant: also seal that grant's values stored in plaintext (migrating a store written before encryption was on); without --grant: list the grants and fields stored in plaintext, and seal nothing")
	if err := parseArgs(fs, args); err != nil {
		return err
	}
	if c.InsecurePlain {
		return errors.New("rewrap needs the encryption keys, not --insecure-plaintext")
	}
	// Anyone who can write to Redis can store a plain: value; sealing it
	// would launder their token into one that every worker trusts. So
	// plaintext is sealed only for a grant the operator names, after
	// seeing what was found.
	finder := &plainFinder{}
	var finderOpts tokenmgr.Options
	store, done, err := openStore(ctx, &c, false, true, stderr, func(o *tokenmgr.Options) {
		if kr, ok := o.Sealer.(*tokenmgr.Keyring); ok {
			finder.inner = kr.WithPlaintextReads()
			if *acceptPlain && c.Grant != "" {
				o.Sealer = finder.inner
			}
			finderOpts = *o
			finderOpts.Sealer = finder
		}
	})
	if err != nil {
		return err
	}
	defer done()
	grants, err := grantsOf(ctx, store, c.Grant)
	if err != nil {
		return fmt.Errorf("cannot list the grants: %s: %s", redisTrouble(err), cli.Shown(err.Error()))
	}
	if *acceptPlain {
		found, err := findPlaintext(ctx, finderOpts, finder, grants, stdout)
		if err != nil {
			return err
		}
		if c.Grant == "" {
			if len(found) == 0 {
				fmt.Fprintln(stdout, "no values stored in plaintext")
				return nil
			}
			fmt.Fprintf(stdout, "check that these are your tokens (anyone who can write to Redis could have put them there), then seal each grant with:\n")
			for _, g := range found {
				fmt.Fprintf(stdout, "  refresher rewrap --accept-plaintext --grant %s\n", g)
			}
			return fmt.Errorf("%d grants hold values in plaintext; nothing was written: name each with --grant to seal it", len(found))
		}
	}
	fmt.Fprintf(stdout, "sealing under key %q: every process must already hold it\n", finder.inner.ActiveKeyID())
	var errs []error
	n := 0
	for _, g := range grants {
		wrote, err := store.Rewrap(ctx, g)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %s", cli.Shown(g), cli.Shown(err.Error())))
			continue
		}
		if wrote {
			n++
		}
	}
	fmt.Fprintf(stdout, "rewrapped %d of %d grants under the newest key\n", n, len(grants))
	return errors.Join(errs...)
}

// plainFinder opens values like its keyring with plaintext reads, and
// notes which fields of which grants were stored in plaintext.
type plainFinder struct {
	inner *tokenmgr.Keyring
	mu    sync.Mutex
	found map[string][]string // grant -> fields
}

func (f *plainFinder) Seal(grant, field string, plaintext []byte) (string, error) {
	return f.inner.Seal(grant, field, plaintext)
}

func (f *plainFinder) Open(grant, field, stored string) ([]byte, error) {
	if strings.HasPrefix(stored, "plain:") { // the README's stored form of a plaintext value
		f.mu.Lock()
		if f.found == nil {
			f.found = map[string][]string{}
		}
		// The library seals a token value for its field and record
		// ("access_token@FAMILY/VERSION"); the operator knows the field.
		name, _, _ := strings.Cut(field, "@")
		f.found[grant] = append(f.found[grant], name)
		f.mu.Unlock()
	}
	return f.inner.Open(grant, field, stored)
}

// findPlaintext lists, for each of grants, the fields stored in plaintext,
// with what the record says of its last writer, and returns those grants.
func findPlaintext(ctx context.Context, o tokenmgr.Options, f *plainFinder, grants []string, stdout io.Writer) ([]string, error) {
	a, err := tokenmgr.NewAdmin(o)
	if err != nil {
		return nil, err
	}
	var found []string
	for _, g := range grants {
		if err := a.Check(ctx, g); err != nil {
			continue // not readable even so: plain rewrap reports it
		}
		f.mu.Lock()
		fields := f.found[g]
		f.mu.Unlock()
		if len(fields) == 0 {
			continue
		}
		found = append(found, g)
		st, _ := a.Status(ctx, g)
		st = shownStatus(st)
		fmt.Fprintf(stdout, "grant %s (version %d, written %s by %s): %s stored in plaintext\n", cli.Shown(g), st.Version,
			st.RotatedAt.UTC().Format(time.RFC3339), st.RotatedBy, strings.Join(fields, ", "))
	}
	return found, nil
}

// grantLister lists the grants in the schedule: *tokenmgr.Admin and
// *tokenmgr.Manager.
type grantLister interface {
	Grants(ctx context.Context) ([]string, error)
}

// grantsOf is the one --grant, or every grant in the schedule, sorted.
func grantsOf(ctx context.Context, store grantLister, grant string) ([]string, error) {
	if grant != "" {
		return []string{grant}, nil
	}
	grants, err := store.Grants(ctx)
	sort.Strings(grants)
	return grants, err
}
