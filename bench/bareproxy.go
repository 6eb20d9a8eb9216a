package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"time"
)

// serveBareProxy is the bench binary re-run as a bare reverse proxy:
// net/http's ReverseProxy from a loopback port to the floor's unix socket,
// in its own process as the supervisor is. What it costs over the floor is
// what any Go HTTP hop costs here, the part of our relay's cost that no
// relay written with net/http can avoid.
//
// With -splice it only copies bytes both ways between each client
// connection and one connection of its own to the socket: no parsing at
// all, the least any relay in a process of its own can cost.
var (
	serveBareProxy = flag.String("serve-bare-proxy", "", "internal: `addr=socket`, serve a bare reverse proxy and nothing else")
	spliceOnly     = flag.Bool("splice", false, "internal: with -serve-bare-proxy, copy bytes instead of proxying HTTP")
)

func runBareProxy(spec string) error {
	addr, sock, ok := strings.Cut(spec, "=")
	if !ok {
		return fmt.Errorf("-serve-bare-proxy %q: want addr=socket", spec)
	}
	if *spliceOnly {
		return runSplice(addr, sock)
	}
	transport := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
		MaxIdleConnsPerHost: 32,
		DisableCompression:  true,
	}
	target := &url.URL{Scheme: "http", Host: "program"}
	proxy := &httputil.ReverseProxy{
		Transport: transport,
		Rewrite:   func(pr *httputil.ProxyRequest) { pr.SetURL(target); pr.SetXForwarded() },
	}
	return http.ListenAndServe(addr, proxy)
}

func runSplice(addr, sock string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	for {
		client, err := ln.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer client.Close()
			program, err := net.Dial("unix", sock)
			if err != nil {
				return
			}
			defer program.Close()
			go func() { _, _ = io.Copy(program, client) }()
			_, _ = io.Copy(client, program)
		}()
	}
}

// measureBareProxy starts the bare proxy (or splice) in front of the
// floor's socket and measures warm requests through it with the same
// client as the rows.
func measureBareProxy(ctx context.Context, sock string, splice bool) (figures, error) {
	var f figures
	self, err := os.Executable()
	if err != nil {
		return f, err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", freePort())
	cmd := exec.CommandContext(ctx, self, "-serve-bare-proxy", addr+"="+sock, fmt.Sprintf("-splice=%t", splice))
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		return f, err
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	client := newClient(nil)
	url := "http://" + addr + "/"
	if err := waitOKWith(ctx, client, url, 30*time.Second); err != nil {
		return f, err
	}
	return f, measureWarm(ctx, client, url, &f)
}
