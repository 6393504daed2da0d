package compose

import (
	"slices"
	"strings"
	"testing"
)

func TestProjectComposeFile(t *testing.T) {
	f, err := Load("../../docker-compose.yml")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"redis", "fakeidp", "refresher", "demo-worker"} {
		if _, ok := f.Services[want]; !ok {
			t.Errorf("service %s missing", want)
		}
	}
	if cmd := f.Services["redis"].Command; !slices.Contains(cmd, "--appendonly") || cmd[slices.Index(cmd, "--appendonly")+1] != "yes" {
		t.Errorf("redis without append-only persistence: %v", cmd)
	}
	if f.Services["fakeidp"].Build == nil {
		t.Errorf("the image is built by the fakeidp service; nothing builds it")
	}
	for name, s := range f.Services {
		if s.Restart == "" || s.Restart == "no" {
			t.Errorf("service %s has no restart policy", name)
		}
	}
	if f.Services["redis"].Healthcheck == nil {
		t.Errorf("redis has no healthcheck; the services wait for it to be healthy")
	}
}

// A minimal valid service, for the documents below.
const okService = "services:\n  a:\n    image: x\n"

func TestParseRefusesUnknownKeys(t *testing.T) {
	for _, tc := range []struct{ name, doc, want string }{
		{"top-level typo", okService + "volume:\n  data:\n", `top level: unknown key "volume"`},
		{"top-level key not an extension", okService + "y-common: {}\n", `top level: unknown key "y-common"`},
		{"service typo", "services:\n  a:\n    image: x\n    comand: [a]\n", `service a: unknown key "comand"`},
		{"healthcheck typo", "services:\n  a:\n    image: x\n    healthcheck:\n      test: [CMD, a]\n      intervall: 2s\n", `field intervall not found`},
		{"deploy typo", "services:\n  a:\n    image: x\n    deploy:\n      replica: 3\n", `service a deploy: unknown key "replica"`},
		{"typo behind a merge key", "x-base: &base\n  restrat: always\nservices:\n  a:\n    <<: *base\n    image: x\n", `service a: unknown key "restrat"`},
		{"unknown restart policy", "services:\n  a:\n    image: x\n    restart: sometimes\n", `restart "sometimes"`},
		{"no image or build", "services:\n  a:\n    command: [a]\n", `neither image nor build`},
		{"unknown dependency", "services:\n  a:\n    image: x\n    depends_on:\n      b:\n        condition: service_started\n", `unknown service b`},
		{"no services", "volumes:\n  data:\n", `no services`},
		{"empty", "", `empty document`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.doc))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got error %v, want one containing %q", err, tc.want)
			}
		})
	}
}

// What the Compose Specification allows and this project's file uses or
// may use: extensions, anchors and merge keys, healthchecks, restart
// policies, pull_policy, ports, volumes, deploy.
func TestParseAcceptsSpecKeys(t *testing.T) {
	doc := `
name: demo
x-env: &env
  A: "1"
x-service: &service
  image: app:dev
  restart: on-failure:3
services:
  a:
    <<: *service
    build: .
    pull_policy: build
    command: ["app", "--flag"]
    environment:
      <<: *env
      B: "2"
    healthcheck:
      test: ["CMD", "app", "probe"]
      interval: 5s
      timeout: 2s
      retries: 3
      start_period: 10s
    ports:
      - "127.0.0.1:8080:8080"
    volumes:
      - data:/data
    read_only: true
    x-note: kept for tools
  b:
    image: app:dev
    restart: unless-stopped
    deploy:
      replicas: 3
    depends_on:
      a:
        condition: service_healthy
volumes:
  data:
`
	f, err := Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	a := f.Services["a"]
	if a.Image != "app:dev" || a.Restart != "on-failure:3" || a.Env()("A") != "1" || a.Env()("B") != "2" {
		t.Errorf("merge keys not applied: image %q restart %q env %v", a.Image, a.Restart, a.Environment)
	}
	if a.Healthcheck == nil || a.Healthcheck.Retries != 3 {
		t.Errorf("healthcheck: %+v", a.Healthcheck)
	}
	if b := f.Services["b"]; b.Deploy == nil || b.Deploy.Replicas == nil || *b.Deploy.Replicas != 3 {
		t.Errorf("deploy: %+v", b.Deploy)
	}
}
