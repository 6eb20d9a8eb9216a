package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/examples"
	"github.com/aleph-vm-go/vm-supervisor/internal/config"
	"github.com/aleph-vm-go/vm-supervisor/internal/delegation"
	"github.com/aleph-vm-go/vm-supervisor/internal/guestapi"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/pep440"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/alephapi"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/cache"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/store"
)

func openStore(s *config.Settings) (*store.Store, error) {
	st, err := store.Open(filepath.Join(s.ExecutionRoot, config.StoreDirName))
	if err != nil {
		return nil, fmt.Errorf("opening the local program store: %w", err)
	}
	return st, nil
}

// newDelegations reads owners' delegations (security aggregates) from the
// Aleph API, one cache for the control API, use_latest and the reactor so
// that they agree; nil in fake-data mode, where only owners act.
func newDelegations(s *config.Settings, log *slog.Logger) *delegation.Checker {
	if s.FakeDataProgram != "" {
		return nil
	}
	return delegation.New(alephapi.New(s.APIServer, s.IPFSGateway, alephapi.WithLogger(log)), s.CacheTTLSecurityAggregate)
}

// newSource resolves programs from the local store first, then the Aleph
// API; in fake-data mode every hash maps to FAKE_DATA_PROGRAM. deleg
// (may be nil) tells whose amends of a use_latest ref count.
func newSource(s *config.Settings, st *store.Store, deleg *delegation.Checker, log *slog.Logger) (pool.ProgramSource, error) {
	if s.FakeDataProgram != "" {
		log.Warn("fake-data mode: every program is " + s.FakeDataProgram)
		return sources.NewFakeData(s.FakeDataProgram, examples.FastAPIEntrypoint, st, sources.WithLogger(log))
	}
	c, err := cache.Open(s.CacheRoot, cache.WithLogger(log))
	if err != nil {
		return nil, fmt.Errorf("opening the download cache: %w", err)
	}
	api := alephapi.New(s.APIServer, s.IPFSGateway, alephapi.WithLogger(log))
	limits := sources.DefaultLimits()
	limits.Program = s.MaxProgramArchiveSize
	limits.Data = s.MaxDataArchiveSize
	limits.Runtime = s.MaxRuntimeSize
	return sources.New(st, api, c, limits, sources.WithLogger(log), sources.WithDelegations(deleg)), nil
}

// defaultRuntimeFile finds the local store's default runtime, the one
// pre-warmed sandboxes are made for.
func defaultRuntimeFile(st *store.Store) pool.SpareRuntime {
	return func(context.Context) (sources.File, error) {
		ref, err := st.DefaultRuntime()
		if err != nil {
			return sources.File{}, err
		}
		msg, err := st.GetMessage(ref)
		if err != nil {
			return sources.File{}, err
		}
		content, err := msg.Store()
		if err != nil {
			return sources.File{}, err
		}
		path, err := st.FilePath(content.ItemHash)
		if err != nil {
			return sources.File{}, err
		}
		return sources.File{Ref: ref, Hash: content.ItemHash, Path: path, Encoding: message.EncodingSquashfs}, nil
	}
}

// selfTestProgram returns the program /status/check/fastapi exercises:
// CHECK_FASTAPI_VM_ID, or the bundled example uploaded to the local store
// on first use.
func selfTestProgram(s *config.Settings, st *store.Store) func(context.Context) (string, error) {
	var mu sync.Mutex
	var hash string
	return func(ctx context.Context) (string, error) {
		if s.CheckFastAPIVMID != "" {
			return s.CheckFastAPIVMID, nil
		}
		mu.Lock()
		defer mu.Unlock()
		if hash != "" {
			return hash, nil
		}
		dir, err := os.MkdirTemp("", "example_fastapi-")
		if err != nil {
			return "", err
		}
		defer os.RemoveAll(dir)
		if err := os.CopyFS(dir, examples.FastAPI); err != nil {
			return "", fmt.Errorf("unpacking the bundled example: %w", err)
		}
		res, err := st.UploadProgram(ctx, store.UploadOptions{
			Path:       filepath.Join(dir, "example_fastapi"),
			Entrypoint: examples.FastAPIEntrypoint,
			Variables:  map[string]string{"VM_CUSTOM_VARIABLE": "SOMETHING"},
			// As aleph-vm's diagnostic message: the network and DNS checks
			// need the internet, persistent_storage a volume at the path
			// the program keeps its counter in.
			Internet: true,
			Volumes: []store.UploadVolume{{
				Kind:    message.VolumePersistent,
				Mount:   examples.FastAPIStateVolume.Mount,
				Name:    examples.FastAPIStateVolume.Name,
				SizeMiB: examples.FastAPIStateVolume.SizeMiB,
			}},
		})
		if err != nil {
			return "", fmt.Errorf("storing the bundled example program: %w", err)
		}
		hash = res.ProgramHash
		return hash, nil
	}
}

// openGuestCache opens the guest API cache where settings put it: Redis
// with REDIS_URL, as aleph-vm does, else the embedded file under
// EXECUTION_ROOT. Expired entries are swept until ctx ends.
func openGuestCache(ctx context.Context, s *config.Settings, log *slog.Logger) (*guestapi.Cache, func(), error) {
	limits := guestapi.Limits{
		Expiry:        guestapi.DefaultExpiry,
		MaxKeys:       s.GuestCacheMaxKeys,
		MaxBytes:      s.GuestCacheMaxBytes,
		MaxTotalBytes: s.GuestCacheMaxTotalBytes,
	}
	var store guestapi.Store
	if s.RedisURL != "" {
		rs, err := guestapi.OpenRedis(ctx, s.RedisURL, limits)
		if err != nil {
			return nil, nil, err
		}
		if err := rs.Ping(ctx); err != nil {
			log.Warn("guest cache: Redis does not answer yet; cache calls answer 503 until it does", "err", err)
		}
		store = rs
	} else {
		ds, err := guestapi.OpenDisk(ctx, s.GuestCachePath(), limits)
		if err != nil {
			return nil, nil, err
		}
		store = ds
	}
	log.Info("guest cache", "store", s.GuestCacheStore())
	sctx, stop := context.WithCancel(ctx)
	go guestapi.RunSweeper(sctx, store, 10*time.Minute, log)
	closeFn := func() {
		stop()
		if err := store.Close(); err != nil {
			log.Warn("closing the guest cache", "err", err)
		}
	}
	return guestapi.NewCache(store, s.GuestCacheMaxValueSize, log), closeFn, nil
}

// configPage is /about/config: the settings, secrets redacted, and where
// the guest cache lives.
func configPage(s *config.Settings) map[string]any {
	m := s.Redacted()
	m["GUEST_CACHE_STORE"] = s.GuestCacheStore()
	return m
}

// publicConfig is /status/config: the settings aleph-vm publishes without
// login (views/__init__.py status_public_config), with this node's values
// where it has the setting and aleph-vm's neutral value where it has not.
// qemuKVM: the backend in use is QEMU with KVM (qemuWithKVM).
func publicConfig(s *config.Settings, qemuKVM bool) map[string]any {
	return map[string]any{
		"DOMAIN_NAME": s.DomainName,
		"node_hash":   nil,
		"version":     pep440.Normalize(version),
		"references": map[string]any{
			"API_SERVER":          s.APIServer,
			"CHECK_FASTAPI_VM_ID": s.CheckFastAPIVMID,
			"CONNECTOR_URL":       nil,
		},
		"security": map[string]any{
			"USE_JAILER":             s.UseJailer,
			"PRINT_SYSTEM_LOGS":      s.PrintSystemLogs,
			"WATCH_FOR_UPDATES":      s.WatchForUpdates,
			"ALLOW_VM_NETWORKING":    s.AllowVMNetworking,
			"USE_DEVELOPER_SSH_KEYS": false,
		},
		"networking": map[string]any{
			"IPV6_ADDRESS_POOL":       nil,
			"IPV6_ALLOCATION_POLICY":  nil,
			"IPV6_SUBNET_PREFIX":      nil,
			"IPV6_FORWARDING_ENABLED": false,
			"USE_NDP_PROXY":           false,
		},
		"debug": map[string]any{
			"SENTRY_DSN_CONFIGURED": false,
			"DEBUG_ASYNCIO":         false,
			"EXECUTION_LOG_ENABLED": false,
		},
		"payment": map[string]any{
			"PAYMENT_RECEIVER_ADDRESS": s.PaymentReceiverAddress,
			"AVAILABLE_PAYMENTS":       map[string]any{},
			"PAYMENT_MONITOR_INTERVAL": s.PaymentMonitorInterval.Seconds(),
		},
		"computing": map[string]any{
			"ENABLE_QEMU_SUPPORT":           qemuKVM,
			"INSTANCE_DEFAULT_HYPERVISOR":   string(s.Hypervisor),
			"ENABLE_CONFIDENTIAL_COMPUTING": false,
			"ENABLE_GPU_SUPPORT":            false,
		},
	}
}
