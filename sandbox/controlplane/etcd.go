package main

// Embedded etcd (single member, plain HTTP on loopback only).
//
// Data lives in DIR/etcd and is kept across restarts. Crash recovery needs no
// special handling: etcd's WAL and bbolt locks are flock()s, which the kernel
// drops when the old process dies, and we use TCP (no unix socket files).
// On restart the ports differ from the first run; that is fine for a single
// member: the stored peer URL is never dialled, and the client URLs are
// re-published at start.

import (
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

type etcdServer struct {
	e         *embed.Etcd
	clientURL string
	logLevel  zap.AtomicLevel
}

func startEtcd(dir string) (*etcdServer, error) {
	dataDir := filepath.Join(dir, "etcd")
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return nil, fmt.Errorf("cannot create %s: %w", dataDir, err)
	}
	// A free port is found by binding 127.0.0.1:0 and closing it again, so
	// another process can grab it before etcd binds: retry a few times.
	var lastErr error
	for attempt := 0; attempt < 5; attempt++ {
		ports, err := freePorts(2)
		if err != nil {
			return nil, err
		}
		clientURL := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", ports[0])}
		peerURL := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", ports[1])}

		cfg := embed.NewConfig()
		cfg.Name = "swi-controlplane"
		cfg.Dir = dataDir
		cfg.ListenClientUrls = []url.URL{clientURL}
		cfg.AdvertiseClientUrls = []url.URL{clientURL}
		cfg.ListenPeerUrls = []url.URL{peerURL}
		cfg.AdvertisePeerUrls = []url.URL{peerURL}
		cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
		cfg.InitialClusterToken = "swi-sandbox"
		cfg.ListenMetricsUrls = nil
		cfg.EnableGRPCGateway = false // the apiserver speaks gRPC; no JSON gateway needed
		// etcd is chatty at info/warn; errors only. The level is atomic so
		// Close() can silence the "server closed" errors etcd logs on a
		// normal shutdown.
		level := zap.NewAtomicLevelAt(zap.ErrorLevel)
		zcfg := zap.NewProductionConfig()
		zcfg.Level = level
		zcfg.OutputPaths = []string{"stderr"}
		zcfg.ErrorOutputPaths = []string{"stderr"}
		lg, err := zcfg.Build()
		if err != nil {
			return nil, fmt.Errorf("etcd logger: %w", err)
		}
		cfg.Logger = "zap"
		cfg.LogLevel = "error"
		cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(lg.Named("etcd"))
		// Sandbox only: skipping fsync makes every apiserver write much faster on
		// a small VM disk. A process crash loses nothing (the page cache
		// survives); only a machine crash could, and then the sandbox is rebuilt.
		cfg.UnsafeNoFsync = true
		// Keep the backend small; the apiserver compacts every 5 min itself.
		cfg.QuotaBackendBytes = 2 << 30

		e, err := embed.StartEtcd(cfg)
		if err != nil {
			lastErr = err
			if isAddrInUse(err) {
				continue
			}
			return nil, fmt.Errorf("etcd did not start (data in %s): %w", dataDir, err)
		}
		select {
		case <-e.Server.ReadyNotify():
			return &etcdServer{e: e, clientURL: clientURL.String(), logLevel: level}, nil
		case err := <-e.Err():
			e.Close()
			return nil, fmt.Errorf("etcd failed while starting (data in %s): %w", dataDir, err)
		case <-time.After(60 * time.Second):
			e.Server.Stop()
			e.Close()
			return nil, fmt.Errorf("etcd did not become ready within 60s (data in %s; if it is corrupt, delete it)", dataDir)
		}
	}
	return nil, fmt.Errorf("no free loopback port for etcd after 5 tries: %w", lastErr)
}

func (s *etcdServer) Close() {
	if s != nil && s.e != nil {
		s.logLevel.SetLevel(zap.FatalLevel)
		s.e.Close()
	}
}

func isAddrInUse(err error) bool {
	return errors.Is(err, syscall.EADDRINUSE) || strings.Contains(err.Error(), "address already in use")
}
