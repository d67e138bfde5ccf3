// Command pause is the sandbox's pod sandbox ("pause") container: it holds the
// pod's namespaces open and exits on SIGTERM or SIGINT. No registry is
// reachable, so the node builds this instead of pulling registry.k8s.io/pause.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	// As PID 1 of the pod it also reaps orphans that share its PID namespace.
	signal.Ignore(syscall.SIGCHLD)
	<-sig
}
