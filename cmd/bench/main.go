// Command bench measures tokenmgr beside its peers on this machine and
// prints markdown tables (the figures of BENCHMARKS.md); it also writes
// the plots as SVG. With --write it regenerates BENCHMARKS.md as a whole:
// the goals with the verdicts computed from this run's numbers, then every
// figure's tables.
//
//	go run ./cmd/bench [--figures 1,2,3,5,6,8,9] [--out docs/bench] [--write BENCHMARKS.md]
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "bench:", err)
		}
		os.Exit(2)
	}
}

// verdict is a figure's measured result against its goal, computed from
// the numbers it measured.
type verdict struct {
	met     bool
	skipped bool   // not measured (no redis-server): neither met nor missed
	result  string // the numbers the goal is judged on
	why     string // one sentence, when missed
}

// env is where a figure's plots go, and how its markdown links them.
type env struct {
	dir  string                   // directory of the SVG files
	link func(file string) string // a plot's address as the markdown sees it
}

type figure struct {
	n          int
	name       string // the figure's title
	short      string // its name in the goals table
	peer, goal string
	run        func(ctx context.Context, w io.Writer, e env) (verdict, error)
}

var figures = []figure{
	{1, "Token() on a fresh token vs x/oauth2 ReuseTokenSource", "`Token()` ns/op and allocs/op on a fresh token",
		"x/oauth2 `ReuseTokenSource`", "at most 0.2x its ns/op serially and in RunParallel at 2 CPUs; 0 allocs", fig1},
	{2, "Redis commands per Token() call", "Redis commands per `Token()`",
		"reading Redis on every call (1.0)", "0 between rotations", fig2},
	{3, "IdP refresh calls and invalid_grant per rotation vs fleet size", "IdP refresh calls and `invalid_grant` per rotation, fleets of 1-1000",
		"per-worker x/oauth2; shared Redis pair without a lock", "exactly 1 and 0 at every fleet size", fig3},
	{4, "Redis commands per rotation vs fleet size", "Redis commands per worker per rotation",
		"every worker taking the lock", "at most 2 at 1000 workers with all tokens expired at once", fig4},
	{5, "rotation-to-adoption latency", "rotation-to-adoption latency",
		"version polling every 100 ms", "p99 at most 5 ms at 1000 subscribed managers on redis-server", fig5},
	{6, "Token() latency while a refresh is in flight", "`Token()` p99 while a refresh is in flight (IdP 500 ms)",
		"`ReuseTokenSource` (blocks)", "at most 2x its own steady state", fig6},
	{7, "refresher scheduling tick with 100k grants", "refresher tick with 100k grants",
		"full SCAN", "at least 100x cheaper in time", fig7},
	{8, "Redis memory per grant", "Redis memory per grant, encryption included",
		"-", "at most 300 B beyond the raw token bytes, default server config", fig8},
	{9, "messages and Redis CPU per rotation, 10k grants, 100 managers each using 10 grants, 3-master Redis Cluster",
		"rotation messages and Redis CPU per rotation on a 3-master Cluster, 100 managers of 10 grants each",
		"the global channel (`MessagesGlobal`)",
		"sharded: each manager hears only its own grants' rotations (0.01 per manager per rotation), and Redis CPU per rotation flat (within 1.25x) from 1k to 10k grants", fig9},
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	which := fs.String("figures", "all", "comma-separated figure numbers, or all")
	out := fs.String("out", "docs/bench", "`dir` for the SVG plots")
	write := fs.String("write", "", "regenerate `FILE` (BENCHMARKS.md) from this run: goals, verdicts and every figure")
	if err := fs.Parse(args); err != nil {
		return err
	}
	want := map[int]bool{}
	if *which != "all" {
		for _, f := range strings.Split(*which, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil {
				return fmt.Errorf("--figures %q: want numbers", *which)
			}
			want[n] = true
		}
	}
	if err := os.MkdirAll(*out, 0o755); err != nil {
		return err
	}
	// Plots are linked from where the markdown lives: the written file's
	// directory, or the working directory for stdout.
	base := "."
	if *write != "" {
		base = filepath.Dir(*write)
	}
	e := env{dir: *out, link: func(file string) string {
		p := filepath.Join(*out, file)
		if rel, err := filepath.Rel(base, p); err == nil {
			p = rel
		}
		return filepath.ToSlash(p)
	}}
	m := detectMachine()
	fmt.Fprintf(stdout, "Machine: %s\n\n", m.line())
	start := time.Now()
	var done []ranFigure
	for _, f := range figures {
		if len(want) > 0 && !want[f.n] {
			continue
		}
		fmt.Fprintf(stdout, "## Figure %d: %s\n\n", f.n, f.name)
		var md bytes.Buffer
		t0 := time.Now()
		v, err := f.run(ctx, io.MultiWriter(stdout, &md), e)
		if err != nil {
			return fmt.Errorf("figure %d: %w", f.n, err)
		}
		fmt.Fprintln(stdout)
		fmt.Fprintf(stderr, "figure %d: %s in %s\n", f.n, v.status(), time.Since(t0).Round(100*time.Millisecond))
		done = append(done, ranFigure{f, v, md.String()})
	}
	took := time.Since(start)
	fmt.Fprintf(stderr, "all figures in %s\n", took.Round(time.Second))
	if *write == "" {
		return nil
	}
	cmd := "go run ./cmd/bench --write " + *write + " --out " + *out
	if len(want) > 0 {
		cmd += " --figures " + *which
	}
	return os.WriteFile(*write, document(cmd, m, took, done), 0o644)
}

type ranFigure struct {
	figure
	v  verdict
	md string
}

func (v verdict) status() string {
	switch {
	case v.skipped:
		return "skipped"
	case v.met:
		return "met"
	}
	return "missed"
}
