// Command bench measures tokenmgr beside its peers on this machine and
// prints markdown tables (the figures of BENCHMARKS.md); it also writes
// the plots as SVG.
//
//	go run ./cmd/bench [--figures 1,2,3,5,6,8] [--out docs/bench]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"syscall"
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

type figure struct {
	n    int
	name string
	run  func(ctx context.Context, w io.Writer, out string) error
}

var figures = []figure{
	{1, "Token() on a fresh token vs x/oauth2 ReuseTokenSource", fig1},
	{2, "Redis commands per Token() call", fig2},
	{3, "IdP refresh calls and invalid_grant per rotation vs fleet size", fig3},
	{4, "Redis commands per rotation vs fleet size", fig4},
	{5, "rotation-to-adoption latency", fig5},
	{6, "Token() latency while a refresh is in flight", fig6},
	{7, "refresher scheduling tick with 100k grants", fig7},
	{8, "Redis memory per grant", fig8},
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	which := fs.String("figures", "all", "comma-separated figure numbers, or all")
	out := fs.String("out", "docs/bench", "`dir` for the SVG plots")
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
	fmt.Fprintf(stdout, "Machine: %s/%s, %d CPUs, %s\n\n", runtime.GOOS, runtime.GOARCH, runtime.NumCPU(), runtime.Version())
	for _, f := range figures {
		if len(want) > 0 && !want[f.n] {
			continue
		}
		fmt.Fprintf(stdout, "## Figure %d: %s\n\n", f.n, f.name)
		if err := f.run(ctx, stdout, *out); err != nil {
			return fmt.Errorf("figure %d: %w", f.n, err)
		}
		fmt.Fprintln(stdout)
	}
	return nil
}
