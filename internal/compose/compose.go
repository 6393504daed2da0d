// Package compose reads docker-compose.yml for tests, which check that
// every service's command uses flags the binaries really have (no Docker
// engine runs where the tests run).
package compose

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"regexp"
	"slices"
	"strings"

	"go.yaml.in/yaml/v3"
)

// File is a compose file. Load refuses a key that is neither here nor an
// extension (x-...): a typo would otherwise be ignored by the checks and
// then by Docker Compose, which only warns about some.
type File struct {
	Name     string             `yaml:"name"`
	Version  string             `yaml:"version"` // obsolete, still accepted by Compose
	Services map[string]Service `yaml:"services"`
	Volumes  map[string]any     `yaml:"volumes"`
	Networks map[string]any     `yaml:"networks"`
	Secrets  map[string]any     `yaml:"secrets"`
	Configs  map[string]any     `yaml:"configs"`
	Include  []any              `yaml:"include"`

	Extensions map[string]any `yaml:",inline"` // x-... keys only
}

// Service is one compose service: the keys of the Compose Specification
// this project uses or is likely to, typed where the tests look inside.
// A key the specification allows but this list lacks is refused: add it.
type Service struct {
	Image           string            `yaml:"image"`
	Build           any               `yaml:"build"`
	PullPolicy      string            `yaml:"pull_policy"`
	Command         []string          `yaml:"command"`
	Entrypoint      any               `yaml:"entrypoint"`
	Environment     map[string]string `yaml:"environment"`
	EnvFile         any               `yaml:"env_file"`
	DependsOn       map[string]any    `yaml:"depends_on"`
	Restart         string            `yaml:"restart"`
	Healthcheck     *Healthcheck      `yaml:"healthcheck"`
	Deploy          *Deploy           `yaml:"deploy"`
	Ports           []any             `yaml:"ports"`
	Expose          []any             `yaml:"expose"`
	Volumes         []any             `yaml:"volumes"`
	Tmpfs           any               `yaml:"tmpfs"`
	ReadOnly        bool              `yaml:"read_only"`
	User            string            `yaml:"user"`
	WorkingDir      string            `yaml:"working_dir"`
	ContainerName   string            `yaml:"container_name"`
	Hostname        string            `yaml:"hostname"`
	Init            bool              `yaml:"init"`
	Labels          any               `yaml:"labels"`
	Logging         map[string]any    `yaml:"logging"`
	Networks        any               `yaml:"networks"`
	ExtraHosts      any               `yaml:"extra_hosts"`
	Profiles        []string          `yaml:"profiles"`
	Secrets         []any             `yaml:"secrets"`
	Configs         []any             `yaml:"configs"`
	CapAdd          []string          `yaml:"cap_add"`
	CapDrop         []string          `yaml:"cap_drop"`
	SecurityOpt     []string          `yaml:"security_opt"`
	StopGracePeriod string            `yaml:"stop_grace_period"`
	StopSignal      string            `yaml:"stop_signal"`
	Ulimits         map[string]any    `yaml:"ulimits"`
	Platform        string            `yaml:"platform"`

	Extensions map[string]any `yaml:",inline"` // x-... keys only
}

// Healthcheck is a service's healthcheck.
type Healthcheck struct {
	Test          any    `yaml:"test"` // ["CMD", ...], ["CMD-SHELL", "..."], ["NONE"] or a string
	Interval      string `yaml:"interval"`
	Timeout       string `yaml:"timeout"`
	Retries       int    `yaml:"retries"`
	StartPeriod   string `yaml:"start_period"`
	StartInterval string `yaml:"start_interval"`
	Disable       bool   `yaml:"disable"`
}

// Deploy is a service's deploy section.
type Deploy struct {
	Mode           string         `yaml:"mode"`
	Replicas       *int           `yaml:"replicas"`
	Resources      map[string]any `yaml:"resources"`
	RestartPolicy  map[string]any `yaml:"restart_policy"`
	UpdateConfig   map[string]any `yaml:"update_config"`
	RollbackConfig map[string]any `yaml:"rollback_config"`
	Placement      map[string]any `yaml:"placement"`
	Labels         any            `yaml:"labels"`
	EndpointMode   string         `yaml:"endpoint_mode"`

	Extensions map[string]any `yaml:",inline"` // x-... keys only
}

// restartPolicy is what Compose accepts for restart.
var restartPolicy = regexp.MustCompile(`^(no|always|unless-stopped|on-failure(:[0-9]+)?)$`)

// Load parses path strictly: unknown keys (typos) are refused, as are
// services without an image or build, dependencies on unknown services
// and unknown restart policies.
func Load(path string) (*File, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	f, err := Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return f, nil
}

// Parse is Load of a document in memory.
func Parse(raw []byte) (*File, error) {
	var f File
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errors.New("empty document")
		}
		return nil, err
	}
	var errs []error
	errs = append(errs, extensionsOnly("top level", f.Extensions)...)
	if len(f.Services) == 0 {
		errs = append(errs, errors.New("no services"))
	}
	for _, name := range sortedKeys(f.Services) {
		s := f.Services[name]
		where := "service " + name
		errs = append(errs, extensionsOnly(where, s.Extensions)...)
		if s.Deploy != nil {
			errs = append(errs, extensionsOnly(where+" deploy", s.Deploy.Extensions)...)
		}
		if s.Image == "" && s.Build == nil {
			errs = append(errs, fmt.Errorf("%s has neither image nor build", where))
		}
		if s.Restart != "" && !restartPolicy.MatchString(s.Restart) {
			errs = append(errs, fmt.Errorf("%s: restart %q: want no, always, on-failure[:N] or unless-stopped", where, s.Restart))
		}
		for _, dep := range sortedKeys(s.DependsOn) {
			if _, ok := f.Services[dep]; !ok {
				errs = append(errs, fmt.Errorf("%s depends on unknown service %s", where, dep))
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return &f, nil
}

// extensionsOnly refuses the keys the inline map caught unless they are
// extensions (x-...), which Compose ignores by design.
func extensionsOnly(where string, m map[string]any) []error {
	var errs []error
	for _, k := range sortedKeys(m) {
		if !strings.HasPrefix(k, "x-") {
			errs = append(errs, fmt.Errorf("%s: unknown key %q", where, k))
		}
	}
	return errs
}

func sortedKeys[V any](m map[string]V) []string { return slices.Sorted(maps.Keys(m)) }

// Env returns a getenv for a service's environment.
func (s Service) Env() func(string) string {
	return func(k string) string { return s.Environment[k] }
}

// Commands returns, for each service whose command starts with bin, the
// arguments after it.
func (f *File) Commands(bin string) map[string][]string {
	out := map[string][]string{}
	for name, s := range f.Services {
		if len(s.Command) > 0 && s.Command[0] == bin {
			out[name] = s.Command[1:]
		}
	}
	return out
}
