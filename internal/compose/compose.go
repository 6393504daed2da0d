// Package compose reads docker-compose.yml for tests, which check that
// every service's command uses flags the binaries really have (no Docker
// engine runs where the tests run).
package compose

import (
	"fmt"
	"os"

	"go.yaml.in/yaml/v3"
)

// Service is the part of a compose service the tests check.
type Service struct {
	Image       string            `yaml:"image"`
	Build       any               `yaml:"build"`
	Command     []string          `yaml:"command"`
	Environment map[string]string `yaml:"environment"`
	DependsOn   map[string]any    `yaml:"depends_on"`
}

// File is a compose file.
type File struct {
	Services map[string]Service `yaml:"services"`
	Volumes  map[string]any     `yaml:"volumes"`
}

// Load parses path strictly enough to catch typos in the keys it knows.
func Load(path string) (*File, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var f File
	if err := yaml.Unmarshal(raw, &f); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(f.Services) == 0 {
		return nil, fmt.Errorf("%s: no services", path)
	}
	for name, s := range f.Services {
		if s.Image == "" && s.Build == nil {
			return nil, fmt.Errorf("%s: service %s has neither image nor build", path, name)
		}
		for dep := range s.DependsOn {
			if _, ok := f.Services[dep]; !ok {
				return nil, fmt.Errorf("%s: service %s depends on unknown service %s", path, name, dep)
			}
		}
	}
	return &f, nil
}

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
