// Command swi-controlplane runs a real Kubernetes control plane for the
// sandbox in one process: embedded etcd, kube-apiserver and
// kube-controller-manager, all from the pinned k8s.io/kubernetes module set,
// all on 127.0.0.1 with free ports.
//
// Contract (the Python launcher depends on it exactly):
//
//	swi-controlplane --state-dir DIR --ca-cert CA.crt --ca-key CA.key \
//	    [--feature-gates k=v,...] [--log-file FILE]
//
// When usable it prints exactly one line to stdout and nothing else ever:
//
//	READY kubeconfig=<path> issuer=<url> ca=<path> server=<url>
//
// Logs go to stderr (or --log-file). SIGTERM/SIGINT stop everything and exit 0.
// Start-up errors print one line "error: ..." on stderr and exit 2.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"
	_ "time/tzdata" // CronJob time zones, as in the upstream binaries

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"

	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics, as in the upstream binaries
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric, as in the upstream binaries
)

const (
	exitStartError = 2
	exitRunError   = 1

	discoveryBindingName = "sandbox-oidc-discovery-unauthenticated"
	discoveryRoleName    = "system:service-account-issuer-discovery"

	readyTimeout    = 4 * time.Minute // cold start on a busy 2-core box is ~10-30 s
	shutdownBudget  = 9 * time.Second // contract: exit within ~10 s of SIGTERM
	lockFileName    = "swi-controlplane.lock"
	stateFileName   = "apiserver.json"
	issuerFileName  = "issuer"
	kubeconfigName  = "kubeconfig"
	kcmKubeconfig   = "controller-manager.kubeconfig"
	schedKubeconfig = "scheduler.kubeconfig"
	pkiDirName      = "pki"
)

// stateFile is DIR/apiserver.json.
type stateFile struct {
	Server     string `json:"server"`
	Issuer     string `json:"issuer"`
	Kubeconfig string `json:"kubeconfig"`
	CA         string `json:"ca"`
	PID        int    `json:"pid"`
	Etcd       string `json:"etcd"`
}

// Process-wide output handles, set up in main before anything logs.
var (
	errOut   *os.File // the original stderr: "error:" lines always go here
	readyOut *os.File // the original stdout: only the READY line goes here
)

func main() {
	os.Exit(run())
}

func fail(code int, format string, a ...any) int {
	fmt.Fprintf(errOut, "error: "+format+"\n", a...)
	klog.Flush()
	return code
}

func run() int {
	errOut, readyOut = os.Stderr, os.Stdout

	fs := flag.NewFlagSet("swi-controlplane", flag.ContinueOnError)
	// Parse errors become our single "error:" line; usage only on --help.
	fs.SetOutput(io.Discard)
	stateDir := fs.String("state-dir", "", "directory for etcd data, certificates, kubeconfig and state files (created if missing)")
	caCert := fs.String("ca-cert", "", "sandbox CA certificate (PEM)")
	caKey := fs.String("ca-key", "", "sandbox CA private key (PEM; RSA or ECDSA, PKCS#1/SEC1/PKCS#8)")
	featureGates := fs.String("feature-gates", "", "Kubernetes feature gates k=v,... for apiserver and controller-manager")
	logFile := fs.String("log-file", "", "append logs here instead of stderr")
	nodeAddress := fs.String("node-address", "", "also serve the API on this address (the sandbox node's side of its link, which pods reach) and advertise it as the kubernetes Service's endpoint")
	serviceCIDR := fs.String("service-cidr", "10.0.0.0/24", "the Service ClusterIP range (the node derives one per sandbox so two can run side by side)")
	verbosity := fs.Int("v", 0, "klog verbosity (0-1 recommended)")
	var apiserverArgs multiFlag
	fs.Var(&apiserverArgs, "apiserver-arg", "extra kube-apiserver flag, e.g. --apiserver-arg=--runtime-config=api/all=true (repeatable)")
	if err := fs.Parse(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(os.Stderr)
			fmt.Fprintln(os.Stderr, "usage: swi-controlplane --state-dir DIR --ca-cert CA.crt --ca-key CA.key [--feature-gates k=v,...] [--log-file FILE]")
			fs.PrintDefaults()
			return 0
		}
		return fail(exitStartError, "%v (see --help)", err)
	}
	if fs.NArg() > 0 {
		return fail(exitStartError, "unexpected arguments %q (see --help)", fs.Args())
	}
	for _, req := range []struct{ name, v string }{{"--state-dir", *stateDir}, {"--ca-cert", *caCert}, {"--ca-key", *caKey}} {
		if req.v == "" {
			return fail(exitStartError, "%s is required (usage: swi-controlplane --state-dir DIR --ca-cert CA.crt --ca-key CA.key)", req.name)
		}
	}
	dir, err := filepath.Abs(*stateDir)
	if err != nil {
		return fail(exitStartError, "bad --state-dir: %v", err)
	}
	var nodeIP net.IP
	if *nodeAddress != "" {
		if nodeIP = net.ParseIP(*nodeAddress).To4(); nodeIP == nil {
			return fail(exitStartError, "--node-address %q is not an IPv4 address", *nodeAddress)
		}
	}
	kubernetesServiceIP, err := firstServiceIP(*serviceCIDR)
	if err != nil {
		return fail(exitStartError, "--service-cidr %q: %v (give an IPv4 CIDR such as 10.0.0.0/24)", *serviceCIDR, err)
	}
	caPath, _ := filepath.Abs(*caCert)
	caKeyPath, _ := filepath.Abs(*caKey)

	// Stdout is the launcher's protocol channel: keep a private handle for the
	// READY line and point fd 1 at the log stream so no library print can
	// ever corrupt it. Likewise keep the real stderr for "error:" lines.
	if err := redirectOutput(*logFile); err != nil {
		return fail(exitStartError, "%v", err)
	}
	defer klog.Flush()

	// State directory: must exist and be writable.
	if err := os.MkdirAll(filepath.Join(dir, pkiDirName), 0o700); err != nil {
		return fail(exitStartError, "cannot create state dir %s: %v (choose a writable --state-dir)", dir, err)
	}
	if f, err := os.CreateTemp(dir, ".write-test*"); err != nil {
		return fail(exitStartError, "state dir %s is not writable: %v (choose a writable --state-dir)", dir, err)
	} else {
		f.Close()
		os.Remove(f.Name())
	}
	unlock, err := lockStateDir(dir)
	if err != nil {
		return fail(exitStartError, "%v", err)
	}
	defer unlock()

	ca, err := loadCA(caPath, caKeyPath)
	if err != nil {
		return fail(exitStartError, "%v (pass the sandbox CA made by the launcher)", err)
	}
	saKey, err := ensureSAKey(dir)
	if err != nil {
		return fail(exitStartError, "%v", err)
	}

	// API server port: reuse the previous run's port if it is free, so the
	// issuer URL (https://127.0.0.1:<port>) and thus previously minted tokens
	// stay valid across restarts. Otherwise take any free port and still
	// accept tokens from the previous issuer.
	prev := readState(dir)
	ln, err := listenAPIServer(prev)
	if err != nil {
		return fail(exitStartError, "cannot bind a loopback port for kube-apiserver: %v", err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	if nodeIP != nil {
		// Same port on the node's address: pods reach the API server there
		// (the kubernetes Service's endpoint), the issuer stays on loopback.
		nodeLn, err := net.Listen("tcp", net.JoinHostPort(nodeIP.String(), strconv.Itoa(port)))
		if err != nil {
			ln.Close()
			return fail(exitStartError, "cannot bind kube-apiserver's port %d on the node address %s: %v (is the node's network set up? `python -m sandbox up` does it)", port, nodeIP, err)
		}
		ln = mergeListeners(ln, nodeLn)
	}
	server := fmt.Sprintf("https://127.0.0.1:%d", port)
	issuer := server
	var extraIssuers []string
	if prev.Issuer != "" && prev.Issuer != issuer {
		extraIssuers = append(extraIssuers, prev.Issuer)
	}

	// Certificates, re-minted on every start (cheap; follows a rotated CA).
	pki := filepath.Join(dir, pkiDirName)
	servingCert, servingKey := filepath.Join(pki, "apiserver.crt"), filepath.Join(pki, "apiserver.key")
	kubeconfigPath := filepath.Join(dir, kubeconfigName)
	kcmKubeconfigPath := filepath.Join(pki, kcmKubeconfig)
	schedKubeconfigPath := filepath.Join(pki, schedKubeconfig)
	kubeletClientCert, kubeletClientKey := filepath.Join(pki, "apiserver-kubelet-client.crt"), filepath.Join(pki, "apiserver-kubelet-client.key")
	sans := []net.IP{net.ParseIP("127.0.0.1"), kubernetesServiceIP}
	if nodeIP != nil {
		sans = append(sans, nodeIP)
	}
	if err := writeCerts(ca, server, sans, certPaths{
		servingCert: servingCert, servingKey: servingKey,
		adminKubeconfig: kubeconfigPath, kcmKubeconfig: kcmKubeconfigPath, schedKubeconfig: schedKubeconfigPath,
		kubeletClientCert: kubeletClientCert, kubeletClientKey: kubeletClientKey,
	}); err != nil {
		ln.Close()
		return fail(exitStartError, "writing certificates to %s: %v", dir, err)
	}

	sigCh := make(chan os.Signal, 2)
	signal.Notify(sigCh, syscall.SIGTERM, syscall.SIGINT)

	etcd, err := startEtcd(dir)
	if err != nil {
		ln.Close()
		return fail(exitStartError, "%v", err)
	}
	klog.InfoS("etcd ready", "url", etcd.clientURL)

	apiCtx, apiCancel := context.WithCancel(context.Background())
	apiErr, err := startAPIServer(apiCtx, apiserverParams{
		listener:     ln,
		etcdURL:      etcd.clientURL,
		certDir:      pki,
		servingCert:  servingCert,
		servingKey:   servingKey,
		clientCA:     caPath,
		saKey:        saKey,
		issuer:       issuer,
		extraIssuers: extraIssuers,
		featureGates: *featureGates,
		verbosity:    *verbosity,
		nodeAddress:  nodeIP,
		serviceCIDR:  *serviceCIDR,
		kubeletCert:  kubeletClientCert,
		kubeletKey:   kubeletClientKey,
		extraArgs:    apiserverArgs,
	})
	if err != nil {
		apiCancel()
		ln.Close()
		etcd.Close()
		return fail(exitStartError, "%v", err)
	}

	// The controller manager and the scheduler share one context and one
	// error channel: either stopping stops the control plane.
	kcmCtx, kcmCancel := context.WithCancel(context.Background())
	kcmErr := make(chan error, 2)
	kcmStarted := false

	// shutdown stops the components in dependency order, bounded by a
	// watchdog: exiting the process releases every port and lock anyway.
	shutdown := func(code int) int {
		watchdog := time.AfterFunc(shutdownBudget, func() {
			klog.Warning("clean shutdown took too long, exiting anyway")
			klog.Flush()
			unlock()
			os.Exit(code)
		})
		defer watchdog.Stop()
		signal.Reset(syscall.SIGTERM, syscall.SIGINT) // a second signal kills at once
		if kcmStarted {
			kcmCancel()
			select {
			case <-kcmErr:
			case <-time.After(5 * time.Second):
			}
		}
		apiCancel()
		select {
		case <-apiErr:
			klog.InfoS("kube-apiserver stopped")
		case <-time.After(4 * time.Second):
			klog.InfoS("kube-apiserver still draining, stopping etcd anyway")
		}
		// etcd's Close waits for open gRPC streams (the apiserver's watches
		// are never closed by the library): bound it. Data is safe either
		// way: everything etcd wrote is in the page cache and survives exit.
		etcdDone := make(chan struct{})
		go func() { etcd.Close(); close(etcdDone) }()
		select {
		case <-etcdDone:
			klog.InfoS("etcd stopped")
		case <-time.After(2 * time.Second):
			klog.InfoS("etcd still closing, exiting anyway")
		}
		return code
	}

	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfigPath)
	if err != nil {
		fail(exitStartError, "admin kubeconfig: %v", err)
		return shutdown(exitStartError)
	}
	cfg.Timeout = 10 * time.Second
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		fail(exitStartError, "admin client: %v", err)
		return shutdown(exitStartError)
	}

	deadline := time.After(readyTimeout)
	// waitFor polls cond until true, bailing out on a signal, a component
	// dying, or the start-up deadline. It returns -1 to go on, else an exit code.
	waitFor := func(what string, cond func(context.Context) bool) int {
		tick := time.NewTicker(200 * time.Millisecond)
		defer tick.Stop()
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			ok := cond(ctx)
			cancel()
			if ok {
				return -1
			}
			select {
			case s := <-sigCh:
				klog.InfoS("signal received during start-up", "signal", s)
				return shutdown(0)
			case err := <-apiErr:
				fail(exitStartError, "kube-apiserver stopped during start-up: %v", err)
				return shutdown(exitStartError)
			case err := <-kcmErr:
				fail(exitStartError, "kube-controller-manager stopped during start-up: %v", err)
				kcmStarted = false
				return shutdown(exitStartError)
			case <-deadline:
				fail(exitStartError, "control plane not ready after %s while waiting for %s (see the log for the cause)", readyTimeout, what)
				return shutdown(exitStartError)
			case <-tick.C:
			}
		}
	}

	if code := waitFor("kube-apiserver /readyz", func(ctx context.Context) bool {
		var status int
		client.Discovery().RESTClient().Get().AbsPath("/readyz").Do(ctx).StatusCode(&status)
		return status == 200
	}); code >= 0 {
		return code
	}
	klog.InfoS("kube-apiserver ready", "server", server)

	if code := waitFor("the OIDC discovery ClusterRoleBinding", func(ctx context.Context) bool {
		if err := ensureDiscoveryBinding(ctx, client); err != nil {
			klog.ErrorS(err, "ensuring discovery binding")
			return false
		}
		return true
	}); code >= 0 {
		return code
	}

	kcmStarted = true
	go func() { kcmErr <- runControllerManager(kcmCtx, kcmKubeconfigPath, caPath, saKey) }()
	go func() {
		if err := runScheduler(kcmCtx, pki, schedKubeconfigPath); err != nil || kcmCtx.Err() == nil {
			kcmErr <- fmt.Errorf("kube-scheduler stopped: %v", err)
		}
	}()

	if code := waitFor("the default/default ServiceAccount (serviceaccount controller)", func(ctx context.Context) bool {
		_, err := client.CoreV1().ServiceAccounts(corev1.NamespaceDefault).Get(ctx, "default", metav1.GetOptions{})
		return err == nil
	}); code >= 0 {
		return code
	}

	st := stateFile{Server: server, Issuer: issuer, Kubeconfig: kubeconfigPath, CA: caPath, PID: os.Getpid(), Etcd: etcd.clientURL}
	if err := writeStateFiles(dir, st); err != nil {
		fail(exitStartError, "writing state files to %s: %v", dir, err)
		return shutdown(exitStartError)
	}

	fmt.Fprintf(readyOut, "READY kubeconfig=%s issuer=%s ca=%s server=%s\n", kubeconfigPath, issuer, caPath, server)
	readyOut.Sync()
	klog.InfoS("control plane ready", "server", server, "issuer", issuer, "kubeconfig", kubeconfigPath)

	select {
	case s := <-sigCh:
		klog.InfoS("signal received, stopping", "signal", s)
		return shutdown(0)
	case err := <-apiErr:
		fail(exitRunError, "kube-apiserver stopped unexpectedly: %v", err)
		return shutdown(exitRunError)
	case err := <-kcmErr:
		kcmStarted = false
		fail(exitRunError, "kube-controller-manager stopped unexpectedly: %v", err)
		return shutdown(exitRunError)
	}
}

// redirectOutput makes fd 1 and fd 2 point at the log stream (stderr, or the
// --log-file), after keeping private dups of the original stdout/stderr.
func redirectOutput(logFile string) error {
	outFD, err := unix.Dup(1)
	if err != nil {
		return fmt.Errorf("dup stdout: %w", err)
	}
	unix.CloseOnExec(outFD)
	readyOut = os.NewFile(uintptr(outFD), "ready-out")
	errFD, err := unix.Dup(2)
	if err != nil {
		return fmt.Errorf("dup stderr: %w", err)
	}
	unix.CloseOnExec(errFD)
	errOut = os.NewFile(uintptr(errFD), "error-out")

	logFD := 2
	if logFile != "" {
		f, err := os.OpenFile(logFile, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			return fmt.Errorf("cannot open --log-file %s: %v (choose a writable path)", logFile, err)
		}
		logFD = int(f.Fd())
		if err := unix.Dup3(logFD, 2, 0); err != nil {
			return fmt.Errorf("redirect stderr to %s: %w", logFile, err)
		}
		f.Close()
		logFD = 2
	}
	if err := unix.Dup3(logFD, 1, 0); err != nil {
		return fmt.Errorf("redirect stdout: %w", err)
	}
	return nil
}

// lockStateDir takes an exclusive flock on DIR/swi-controlplane.lock so two
// instances never share one etcd. The kernel drops the lock if we crash, so a
// crashed run never blocks the next one; a clean exit also removes the file.
func lockStateDir(dir string) (func(), error) {
	p := filepath.Join(dir, lockFileName)
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("cannot create lock file %s: %v (choose a writable --state-dir)", p, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		b, _ := os.ReadFile(p)
		f.Close()
		return nil, fmt.Errorf("state dir %s is in use by another swi-controlplane (pid %s): stop it or use another --state-dir", dir, string(b))
	}
	f.Truncate(0)
	f.WriteString(strconv.Itoa(os.Getpid()))
	done := false
	return func() {
		if done {
			return
		}
		done = true
		os.Remove(p)
		f.Close() // releases the flock
	}, nil
}

func readState(dir string) stateFile {
	var st stateFile
	b, err := os.ReadFile(filepath.Join(dir, stateFileName))
	if err == nil {
		_ = json.Unmarshal(b, &st)
	}
	return st
}

// listenAPIServer binds the apiserver's secure port now, so its number is
// known for the issuer URL and no other process can take it before the
// apiserver starts serving on it.
func listenAPIServer(prev stateFile) (net.Listener, error) {
	if u, err := url.Parse(prev.Server); err == nil && u.Hostname() == "127.0.0.1" && u.Port() != "" {
		if ln, err := net.Listen("tcp", "127.0.0.1:"+u.Port()); err == nil {
			return ln, nil
		}
	}
	return net.Listen("tcp", "127.0.0.1:0")
}

// freePorts returns n distinct free loopback ports (bound together, then released).
func freePorts(n int) ([]int, error) {
	var lns []net.Listener
	defer func() {
		for _, l := range lns {
			l.Close()
		}
	}()
	var ports []int
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("cannot bind a free loopback port: %w", err)
		}
		lns = append(lns, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// certPaths are the files writeCerts (re)writes on every start.
type certPaths struct {
	servingCert, servingKey                         string
	adminKubeconfig, kcmKubeconfig, schedKubeconfig string
	kubeletClientCert, kubeletClientKey             string
}

func writeCerts(c *ca, server string, servingIPs []net.IP, p certPaths) error {
	serving, err := c.issue("swi-controlplane-apiserver", nil, true,
		[]string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		servingIPs)
	if err != nil {
		return err
	}
	if err := writeFileAtomic(p.servingCert, serving.certPEM, 0o644); err != nil {
		return err
	}
	if err := writeFileAtomic(p.servingKey, serving.keyPEM, 0o600); err != nil {
		return err
	}
	// The API server's client certificate towards kubelets (logs, exec):
	// the kubelet authorizes it with a SubjectAccessReview.
	kubeletClient, err := c.issue("kube-apiserver-kubelet-client", []string{"system:masters"}, false, nil, nil)
	if err != nil {
		return err
	}
	if err := writeFileAtomic(p.kubeletClientCert, kubeletClient.certPEM, 0o644); err != nil {
		return err
	}
	if err := writeFileAtomic(p.kubeletClientKey, kubeletClient.keyPEM, 0o600); err != nil {
		return err
	}
	for _, kc := range []struct {
		path, user string
		groups     []string
	}{
		{p.adminKubeconfig, "sandbox-admin", []string{"system:masters"}},
		{p.kcmKubeconfig, "system:kube-controller-manager", nil},
		{p.schedKubeconfig, "system:kube-scheduler", nil},
	} {
		cert, err := c.issue(kc.user, kc.groups, false, nil, nil)
		if err != nil {
			return err
		}
		if err := writeKubeconfig(kc.path, server, c.certPEM, kc.user, cert); err != nil {
			return err
		}
	}
	return nil
}

// firstServiceIP is the kubernetes Service's ClusterIP: the range's first
// usable address, as the API server allocates it.
func firstServiceIP(cidr string) (net.IP, error) {
	_, n, err := net.ParseCIDR(cidr)
	if err != nil {
		return nil, err
	}
	ip := n.IP.To4()
	if ip == nil {
		return nil, fmt.Errorf("not an IPv4 range")
	}
	first := make(net.IP, 4)
	copy(first, ip)
	first[3]++
	return first, nil
}

// mergeListeners accepts on several listeners as one (the API server takes
// a single net.Listener). Addr is the first one's.
func mergeListeners(lns ...net.Listener) net.Listener {
	m := &multiListener{lns: lns, conns: make(chan net.Conn), done: make(chan struct{})}
	for _, l := range lns {
		go func(l net.Listener) {
			for {
				c, err := l.Accept()
				if err != nil {
					var ne net.Error
					if errors.As(err, &ne) && ne.Timeout() {
						continue
					}
					return // closed
				}
				select {
				case m.conns <- c:
				case <-m.done:
					c.Close()
					return
				}
			}
		}(l)
	}
	return m
}

type multiListener struct {
	lns   []net.Listener
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func (m *multiListener) Accept() (net.Conn, error) {
	select {
	case c := <-m.conns:
		return c, nil
	case <-m.done:
		return nil, net.ErrClosed
	}
}

func (m *multiListener) Close() error {
	m.once.Do(func() {
		close(m.done)
		for _, l := range m.lns {
			l.Close()
		}
	})
	return nil
}

func (m *multiListener) Addr() net.Addr { return m.lns[0].Addr() }

func writeStateFiles(dir string, st stateFile) error {
	if err := writeFileAtomic(filepath.Join(dir, issuerFileName), []byte(st.Issuer+"\n"), 0o644); err != nil {
		return err
	}
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(filepath.Join(dir, stateFileName), append(b, '\n'), 0o644)
}

// ensureDiscoveryBinding lets unauthenticated clients (the Entra emulator)
// read /.well-known/openid-configuration and /openid/v1/jwks.
func ensureDiscoveryBinding(ctx context.Context, client kubernetes.Interface) error {
	want := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{
			Name:   discoveryBindingName,
			Labels: map[string]string{"app.kubernetes.io/managed-by": "swi-controlplane"},
		},
		RoleRef: rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: discoveryRoleName},
		Subjects: []rbacv1.Subject{{
			APIGroup: rbacv1.GroupName, Kind: rbacv1.GroupKind, Name: "system:unauthenticated",
		}},
	}
	crbs := client.RbacV1().ClusterRoleBindings()
	got, err := crbs.Get(ctx, want.Name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		_, err = crbs.Create(ctx, want, metav1.CreateOptions{})
		return err
	case err != nil:
		return err
	case got.RoleRef != want.RoleRef:
		// roleRef is immutable: replace the binding.
		if err := crbs.Delete(ctx, want.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			return err
		}
		_, err = crbs.Create(ctx, want, metav1.CreateOptions{})
		return err
	case !equality.Semantic.DeepEqual(got.Subjects, want.Subjects):
		got.Subjects = want.Subjects
		_, err = crbs.Update(ctx, got, metav1.UpdateOptions{})
		return err
	}
	return nil
}
