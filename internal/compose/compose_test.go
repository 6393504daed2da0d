package compose

import (
	"slices"
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
}
