package main

// Embedded kube-scheduler: binds pods to the sandbox's node.
//
// Like the controller manager, options are set in code (no second flag
// parse). The configuration goes through a KubeSchedulerConfiguration file
// because Setup replaces the in-memory component config with the defaults and
// then reads --config: the file carries the kubeconfig and turns leader
// election off (one process, nothing to elect).

import (
	"context"
	"fmt"
	"path/filepath"

	schedapp "k8s.io/kubernetes/cmd/kube-scheduler/app"
	schedoptions "k8s.io/kubernetes/cmd/kube-scheduler/app/options"
)

func runScheduler(ctx context.Context, dir, kubeconfig string) error {
	cfgPath := filepath.Join(dir, "scheduler.yaml")
	cfg := fmt.Sprintf(`apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
clientConnection:
  kubeconfig: %q
leaderElection:
  leaderElect: false
`, kubeconfig)
	if err := writeFileAtomic(cfgPath, []byte(cfg), 0o600); err != nil {
		return fmt.Errorf("scheduler configuration: %w", err)
	}
	opts := schedoptions.NewOptions()
	opts.ConfigFile = cfgPath
	// No secure port for the scheduler itself (its default 10259 would
	// collide between two sandboxes, and nothing scrapes it).
	opts.SecureServing.BindPort = 0
	cc, sched, err := schedapp.Setup(ctx, opts)
	if err != nil {
		return fmt.Errorf("kube-scheduler: %w", err)
	}
	if err := schedapp.Run(ctx, cc, sched); err != nil && ctx.Err() == nil {
		return fmt.Errorf("kube-scheduler: %w", err)
	}
	return nil
}
