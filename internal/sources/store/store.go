// Package store is the local program store under EXECUTION_ROOT/store: the
// embedded default that needs no network. It holds content-addressed files
// and the messages that point at them:
//
//	DIR/files/<sha256>            code archives, runtimes, data
//	DIR/messages/<item_hash>.json full message envelopes (STORE, PROGRAM)
//	DIR/default_runtime           item hash of the default runtime's STORE message
//
// Everything is written to a temporary file in the same directory and
// renamed into place, so readers never see partial files.
package store

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/ctxio"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

// LocalAddress is the owner address of messages created locally.
const LocalAddress = "0x0000000000000000000000000000000000000000"

const (
	tmpPrefix          = ".tmp-"
	defaultRuntimeFile = "default_runtime"
)

// Store is safe for concurrent use: all writes are atomic renames of
// content-addressed names.
type Store struct {
	dir     string
	address string
	log     *slog.Logger
}

// Option configures a Store.
type Option func(*Store)

// WithAddress sets the owner address of locally created messages
// (default LocalAddress).
func WithAddress(addr string) Option { return func(s *Store) { s.address = addr } }

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(s *Store) { s.log = l } }

// Open opens (creating if needed) the store at dir and removes temporary
// files left by a crash.
func Open(dir string, opts ...Option) (*Store, error) {
	s := &Store{dir: dir, address: LocalAddress, log: slog.Default()}
	for _, o := range opts {
		o(s)
	}
	for _, sub := range []string{"", "files", "messages"} {
		p := filepath.Join(dir, sub)
		if err := os.MkdirAll(p, 0o755); err != nil {
			return nil, fmt.Errorf("store: %w", err)
		}
		entries, err := os.ReadDir(p)
		if err != nil {
			return nil, fmt.Errorf("store: %w", err)
		}
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), tmpPrefix) {
				_ = os.RemoveAll(filepath.Join(p, e.Name()))
			}
		}
	}
	return s, nil
}

// Dir returns the store directory.
func (s *Store) Dir() string { return s.dir }

// Address returns the owner address used for local messages.
func (s *Store) Address() string { return s.address }

func (s *Store) filePath(hash string) string { return filepath.Join(s.dir, "files", hash) }

func (s *Store) messagePath(hash string) string {
	return filepath.Join(s.dir, "messages", hash+".json")
}

func isSHA256(h string) bool {
	if len(h) != 64 {
		return false
	}
	for i := 0; i < len(h); i++ {
		if c := h[i]; !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// AddFile stores the content of r and returns its sha256 (hex). Storing the
// same content twice is harmless.
func (s *Store) AddFile(ctx context.Context, r io.Reader) (string, error) {
	tmp, err := os.CreateTemp(filepath.Join(s.dir, "files"), tmpPrefix+"add-*")
	if err != nil {
		return "", fmt.Errorf("store: %w", err)
	}
	h := sha256.New()
	if _, err := io.Copy(io.MultiWriter(tmp, h), ctxio.Reader(ctx, r)); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return "", fmt.Errorf("store: adding file: %w", err)
	}
	hash := hex.EncodeToString(h.Sum(nil))
	if err := s.commitTemp(tmp, hash); err != nil {
		return "", err
	}
	return hash, nil
}

// addFilePath stores the file at path, hard-linking it when the store is
// on the same filesystem and copying it otherwise.
func (s *Store) addFilePath(ctx context.Context, path string) (hash string, size int64, err error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, errkind.Wrap(errkind.InvalidInput, fmt.Errorf("store: %w", err))
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", 0, fmt.Errorf("store: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return "", 0, errkind.New(errkind.InvalidInput, "store: %s is not a regular file", path)
	}
	h := sha256.New()
	if _, err := io.Copy(h, ctxio.Reader(ctx, f)); err != nil {
		return "", 0, fmt.Errorf("store: hashing %s: %w", path, err)
	}
	hash = hex.EncodeToString(h.Sum(nil))
	dst := s.filePath(hash)
	if _, err := os.Stat(dst); err == nil {
		return hash, fi.Size(), nil
	}
	// Link under a temporary name first so that the final name only ever
	// appears complete, then rename.
	tmpName := filepath.Join(s.dir, "files", fmt.Sprintf("%slink-%s-%d", tmpPrefix, hash[:16], time.Now().UnixNano()))
	if err := os.Link(path, tmpName); err == nil {
		if err := os.Rename(tmpName, dst); err != nil {
			os.Remove(tmpName)
			return "", 0, fmt.Errorf("store: %w", err)
		}
		s.log.Debug("store: linked file", "src", path, "hash", hash)
		return hash, fi.Size(), nil
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return "", 0, fmt.Errorf("store: %w", err)
	}
	got, err := s.AddFile(ctx, f)
	if err != nil {
		return "", 0, err
	}
	if got != hash {
		return "", 0, fmt.Errorf("store: %s changed while being stored", path)
	}
	return hash, fi.Size(), nil
}

// commitTemp syncs and closes tmp and renames it to files/<hash>.
func (s *Store) commitTemp(tmp *os.File, hash string) error {
	fail := func(err error) error {
		tmp.Close()
		os.Remove(tmp.Name())
		return fmt.Errorf("store: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		return fail(err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		return fail(err)
	}
	if err := tmp.Close(); err != nil {
		return fail(err)
	}
	if err := os.Rename(tmp.Name(), s.filePath(hash)); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("store: %w", err)
	}
	syncDir(filepath.Join(s.dir, "files"))
	return nil
}

// FilePath returns the path of the stored file with content hash hash.
// NotFound when the store does not hold it.
func (s *Store) FilePath(hash string) (string, error) {
	if !isSHA256(hash) {
		return "", errkind.New(errkind.NotFound, "file %s not in the local store (not a sha256)", hash)
	}
	p := s.filePath(hash)
	if _, err := os.Stat(p); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return "", errkind.New(errkind.NotFound, "file %s not in the local store", hash)
		}
		return "", fmt.Errorf("store: %w", err)
	}
	return p, nil
}

// PutMessage stores m (full envelope) under its item hash. Inline messages
// must verify: their item_hash is checked against item_content.
func (s *Store) PutMessage(m *message.Message) error {
	if m == nil {
		return errkind.New(errkind.InvalidInput, "store: nil message")
	}
	if err := message.ValidateItemHash(m.ItemHash); err != nil {
		return err
	}
	data, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return fmt.Errorf("store: encoding message %s: %w", m.ItemHash, err)
	}
	// Refuse what GetMessage would refuse to read back.
	if _, err := (message.ParseOptions{ExpectedHash: m.ItemHash}).Parse(data); err != nil {
		return fmt.Errorf("store: message %s: %w", m.ItemHash, err)
	}
	return writeAtomic(s.messagePath(m.ItemHash), append(data, '\n'))
}

// GetMessage returns the stored message with item hash hash; NotFound when
// the store does not hold it.
func (s *Store) GetMessage(hash string) (*message.Message, error) {
	if !message.IsItemHash(hash) {
		return nil, message.ValidateItemHash(hash)
	}
	data, err := os.ReadFile(s.messagePath(hash))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, errkind.New(errkind.NotFound, "message %s not in the local store", hash)
		}
		return nil, fmt.Errorf("store: %w", err)
	}
	m, err := message.ParseOptions{ExpectedHash: hash}.Parse(data)
	if err != nil {
		return nil, fmt.Errorf("store: message %s: %w", hash, err)
	}
	return m, nil
}

// Messages lists the item hashes of the stored messages.
func (s *Store) Messages() ([]string, error) {
	entries, err := os.ReadDir(filepath.Join(s.dir, "messages"))
	if err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	var out []string
	for _, e := range entries {
		if h, ok := strings.CutSuffix(e.Name(), ".json"); ok && !strings.HasPrefix(h, tmpPrefix) {
			out = append(out, h)
		}
	}
	return out, nil
}

// AddStoreMessage creates and stores a STORE message pointing at the
// stored file fileHash (which must be in the store) and returns it. The
// message time is fixed, so the same file always gets the same ref.
func (s *Store) AddStoreMessage(fileHash string, metadata map[string]any) (*message.Message, error) {
	p, err := s.FilePath(fileHash)
	if err != nil {
		return nil, err
	}
	fi, err := os.Stat(p)
	if err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	return s.storeMessage(fileHash, fi.Size(), metadata, epoch)
}

// storeMessage creates and stores a STORE message pointing at the stored
// file fileHash.
func (s *Store) storeMessage(fileHash string, size int64, metadata map[string]any, at time.Time) (*message.Message, error) {
	content := message.StoreContent{
		Address:  s.address,
		Time:     unixSeconds(at),
		ItemType: message.ItemStorage,
		ItemHash: fileHash,
		Size:     size,
		Metadata: metadata,
	}
	m, err := message.InlineMessage(message.TypeStore, content, s.address, at)
	if err != nil {
		return nil, err
	}
	m.Chain = "ETH"
	m.Channel = "local"
	if err := s.PutMessage(m); err != nil {
		return nil, err
	}
	return m, nil
}

// AddRuntime stores the runtime image at squashfsPath (hard-linked when on
// the same filesystem, else copied) with a STORE message pointing at it,
// and returns that message's item hash, the ref a PROGRAM's runtime.ref
// uses. With makeDefault it becomes the default runtime of program upload.
// Adding the same image again gives the same ref.
func (s *Store) AddRuntime(ctx context.Context, squashfsPath, comment string, makeDefault bool) (string, error) {
	hash, size, err := s.addFilePath(ctx, squashfsPath)
	if err != nil {
		return "", err
	}
	var meta map[string]any
	if comment != "" {
		meta = map[string]any{"comment": comment}
	}
	m, err := s.storeMessage(hash, size, meta, epoch)
	if err != nil {
		return "", err
	}
	if makeDefault {
		if err := writeAtomic(filepath.Join(s.dir, defaultRuntimeFile), []byte(m.ItemHash+"\n")); err != nil {
			return "", err
		}
	}
	s.log.Info("store: runtime added", "ref", m.ItemHash, "file", hash, "bytes", size, "default", makeDefault)
	return m.ItemHash, nil
}

// ErrNoDefaultRuntime is returned (kind ResourceMissing) when no default
// runtime was registered.
var ErrNoDefaultRuntime = errors.New("no default runtime in the local store: run `make runtime` first, or pass a runtime ref")

// DefaultRuntime returns the ref of the default runtime.
func (s *Store) DefaultRuntime() (string, error) {
	data, err := os.ReadFile(filepath.Join(s.dir, defaultRuntimeFile))
	if errors.Is(err, os.ErrNotExist) {
		return "", errkind.Wrap(errkind.ResourceMissing, ErrNoDefaultRuntime)
	}
	if err != nil {
		return "", fmt.Errorf("store: %w", err)
	}
	ref := strings.TrimSpace(string(data))
	if err := message.ValidateItemHash(ref); err != nil {
		return "", fmt.Errorf("store: %s: %w", defaultRuntimeFile, err)
	}
	return ref, nil
}

// epoch is the time of messages the store creates unless told otherwise:
// a fixed time keeps their item hashes a function of their content only, so
// registering the same runtime or uploading the same program twice gives
// the same ref.
var epoch = time.Unix(0, 0)

// unixSeconds converts t to the float seconds Aleph uses.
func unixSeconds(t time.Time) float64 { return float64(t.UnixNano()) / 1e9 }

func writeAtomic(path string, data []byte) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, tmpPrefix+"*")
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	_, err = tmp.Write(data)
	if err == nil {
		err = tmp.Sync()
	}
	if err == nil {
		err = tmp.Chmod(0o644)
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("store: %w", err)
	}
	syncDir(dir)
	return nil
}

func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
}
