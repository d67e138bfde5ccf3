package main

// Embedded kube-controller-manager.
//
// Options are set in code, never parsed from flags: the KCM options share the
// process-wide ComponentGlobalsRegistry with the apiserver, and registering
// its flags on a second FlagSet panics ("feature gates registered twice").
// The registry was already Set() by the apiserver start, so --feature-gates
// applies to both components.

import (
	"context"
	"fmt"
	"time"

	kcmapp "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	kcmoptions "k8s.io/kubernetes/cmd/kube-controller-manager/app/options"
	"k8s.io/kubernetes/cmd/kube-controller-manager/names"
)

// controllers we run: what the sandbox's workloads and its one node need
// (volume, node-ipam and cloud controllers would only burn CPU).
var controllers = []string{
	names.ServiceAccountTokenController,        // token Secrets of type service-account-token (needs sa.key)
	names.ServiceAccountController,             // "default" SA in every namespace
	names.RootCACertificatePublisherController, // kube-root-ca.crt ConfigMap in every namespace (projected SA volumes)
	names.NamespaceController,                  // namespace deletion finishes
	names.GarbageCollectorController,           // ownerReference cascading deletes
	names.DeploymentController,                 // Deployment -> ReplicaSet
	names.ReplicaSetController,                 // ReplicaSet -> Pods
	names.JobController,                        // Job -> Pods
	names.CronJobController,                    // CronJob -> Jobs
	names.TTLAfterFinishedController,           // Job ttlSecondsAfterFinished
	names.ClusterRoleAggregationController,     // admin/edit/view aggregated ClusterRoles get their rules
	names.NodeLifecycleController,              // lifts the node's not-ready taint once the kubelet reports Ready
	names.EndpointSliceController,              // Service -> EndpointSlices, which kube-proxy programs
	names.PodGarbageCollectorController,        // pods of a deleted node go away
}

func runControllerManager(ctx context.Context, kubeconfig, rootCAFile, saKeyFile string) error {
	s, err := kcmoptions.NewKubeControllerManagerOptions()
	if err != nil {
		return fmt.Errorf("controller-manager options: %w", err)
	}
	s.Generic.ClientConnection.Kubeconfig = kubeconfig
	s.Generic.Controllers = controllers
	s.Generic.LeaderElection.LeaderElect = false // one process, nothing to elect
	// No secure port for the KCM itself (its default 10257 would collide
	// between two sandbox instances, and nothing scrapes it).
	s.SecureServing.BindPort = 0
	// Each controller gets its own service account (as kubeadm does), so the
	// KCM's client cert (CN system:kube-controller-manager) only needs the
	// bootstrap RBAC role of that name; controllers act under RBAC like in a
	// real cluster.
	s.KubeCloudShared.UseServiceAccountCredentials = true
	s.SAController.ServiceAccountKeyFile = saKeyFile
	s.SAController.RootCAFile = rootCAFile
	// Leave room in the ~10 s shutdown budget for apiserver and etcd.
	s.ControllerShutdownTimeout = 4 * time.Second

	c, err := s.Config(ctx, kcmapp.KnownControllers(), kcmapp.ControllersDisabledByDefault(), kcmapp.ControllerAliases())
	if err != nil {
		return fmt.Errorf("controller-manager config: %w", err)
	}
	return kcmapp.Run(ctx, c.Complete())
}
