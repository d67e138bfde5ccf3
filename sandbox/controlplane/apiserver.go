package main

// Embedded kube-apiserver, built from k8s.io/kubernetes/cmd/kube-apiserver/app.
//
// We feed a synthetic argument list through the apiserver's own flag set
// (exactly the flags a real kube-apiserver takes, so the options are validated
// and defaulted the same way) and then follow app.Run step by step so that
// configuration errors surface synchronously, before we report anything.
// This is the only place that registers the shared component flags
// (--feature-gates lives on the DefaultComponentGlobalsRegistry); the
// controller manager reuses the registry without parsing flags again.

import (
	"context"
	"fmt"
	"net"
	"strings"

	"github.com/spf13/pflag"
	utilerrors "k8s.io/apimachinery/pkg/util/errors"
	"k8s.io/client-go/rest"
	basecompatibility "k8s.io/component-base/compatibility"
	"k8s.io/component-base/featuregate"
	logsapi "k8s.io/component-base/logs/api/v1"
	apiapp "k8s.io/kubernetes/cmd/kube-apiserver/app"
	apioptions "k8s.io/kubernetes/cmd/kube-apiserver/app/options"
)

type apiserverParams struct {
	listener     net.Listener // pre-bound 127.0.0.1:<port>, handed to the server (no port race)
	etcdURL      string
	certDir      string
	servingCert  string
	servingKey   string
	clientCA     string
	saKey        string
	issuer       string
	extraIssuers []string // older issuers still accepted for validation
	featureGates string
	verbosity    int
	extraArgs    []string
	nodeAddress  net.IP // nil: loopback only
	serviceCIDR  string
	kubeletCert  string
	kubeletKey   string
}

// startAPIServer builds and starts the apiserver; it returns once the server
// goroutine runs. The returned channel yields the server's exit error (nil on
// a clean stop after ctx is cancelled) and is closed afterwards.
func startAPIServer(ctx context.Context, p apiserverParams) (<-chan error, error) {
	s := apioptions.NewServerRunOptions()
	fs := pflag.NewFlagSet("kube-apiserver", pflag.ContinueOnError)
	for _, f := range s.Flags().FlagSets {
		fs.AddFlagSet(f)
	}

	args := []string{
		"--etcd-servers=" + p.etcdURL,
		"--bind-address=127.0.0.1",
		"--cert-dir=" + p.certDir,
		"--tls-cert-file=" + p.servingCert,
		"--tls-private-key-file=" + p.servingKey,
		"--client-ca-file=" + p.clientCA,
		"--authorization-mode=Node,RBAC",
		// Anonymous requests must reach RBAC so the discovery binding for
		// system:unauthenticated can let the Entra emulator read the issuer docs.
		"--anonymous-auth=true",
		"--service-account-issuer=" + p.issuer,
		"--service-account-key-file=" + p.saKey,
		"--service-account-signing-key-file=" + p.saKey,
		"--service-cluster-ip-range=" + p.serviceCIDR,
		// kubectl logs/exec: reach the kubelet at the node's InternalIP (its
		// host name does not resolve), with our client certificate.
		"--kubelet-preferred-address-types=InternalIP",
		"--kubelet-client-certificate=" + p.kubeletCert,
		"--kubelet-client-key=" + p.kubeletKey,
		"--profiling=false",
		// On shutdown, drain normal requests and then give net/http only 2 s
		// (instead of the 60 s request timeout) for open watch streams, so a
		// client holding a watch (kopf, kubectl -w) cannot stall SIGTERM.
		"--shutdown-send-retry-after=true",
		fmt.Sprintf("--v=%d", p.verbosity),
	}
	if p.nodeAddress != nil {
		// Pods reach the API server through the kubernetes Service, whose
		// endpoint is this address (the lease reconciler keeps it).
		args = append(args, "--advertise-address="+p.nodeAddress.String(), "--endpoint-reconciler-type=lease")
	} else {
		// The "kubernetes" Service endpoints would point at 127.0.0.1, which
		// Endpoints validation rejects (loopback): the default lease reconciler
		// then logs an error every 10 s. Without a node nothing needs them.
		args = append(args, "--advertise-address=127.0.0.1", "--endpoint-reconciler-type=none")
	}
	for _, iss := range p.extraIssuers {
		// Extra --service-account-issuer values are accepted when validating
		// tokens; the first one signs and is served in discovery.
		args = append(args, "--service-account-issuer="+iss)
	}
	if p.featureGates != "" {
		args = append(args, "--feature-gates="+p.featureGates)
	}
	args = append(args, p.extraArgs...)
	if err := fs.Parse(args); err != nil {
		return nil, fmt.Errorf("kube-apiserver flags: %w", err)
	}

	// What NewAPIServerCommand's PersistentPreRunE does.
	if err := s.GenericServerRunOptions.ComponentGlobalsRegistry.Set(); err != nil {
		return nil, fmt.Errorf("invalid --feature-gates %q: %w", p.featureGates, err)
	}
	rest.SetDefaultWarningHandler(rest.NoWarnings{})

	featureGate := s.GenericServerRunOptions.ComponentGlobalsRegistry.FeatureGateFor(basecompatibility.DefaultKubeComponent)
	if err := logsapi.ValidateAndApply(s.Logs, featureGate); err != nil {
		return nil, fmt.Errorf("logging options: %w", err)
	}

	// Hand over the listener we already bound: its port is in the issuer URL.
	s.SecureServing.Listener = p.listener
	s.SecureServing.BindPort = p.listener.Addr().(*net.TCPAddr).Port

	completed, err := s.Complete(ctx)
	if err != nil {
		return nil, fmt.Errorf("kube-apiserver options: %w", err)
	}
	if errs := completed.Validate(); len(errs) != 0 {
		return nil, fmt.Errorf("kube-apiserver options: %w", utilerrors.NewAggregate(errs))
	}
	if f, ok := featureGate.(featuregate.MutableFeatureGate); ok {
		f.AddMetrics()
	}

	config, err := apiapp.NewConfig(completed)
	if err != nil {
		return nil, fmt.Errorf("kube-apiserver config: %w", err)
	}
	cc, err := config.Complete()
	if err != nil {
		return nil, fmt.Errorf("kube-apiserver config: %w", err)
	}
	server, err := apiapp.CreateServerChain(cc)
	if err != nil {
		return nil, fmt.Errorf("kube-apiserver: %w", err)
	}
	prepared, err := server.PrepareRun()
	if err != nil {
		return nil, fmt.Errorf("kube-apiserver: %w", err)
	}

	errCh := make(chan error, 1)
	go func() {
		defer close(errCh)
		errCh <- prepared.Run(ctx)
	}()
	return errCh, nil
}

// splitArgs keeps repeated --apiserver-arg values.
type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }
