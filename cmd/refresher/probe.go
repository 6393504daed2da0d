package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/tokenmgr/tokenmgr/internal/cli"
)

// urlList is a repeatable --url.
type urlList []string

func (u *urlList) String() string { return strings.Join(*u, ",") }
func (u *urlList) Set(v string) error {
	p, err := url.Parse(v)
	if err != nil || (p.Scheme != "http" && p.Scheme != "https") || p.Host == "" {
		return errors.New("want an http:// or https:// URL with a host")
	}
	*u = append(*u, v)
	return nil
}

// cmdProbe is "refresher probe": GET each --url in turn; exit 0, silently,
// when every one answers 2xx, else 1 with the first failure on stderr. For
// container healthchecks in the distroless image, which has no shell,
// curl or wget.
func cmdProbe(ctx context.Context, args []string, stderr io.Writer) error {
	urls, timeout, err := parseProbeFlags(args, stderr)
	if err != nil {
		return err
	}
	client := &http.Client{Timeout: timeout}
	for _, u := range urls {
		if err := probe(ctx, client, u); err != nil {
			return err
		}
	}
	return nil
}

// parseProbeFlags reads probe's command line: the URLs (default
// http://127.0.0.1:8080/healthz) and the timeout of each request.
func parseProbeFlags(args []string, stderr io.Writer) ([]string, time.Duration, error) {
	fs := newFlagSet("probe", stderr)
	var urls urlList
	fs.Var(&urls, "url", "`URL` to GET; repeat to check several (all must answer 2xx) [http://127.0.0.1:8080/healthz]")
	timeout := fs.Duration("timeout", 2*time.Second, "for each request, connection included")
	if err := parseArgs(fs, args); err != nil {
		return nil, 0, err
	}
	if *timeout <= 0 {
		return nil, 0, errors.New("--timeout must be positive")
	}
	if len(urls) == 0 {
		urls = urlList{"http://127.0.0.1:8080/healthz"}
	}
	return urls, *timeout, nil
}

func probe(ctx context.Context, client *http.Client, u string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return fmt.Errorf("probe %s: %w", u, err)
	}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("probe: %w", err) // *url.Error names the URL
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
		return nil
	}
	// The endpoints answer with a one-line reason: show it.
	line, _ := bufio.NewReader(io.LimitReader(resp.Body, 4096)).ReadString('\n')
	return fmt.Errorf("probe %s: %s: %s", u, resp.Status, cli.Shown(strings.TrimSpace(line)))
}
