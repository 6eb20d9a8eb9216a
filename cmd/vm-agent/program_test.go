package main

import (
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
)

func TestExecutableArgv(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string, mode os.FileMode) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), mode); err != nil {
			t.Fatal(err)
		}
	}
	write("run", "#!/bin/sh\n", 0o755)
	write("script.sh", "#!/bin/sh -e\necho\n", 0o644)
	write("plain.py", "#!/usr/bin/python3\n", 0o644)
	write("data", "no shebang", 0o644)

	tests := []struct {
		entry   string
		want    []string
		wantErr string
	}{
		{"run", []string{filepath.Join(dir, "run")}, ""},
		{"script.sh", []string{"/bin/sh", "-e", filepath.Join(dir, "script.sh")}, ""},
		{"plain.py", []string{"/usr/bin/python3", filepath.Join(dir, "plain.py")}, ""},
		{"data", nil, "no #! line"},
		{"missing", nil, "no such file"},
		{"../etc/passwd", nil, "not a path inside"},
		{"/bin/sh", nil, "not a path inside"},
		{".", nil, "not a regular file"},
	}
	for _, tt := range tests {
		got, err := executableArgv(dir, tt.entry)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("%s: err = %v, want %q", tt.entry, err, tt.wantErr)
			}
			continue
		}
		if err != nil || !reflect.DeepEqual(got, tt.want) {
			t.Errorf("%s: got %v, %v; want %v", tt.entry, got, err, tt.want)
		}
	}
}

func TestProgramEnv(t *testing.T) {
	t.Setenv("AGENT_ONLY", "secret")
	cfg := guest.Config{
		Interface: guest.InterfaceASGI,
		Variables: map[string]string{"A": "1", "PATH": "/custom", "BAD=NAME": "x", "ALEPH_API_HOST": "user"},
		AlephEnv:  map[string]string{"ALEPH_API_HOST": "http://localhost"},
	}
	env := programEnv(cfg, programSpec{apiSocket: "/run/aleph/api.sock"}, slog.New(slog.DiscardHandler))
	for _, want := range []string{
		"A=1", "PATH=/custom", "HOME=/root", "LANG=C.UTF-8", "PYTHONUNBUFFERED=1",
		// The program's variables win over ALEPH_* values, as in aleph-vm
		// (init1.py: setup_variables runs after the environment is set).
		"ALEPH_API_HOST=user", "ALEPH_API_UNIX_SOCKET=/run/aleph/api.sock",
	} {
		if !slices.Contains(env, want) {
			t.Errorf("env lacks %s: %v", want, env)
		}
	}
	for _, kv := range env {
		if strings.HasPrefix(kv, "AGENT_ONLY=") || strings.HasPrefix(kv, "BAD=") {
			t.Errorf("unexpected %s", kv)
		}
	}
}
