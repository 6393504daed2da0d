// Command refresher is the optional pre-rotation pod of tokenmgr: it
// refreshes grants before their tokens expire (so no worker waits on the
// provider), keeps idle grants alive, bootstraps grants with the
// authorization-code flow, serves health and metrics, and an operator
// dashboard of every grant with one-click re-consent. Its operator
// subcommands seed, inspect and rotate grants.
//
//	refresher run    [flags]          the pod
//	refresher seed   --grant G        import an oauth2 token JSON from stdin
//	refresher status [--grant G] [--json]
//	refresher rotate --grant G        one fenced refresh now
//	refresher rewrap [--grant G]      re-encrypt under the newest key
//	refresher probe  --url URL        exit 0 if URL answers 2xx (container healthchecks)
//	refresher version                 or --version
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/tokenmgr/tokenmgr/internal/buildinfo"
	"github.com/tokenmgr/tokenmgr/internal/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdin, os.Stdout, os.Stderr)
	stop()
	os.Exit(cli.Exit("refresher", err, os.Stderr))
}

const usage = `usage: refresher COMMAND [flags]

commands:
  run      refresh grants before they expire; serve /healthz, /readyz, /metrics and, when an operator
           turns it on, the dashboard (/, /api/grants) with /connect/{grant} and /callback
  seed     import a token JSON from standard input for --grant
  status   show grants (metadata only, never a token)
  rotate   force one fenced refresh of --grant now
  rewrap   re-encrypt every grant (or --grant) under the newest encryption key
  probe    GET --url and exit 0 on a 2xx answer, 1 otherwise (a healthcheck for images without curl)
  version  print the version (also --version)

Run 'refresher COMMAND -h' for the flags of a command.
`

func run(ctx context.Context, args []string, env func(string) string, stdin io.Reader, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return cli.Usagef("no command")
	}
	switch args[0] {
	case "run":
		return cmdRun(ctx, args[1:], env, stdout, stderr)
	case "seed":
		return cmdSeed(ctx, args[1:], env, stdin, stdout, stderr)
	case "status":
		return cmdStatus(ctx, args[1:], env, stdout, stderr)
	case "rotate":
		return cmdRotate(ctx, args[1:], env, stdout, stderr)
	case "rewrap":
		return cmdRewrap(ctx, args[1:], env, stdout, stderr)
	case "probe":
		return cmdProbe(ctx, args[1:], stderr)
	case "version", "--version", "-version":
		fmt.Fprintln(stdout, buildinfo.String("refresher"))
		return nil
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	fmt.Fprint(stderr, usage)
	return cli.Usagef("unknown command %q", args[0])
}
