// Command swi-probe is the sandbox's tiny test workload (one static binary,
// no registry needed):
//
//	swi-probe serve PORT   answer every HTTP request with "swi-probe <hostname>"
//	swi-probe get URL [CA] print the body of an HTTP(S) GET, trusting only the PEM
//	                       bundle CA for https when given (exit 1 on failure)
//	swi-probe cat FILE     print a file
//	swi-probe sleep        wait for SIGTERM
package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: swi-probe serve PORT | get URL [CA] | cat FILE | sleep")
		os.Exit(2)
	}
	switch cmd := os.Args[1]; {
	case cmd == "serve" && len(os.Args) == 3:
		host, _ := os.Hostname()
		http.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) {
			fmt.Fprintf(w, "swi-probe %s\n", host)
		})
		fmt.Fprintf(os.Stderr, "listening on :%s\n", os.Args[2])
		if err := http.ListenAndServe(":"+os.Args[2], nil); err != nil {
			fmt.Fprintln(os.Stderr, "error:", err)
			os.Exit(1)
		}
	case cmd == "get" && (len(os.Args) == 3 || len(os.Args) == 4):
		client := http.Client{Timeout: 10 * time.Second}
		if len(os.Args) == 4 {
			pem, err := os.ReadFile(os.Args[3])
			if err != nil {
				fmt.Fprintln(os.Stderr, "error:", err)
				os.Exit(1)
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				fmt.Fprintln(os.Stderr, "error: no certificate in", os.Args[3])
				os.Exit(1)
			}
			client.Transport = &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}
		}
		resp, err := client.Get(os.Args[2])
		if err != nil {
			fmt.Fprintln(os.Stderr, "error:", err)
			os.Exit(1)
		}
		defer resp.Body.Close()
		_, _ = io.Copy(os.Stdout, resp.Body)
		if resp.StatusCode >= 400 {
			fmt.Fprintln(os.Stderr, "error: HTTP", resp.Status)
			os.Exit(1)
		}
	case cmd == "cat" && len(os.Args) == 3:
		b, err := os.ReadFile(os.Args[2])
		if err != nil {
			fmt.Fprintln(os.Stderr, "error:", err)
			os.Exit(1)
		}
		_, _ = os.Stdout.Write(b)
	case cmd == "sleep":
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		<-sig
	default:
		fmt.Fprintln(os.Stderr, "usage: swi-probe serve PORT | get URL [CA] | cat FILE | sleep")
		os.Exit(2)
	}
}
