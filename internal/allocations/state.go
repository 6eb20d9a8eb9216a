package allocations

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// StateFile is the name of the allocation's file under EXECUTION_ROOT.
const StateFile = "allocations.json"

// load reads the saved allocation; a missing file is an empty one.
func load(path string) (Allocation, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return Allocation{PersistentVMs: []string{}, Instances: []string{}}, nil
	}
	if err != nil {
		return Allocation{}, fmt.Errorf("reading the saved allocation: %w", err)
	}
	a, errs := Parse(b)
	if len(errs) > 0 {
		return Allocation{}, fmt.Errorf("the saved allocation %s is invalid: %s", path, errs[0].Msg)
	}
	return a, nil
}

// save writes the allocation so that a crash at any moment leaves either
// the old file or the new one: a temporary file, synced, renamed over the
// old one, and the directory synced.
func save(path string, a Allocation) error {
	b, err := json.MarshalIndent(Allocation{PersistentVMs: a.PersistentVMs, Instances: a.Instances}, "", "  ")
	if err != nil {
		return err
	}
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, StateFile+".tmp-*")
	if err != nil {
		return fmt.Errorf("saving the allocation: %w", err)
	}
	defer func() { _ = os.Remove(tmp.Name()) }() // after the rename: no such file
	if _, err := tmp.Write(append(b, '\n')); err != nil {
		_ = tmp.Close()
		return fmt.Errorf("saving the allocation: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		_ = tmp.Close()
		return fmt.Errorf("saving the allocation: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("saving the allocation: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("saving the allocation: %w", err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("saving the allocation: %w", err)
	}
	defer func() { _ = d.Close() }()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("saving the allocation: %w", err)
	}
	return nil
}
